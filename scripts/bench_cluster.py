"""Cluster benchmark: `extract --executor ray` against in-process extraction, written to docs/BENCHMARKS.md.

    python scripts/bench_cluster.py                  # 5,000 Fashion-MNIST images at 64 px, as in issue 13
    python scripts/bench_cluster.py --n 1000 --small 300 --no-write   # a quick look

1. The same n Fashion-MNIST images (vgg16 hed-bsds, block5_pool, 64 px, the engine `auto` picks)
   extracted in-process and on a local Ray with 2 actors x 1 thread, each by the CLI in a child process
   with a fresh feature set (the converted graph is made once, beforehand, and shared). Throughput is
   steady state: images counted on the driver's progress bar as vectors arrive, from the first batch
   stored to the last (start-up is reported apart: Ray's start, the actors' model builds).
2. The driver's peak memory (its own VmHWM, not Ray's processes) at two sizes: flat in the images.
3. The driver's store write rate (vectors/s into parts, fsync included): the cluster's ceiling.
4. A projection of wall time for 1 million images on N machines from the per-actor rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from featurecache.bench import store_write_rate, write_section

ROOT = Path(__file__).resolve().parents[1]
FEATS = ["--model", "vgg16", "--weights", "hed-bsds", "--layer", "block5_pool", "--size", "64"]
DIMS = 2 * 2 * 512  # block5_pool at 64 px, flattened


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def split(n: int) -> list[str]:
    test = max(1, n // 5)
    return ["--data", "fashion-mnist", "--max-train", str(n - test), "--max-test", str(test)]


def extract(n: int, cache: Path, executor: list[str]) -> dict:
    """One `featurecache extract` child: wall seconds, steady images/s on the driver, its peak RSS."""
    env = dict(os.environ, FEATURECACHE_DIR=str(cache), TQDM_MININTERVAL="0", TQDM_MINITERS="1",
               PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "featurecache.cli", "extract", *split(n), *FEATS, *executor]
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    ticks, peak, err = [], [0], []

    def watch_memory():  # the driver's own high-water mark; Ray's processes are not counted
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak[0] = max(peak[0], int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024)
            except (OSError, AttributeError):
                pass
            time.sleep(0.1)

    def read_progress():
        buf = ""
        for ch in iter(lambda: proc.stderr.read(1), ""):
            buf += ch
            if ch in "\r\n":
                m = re.search(r"(\d+)/\d+ \[", buf)
                if m:
                    ticks.append((time.monotonic(), int(m.group(1))))
                err.append(buf)
                buf = ""

    threads = [threading.Thread(target=f, daemon=True) for f in (watch_memory, read_progress)]
    for t in threads:
        t.start()
    proc.stdout.read()
    proc.wait()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {shlex.join(args[3:])} failed:\n{''.join(err)[-2000:]}")
    moved = [(t, c) for t, c in ticks if c > 0]
    (t1, c1), (t2, c2) = moved[0], moved[-1]
    return {"wall": wall, "startup": t1 - t0, "rate": (c2 - c1) / (t2 - t1), "peak": peak[0], "images": c2,
            "load": (load0 + os.getloadavg()[0]) / 2}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="Fashion-MNIST images (train + test)")
    ap.add_argument("--small", type=int, default=1000, help="the smaller size of the memory comparison")
    ap.add_argument("--rounds", type=int, default=2, help="in-process and Ray taking turns; each one's best kept")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()
    ray = ["--executor", "ray", "--workers", "2", "--threads-per-worker", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The graph (ONNX) is converted once, by a tiny run, and copied into every cache with the tap catalogue
        # it memoized (as in any cache after its first run): not timed. Neither driver nor actors build the network.
        extract(10, tmp / "warm", [])
        # ... and `auto`'s engine choice measured and remembered once (engines/choice.json), as a first large
        # run or `plan` leaves it: otherwise every run would time each engine, TensorFlow's build included.
        subprocess.run([sys.executable, "-m", "featurecache.cli", "plan", *split(args.n), *FEATS], cwd=ROOT,
                       env=dict(os.environ, FEATURECACHE_DIR=str(tmp / "warm")), check=True, capture_output=True)
        runs, k = {}, 0
        # Taking turns: the cores are shared, so each executor meets the same spread of outside load.
        plan = [(name, executor, args.n) for _ in range(args.rounds) for name, executor in (("in-process", []),
                                                                                            ("ray", ray))]
        for name, executor, n in plan + [("ray-small", ray, args.small)]:
            k += 1
            cache = tmp / f"{name}-{k}"
            for part in ("engines", "taps"):
                shutil.copytree(tmp / "warm" / part, cache / part)
            r = extract(n, cache, executor)
            print(f"{name:<11} n={n:>6}: {r['rate']:6.1f} img/s steady, {r['wall']:6.1f} s wall "
                  f"({r['startup']:.1f} s to the first batch), driver peak {r['peak'] / 2**20:,.0f} MiB, "
                  f"load {r['load']:.1f}", flush=True)
            if name not in runs or r["rate"] > runs[name]["rate"]:
                runs[name] = r
            shutil.rmtree(cache)
        write_rate = store_write_rate(tmp / "store", DIMS)
    local, on_ray, small = runs["in-process"], runs["ray"], runs["ray-small"]
    ratio = on_ray["rate"] / local["rate"]
    per_actor = on_ray["rate"] / 2  # 2 actors x 1 thread on this machine's 2 cores
    print(f"ratio {ratio:.2f}x; per actor {per_actor:.1f} img/s; driver stores {write_rate:,.0f} vectors/s")

    rows = []
    for machines, cores in ((1, 2), (4, 16), (16, 16), (64, 16), (256, 16)):
        rate = min(per_actor * machines * cores, write_rate)
        bound = "driver's store" if rate == write_rate else "actors"
        seconds = 1e6 / rate
        wall = f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.1f} min"
        rows.append(f"| {machines} x {cores} cores | {machines * cores} | {rate:,.0f} | {wall} | {bound} |")
    cmd = f"python scripts/bench_cluster.py --n {args.n} --small {args.small} --rounds {args.rounds}"

    def row(label: str, r: dict) -> str:
        return (f"| {label} | {r['images']:,} | {r['rate']:.1f} | {r['wall']:.1f} | {r['startup']:.1f} | "
                f"{r['peak'] / 2**20:,.0f} | {r['load']:.1f} |")

    busiest = max(r["load"] for r in (local, on_ray, small))
    load_note = (
        "The load column counts this benchmark's own processes too (a run busy on both cores adds about 2); "
        + ("with loads above 3 here, others shared the cores, and Ray's actor processes may draw a larger share "
           "of oversubscribed cores than one process's engine threads do." if busiest > 3 else
           "no run here saw much more than its own load."))
    body = f"""
