"""Serving benchmark: `featurecache serve` under a bounded load from a loopback client.

    python scripts/bench_serve.py                    # makes a run: digits PNGs, vgg16 random weights, 32px, logreg
    python scripts/bench_serve.py --run RUN_ID --cache-dir cache

1. The backbone's own batched speed: the server's compute path (preprocess, forward, pool) at its
   max batch, on the decoded noise images, in this process, before and after the server runs
   (the CPU may be shared: the two figures show how much it moved).
2. A server process; `--requests` single-image POSTs at each concurrency, from httpx clients in threads:
   - new images (random-noise PNGs, never in the cache): the network runs for every one;
   - cached images (the run's own training PNGs): answered from stored vectors.
3. The same new-image load at the highest concurrency against `--workers 2`.
Throughput, p50/p99 latency and errors go to docs/BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from featurecache.bench import noise_pngs, run_cli, run_encoder, write_digit_images, write_section

ROOT = Path(__file__).resolve().parents[1]


def make_run(cache: Path, env: dict, per_class: int) -> tuple[str, Path]:
    data = cache.parent / "digits"
    write_digit_images(data, per_class, classes=range(10))
    out = run_cli(["fit", "--data", str(data), "--model", "vgg16", "--weights", "random", "--size", "32",
                   "--head", "logreg", "--extract", "--json", "--quiet"], env).stdout
    return json.loads(out)["run_id"], data


def backbone(run_id: str, cache: Path, pngs: list[bytes], max_batch: int):
    """A function timing the server's own compute step (preprocess, forward, pool) at its max batch: the
    run's encoder, which is what the server runs images through."""
    encoder = run_encoder(run_id, cache)
    x = encoder.prepare(pngs[:max_batch]).pixels
    encoder.encode_pixels(x)  # warm-up, like the server's
    rounds = max(1, len(pngs) // max_batch)

    def images_per_second() -> float:
        t0 = time.perf_counter()
        for _ in range(rounds):
            encoder.encode_pixels(x)
        return rounds * max_batch / (time.perf_counter() - t0)

    return images_per_second


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_id: str, env: dict, max_batch: int, workers: int, log: Path):
    import httpx

    port = free_port()
    cmd = ["featurecache", "serve", "--run", run_id, "--port", str(port), "--max-batch", str(max_batch),
           "--workers", str(workers)]
    proc = subprocess.Popen([sys.executable, "-m", "featurecache.cli", *cmd[1:]], env=env, cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, shlex.join(cmd)
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"server not healthy:\n{log.read_text()[-3000:]}")


def measure(url: str, name: str, bodies: list[bytes], concurrency: int, warmup: int) -> dict:
    """Post each body once from `concurrency` threads (one keep-alive httpx client each), after a warm-up.

    Threads with sync clients, not httpx's async client: on this 2-core machine the async client's
    connection pool cost about 5 ms of CPU per request at concurrency 32 (1 ms with threads), CPU
    taken straight from the server under test.
    """
    import httpx

    local, clients = threading.local(), []

    def post(data):
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
            clients.append(local.client)
        t0 = time.perf_counter()
        try:
            ok = local.client.post(f"{url}/predict", files={"files": ("x.png", data, "image/png")}).status_code == 200
        except httpx.HTTPError:
            ok = False
        return time.perf_counter() - t0, ok

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, bodies[:warmup]))
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = list(pool.map(post, bodies[warmup:]))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for c in clients:
        c.close()
    ms = np.asarray([r[0] for r in results]) * 1000
    row = {"path": name, "concurrency": concurrency, "requests": len(results), "rps": len(results) / wall,
           "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
           "errors": sum(not r[1] for r in results), "client_cpu_ms": cpu / len(results) * 1000}
    print(f"{name:<7} c={concurrency:<3} {row['rps']:7.1f} req/s  p50 {row['p50']:7.1f} ms  p99 {row['p99']:7.1f} ms  "
          f"errors {row['errors']}  client {row['client_cpu_ms']:.2f} ms CPU/req", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| images | workers | concurrency | requests | images/s | p50 ms | p99 ms | errors | client CPU ms/req |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['workers']} | {r['concurrency']} | {r['requests']} | {r['rps']:.1f} | "
              f"{r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} | {r['client_cpu_ms']:.2f} |" for r in rows]
    return "\n".join(lines)


def serve_and_measure(run_id, env, args, workers, loads, log) -> tuple[list[dict], str]:
    proc, url, cmd = start_server(run_id, env, args.max_batch, workers, log)
    try:
        rows = [dict(measure(url, name, bodies, c, warmup=len(bodies) - args.requests), workers=workers)
                for name, bodies, c in loads]
    finally:
        proc.terminate()
        proc.wait(60)
    return rows, cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a fitted run (default: make one on digit PNGs)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    ap.add_argument("--requests", type=int, default=500, help="measured requests per concurrency")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--per-class", type=int, default=40, help="digit PNGs per class for the made run")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from featurecache.api import default_cache_dir

    cache = args.cache_dir or (default_cache_dir() if args.run else
                               Path(tempfile.mkdtemp(prefix="fc-serve-bench-")) / "cache")
    env = dict(os.environ, FEATURECACHE_DIR=str(cache), TF_CPP_MIN_LOG_LEVEL="3")
    load0 = os.getloadavg()
    if args.run:
        run_id, cached = args.run, []
    else:
        run_id, data = make_run(cache, env, args.per_class)
        cached = [p.read_bytes() for p in sorted(data.rglob("*.png"))]
    size = json.loads((cache / "runs" / run_id / "run.json").read_text())["size"]
    n = args.requests + 2 * max(levels)  # the first 2 x concurrency of each row warm up
    fresh = noise_pngs(n, size)
    speed = backbone(run_id, cache, fresh, args.max_batch)
    before = speed()
    print(f"backbone alone: {before:.1f} images/s at batch {args.max_batch}", flush=True)

    loads = [("new", fresh, c) for c in levels]
    if cached:
        loads += [("cached", (cached * (n // len(cached) + 1))[:n], c) for c in levels]
    log = cache.parent / "server.log"
    rows, cmd = serve_and_measure(run_id, env, args, 1, loads, log)
    more, cmd2 = serve_and_measure(run_id, env, args, 2, [("new", fresh, max(levels))], log)
    rows += more
    after = speed()
    load1 = os.getloadavg()

    top = next(r for r in rows if r["path"] == "new" and r["workers"] == 1 and r["concurrency"] == max(levels))
    body = f"""Command: `{shlex.join(["python", "scripts/bench_serve.py", *sys.argv[1:]])}`

Server: `{cmd}` (`--workers 2` for the last row). {os.cpu_count()} CPU cores shared by the server, the
client and whatever else ran: load average {load0[0]:.2f} before, {load1[0]:.2f} after. Run {run_id}.

Single-image multipart POSTs from httpx clients in threads (one keep-alive connection each) on
loopback; {args.requests} measured requests per row after a warm-up of {n - args.requests}. "new" images are
random-noise PNGs not in the cache, so the network runs for each; "cached" ones are the run's own
training PNGs, answered from the stored vectors.

Backbone alone (the server's preprocess + forward + pool at batch {args.max_batch}, same images):
**{before:.1f} images/s** before the load, **{after:.1f}** after. At concurrency {max(levels)} the server
delivers **{top['rps']:.1f} images/s**, {top['rps'] / ((before + after) / 2):.0%} of their mean.

{table(rows)}
"""
    print(body)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", "Serving (scripts/bench_serve.py)", body)


if __name__ == "__main__":
    main()
