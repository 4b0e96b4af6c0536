"""Decode cost under load: a real `featurecache serve` on 127.0.0.1 sent concurrent requests of 4096x4096 PNGs.

    python scripts/bench_decode_budget.py                  # makes a run: digits PNGs, vgg16 random weights, 32px
    python scripts/bench_decode_budget.py --write-docs     # and writes the section of docs/RELIABILITY.md

A 16 KB PNG may declare 4096x4096 pixels (~0.2 s of CPU and ~120 MB to decode). Two loads, each
`--requests` POST /predict at once from threads, while the server's RSS is sampled every 50 ms from
/proc and /health is asked every 100 ms:
1. the red team's: `--red-images` (default 256) distinct such PNGs per request: refused from the files'
   headers (413: over the per-request pixel budget) before any pixel is decoded;
2. within the default budget: 4 distinct such PNGs per request, each sent twice (the repeat is decoded
   once): every one decoded, at most one decode per core in flight across requests.
Bounded: 2 x `--requests` requests, every one with a timeout, loopback only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from featurecache.bench import run_cli, write_digit_images, write_section

ROOT = Path(__file__).resolve().parents[1]
SIDE = 4096


def flat_png() -> bytes:
    """A flat grey 4096x4096 PNG: ~16 KB on the wire, 16.8 Mpx decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (SIDE, SIDE), 128).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def tagged(base: bytes, k: int) -> bytes:
    """`base` with a tEXt chunk naming k before IEND: the same pixels, distinct bytes (so a distinct content
    hash, decoded anew), without encoding 256 large images."""
    text = b"k\x00" + str(k).encode()
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    return base[:-12] + chunk + base[-12:]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, pid: int, bodies: list[list[tuple[str, bytes]]], name: str) -> dict:
    """Send `bodies` at once; sample the server's RSS and /health meanwhile (and 3 s after)."""
    import httpx

    samples, health, done = [], [], threading.Event()

    def watch():
        while not done.is_set():
            samples.append(rss(pid))
            time.sleep(0.05)

    def ask():
        while not done.is_set():
            t = time.perf_counter()
            try:
                code = httpx.get(f"{url}/health", timeout=30).status_code
            except httpx.TransportError:
                code = 0
            health.append((code, time.perf_counter() - t))
            time.sleep(0.1)

    def post(files):
        r = httpx.post(f"{url}/predict", files=[("files", (n, d, "image/png")) for n, d in files], timeout=600)
        return r.status_code

    start_rss, cpu0, t0 = rss(pid), cpu_seconds(pid), time.perf_counter()
    watchers = [threading.Thread(target=watch), threading.Thread(target=ask)]
    for w in watchers:
        w.start()
    with ThreadPoolExecutor(len(bodies)) as pool:
        codes = list(pool.map(post, bodies))
    wall = time.perf_counter() - t0
    time.sleep(3)
    done.set()
    for w in watchers:
        w.join()
    return {"load": name, "requests": len(bodies), "files_per_request": len(bodies[0]),
            "body_mb": sum(len(d) for _, d in bodies[0]) / 1e6,
            "statuses": {str(c): codes.count(c) for c in set(codes)},
            "wall_s": wall, "server_cpu_s": cpu_seconds(pid) - cpu0, "rss_start_mb": start_rss / 2**20,
            "rss_peak_mb": max(samples) / 2**20, "rss_after_mb": rss(pid) / 2**20,
            "health_asked": len(health), "health_ok": sum(c == 200 for c, _ in health),
            "health_slowest_s": max(s for _, s in health)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--red-images", type=int, default=256)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.requests <= 64:
        sys.exit("--requests: 1..64 (a bounded load)")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        env = dict(os.environ, FEATURECACHE_DIR=str(cache), TF_CPP_MIN_LOG_LEVEL="3")
        data = Path(tmp) / "digits"
        write_digit_images(data, 10)
        run_id = json.loads(run_cli(["fit", "--data", str(data), "--model", "vgg16", "--weights", "random", "--size",
                                     "32", "--head", "logreg", "--extract", "--json", "--quiet"], env).stdout)["run_id"]
        port = free_port()
        cmd = ["featurecache", "serve", "--run", run_id, "--port", str(port)]
        log = Path(tmp) / "server.log"
        proc = subprocess.Popen([sys.executable, "-m", "featurecache.cli", *cmd[1:]], env=env, cwd=ROOT,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx

            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"server did not start:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.3)
            base = flat_png()
            pngs = [tagged(base, k) for k in range(max(args.red_images, 4 * args.requests))]
            red = [[(f"r{j}-{k}.png", pngs[k]) for k in range(args.red_images)] for j in range(args.requests)]
            ok = [[(f"b{j}-{k}.png", pngs[(4 * j + k % 4) % len(pngs)]) for k in range(8)]
                  for j in range(args.requests)]
            rows = [load(url, proc.pid, red, f"{args.red_images} distinct PNGs each (the red team's)"),
                    load(url, proc.pid, ok, "4 distinct PNGs each, each sent twice (within the budget)")]
            info = httpx.get(f"{url}/info", timeout=30).json()["decoding"]
        finally:
            proc.terminate()
            proc.wait(30)
    for r in rows:
        print(json.dumps(r))
    print(json.dumps(info))
    table = ["| load | requests at once | files / request | body | answers | wall | server CPU | RSS before | "
             "RSS peak | RSS 3 s after | /health answered |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['load']} | {r['requests']} | {r['files_per_request']} | {r['body_mb']:.1f} MB | "
              f"{', '.join(f'{n} x {c}' for c, n in sorted(r['statuses'].items()))} | {r['wall_s']:.1f} s | "
              f"{r['server_cpu_s']:.1f} s | {r['rss_start_mb']:.0f} MB | **{r['rss_peak_mb']:.0f} MB** | "
              f"{r['rss_after_mb']:.0f} MB | {r['health_ok']}/{r['health_asked']} "
              f"(slowest {r['health_slowest_s']:.2f} s) |"
              for r in rows]
    body = (f"Command: `python scripts/bench_decode_budget.py --requests {args.requests} --write-docs` "
            f"({shlex.join(cmd[:3])} RUN with the default limits; vgg16, random weights, 32 px; {cpu_name()}, "
            f"{os.cpu_count()} cores). Each PNG is a flat 4096x4096 grey image of "
            f"{len(pngs[0]) / 1e3:.0f} KB; RSS sampled every 50 ms from /proc, /health asked every 100 ms.\n\n"
            + "\n".join(table) + f"\n\nDecoding over both loads: {info['images_decoded']} images decoded, "
            f"{info['repeats_reused']} repeats answered by their original's decode, at most "
            f"{info['in_flight_peak']} decodes in flight (limit {info['in_flight_limit']}, one per core).\n")
    print(body)
    if args.write_docs:
        write_section(ROOT / "docs" / "RELIABILITY.md", "Decode cost under load", body)


if __name__ == "__main__":
    main()