`{cmd}` on {cpu_model()}, {os.cpu_count()} cores: the load average is given per run (both executors took
turns, {args.rounds} runs each, the best of each kept). vgg16 `hed-bsds` `block5_pool` at 64 px
({DIMS:,}-d vectors) on Fashion-MNIST, each run a fresh feature set, the converted ONNX graph and the tap
catalogue shared, and `auto`'s engine choice remembered (made once beforehand, as in any cache after its
first large run). Steady throughput is counted on the driver as vectors arrive, from the
first batch stored to the last; start-up (Python and the engine's session; the network itself is built
only where a graph must be converted, so with the shared graph neither driver nor actors build it; for Ray
also Ray's start and the actors') is the time to the first batch. Peak memory is the driver's own (VmHWM),
Ray's processes not counted.

| run | images | steady images/s | wall s | s to first batch | driver peak MiB | load |
|---|---:|---:|---:|---:|---:|---:|
{row("in-process (one process, engine streams on 2 cores)", local)}
{row("`--executor ray`, local Ray, 2 actors x 1 thread", on_ray)}
{row("`--executor ray`, same, fewer images", small)}

- **Ray / in-process steady throughput: {ratio:.2f}x** (target >= 0.8x): the cost of shipping raw pixels
  to the actors and vectors back (784 bytes in and 8 KB out per image), on the same 2 cores. {load_note}
- **Driver memory is flat in the images**: {small['peak'] / 2**20:,.0f} MiB at {small['images']:,} images,
  {on_ray['peak'] / 2**20:,.0f} MiB at {on_ray['images']:,} (the driver holds ids, and vectors only until
  their part is written; images are read in bounded read tasks).
- **The driver stores {write_rate:,.0f} vectors/s** ({DIMS:,}-d float32, parts cut as extraction cuts
  them, each fsynced): the most any cluster can deliver through one driver for this tap.

Projection for 1,000,000 images from the measured per-actor rate ({per_actor:.1f} images/s for one actor on
one core of this machine, 1 actor per core), capped by the driver's store rate; start-up (about
{on_ray['startup']:.0f} s here) and reading the images on the driver's node are left out:

| machines | actors | images/s | wall time | bound by |
|---|---:|---:|---:|---|
""" + "\n".join(rows)
    print(body)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", "Cluster (scripts/bench_cluster.py)", body)


if __name__ == "__main__":
    main()
