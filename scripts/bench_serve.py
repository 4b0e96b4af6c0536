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
4. The token's cost: a server with `--token` beside two without (one of them a control, to show the
   noise floor), loaded in rotating turns at the highest concurrency: throughput and the server
   process's own CPU time per request.
5. `POST /embed`, 64 images per request, answered as JSON and as `application/x-npy`, for cached and
   new images (the client's parse of the answer counted in its latency).
6. The page's first load (`GET /`): its requests over HTTP, and, where Debian's chromium is
   installed, in headless Chromium with its cache off, until the run's facts are on screen.
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


def start_server(run_id: str, env: dict, max_batch: int, workers: int, log: Path, extra: tuple = ()):
    import httpx

    port = free_port()
    cmd = ["featurecache", "serve", "--run", run_id, "--port", str(port), "--max-batch", str(max_batch),
           "--workers", str(workers), *extra]
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (Linux /proc): the server's own work, whatever else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, name: str, bodies: list[bytes], concurrency: int, warmup: int, headers: dict | None = None,
            pid: int | None = None) -> dict:
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
            ok = local.client.post(f"{url}/predict", files={"files": ("x.png", data, "image/png")},
                                   headers=headers).status_code == 200
        except httpx.HTTPError:
            ok = False
        return time.perf_counter() - t0, ok

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, bodies[:warmup]))
        server0 = cpu_seconds(pid) if pid else 0.0
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = list(pool.map(post, bodies[warmup:]))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        server_cpu = cpu_seconds(pid) - server0 if pid else float("nan")
    for c in clients:
        c.close()
    ms = np.asarray([r[0] for r in results]) * 1000
    row = {"path": name, "concurrency": concurrency, "requests": len(results), "rps": len(results) / wall,
           "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
           "errors": sum(not r[1] for r in results), "client_cpu_ms": cpu / len(results) * 1000,
           "server_cpu_ms": server_cpu / len(results) * 1000}
    print(f"{name:<7} c={concurrency:<3} {row['rps']:7.1f} req/s  p50 {row['p50']:7.1f} ms  p99 {row['p99']:7.1f} ms  "
          f"errors {row['errors']}  client {row['client_cpu_ms']:.2f} ms CPU/req", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| images | workers | concurrency | requests | images/s | p50 ms | p99 ms | errors | client CPU ms/req |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['workers']} | {r['concurrency']} | {r['requests']} | {r['rps']:.1f} | "
              f"{r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} | {r['client_cpu_ms']:.2f} |" for r in rows]
    return "\n".join(lines)


def serve_and_measure(run_id, env, args, workers, loads, log, then=None) -> tuple[list[dict], str, object]:
    """The rows of `loads` on one server; then `then(url)` on the same server, if given."""
    proc, url, cmd = start_server(run_id, env, args.max_batch, workers, log)
    try:
        rows = [dict(measure(url, name, bodies, c, warmup=len(bodies) - args.requests), workers=workers)
                for name, bodies, c in loads]
        more = then(url) if then else None
    finally:
        proc.terminate()
        proc.wait(60)
    return rows, cmd, more


# ---- the token's cost ------------------------------------------------------------------------------
TOKEN = "bench-token-0123456789"


def token_cost(run_id, env, args, loads, log_dir: Path) -> tuple[list[dict], str]:
    """Three servers of the run side by side: open, with a token, and open again (the control: what two
    identical servers differ by on this machine). Loaded in turns, the order rotating each round;
    per path, each round's figure of the token server and of the control over the open one measured
    next to it (paired, so drift in the shared CPU cancels), and the medians of those changes."""
    procs, servers, cmd = [], [], ""
    try:
        for label, extra in (("open", ()), ("token", ("--token", TOKEN)), ("control", ())):
            proc, url, this_cmd = start_server(run_id, env, args.max_batch, 1, log_dir / f"server-{label}.log", extra)
            procs.append(proc)
            servers.append((label, url, {"Authorization": f"Bearer {TOKEN}"} if extra else None, proc.pid))
            cmd = this_cmd if extra else cmd
        got: dict = {}
        for k in range(args.token_rounds):
            order = servers[k % 3:] + servers[:k % 3]
            for name, bodies, c in loads:
                for label, url, headers, pid in order:
                    row = measure(url, f"{name}/{label}", bodies, c, len(bodies) - args.requests, headers, pid)
                    got.setdefault((name, c), {}).setdefault(label, []).append(row)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
    out = []
    for (name, c), by in got.items():
        for label in ("token", "control"):
            changes = {key: [b[key] / a[key] - 1 for a, b in zip(by["open"], by[label])]
                       for key in ("rps", "server_cpu_ms")}
            out.append({"path": name, "concurrency": c, "rounds": args.token_rounds, "server": label,
                        "open_rps": float(np.median([r["rps"] for r in by["open"]])),
                        "rps": float(np.median([r["rps"] for r in by[label]])),
                        "open_cpu": float(np.median([r["server_cpu_ms"] for r in by["open"]])),
                        "cpu": float(np.median([r["server_cpu_ms"] for r in by[label]])),
                        **{f"{key}_change": float(np.median(v)) for key, v in changes.items()},
                        **{f"{key}_range": (min(v), max(v)) for key, v in changes.items()},
                        "errors": sum(r["errors"] for r in by[label])})
    return out, cmd


def token_table(rows: list[dict]) -> str:
    lines = ["| images | concurrency | rounds | server vs open | images/s open | this | change (rounds' range) | "
             "server CPU ms/req open | this | change (rounds' range) | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    what = {"token": "with `--token`", "control": "open again (control)"}
    lines += [f"| {r['path']} | {r['concurrency']} | {r['rounds']} | {what[r['server']]} | {r['open_rps']:.1f} | "
              f"{r['rps']:.1f} | {r['rps_change']:+.1%} ({r['rps_range'][0]:+.1%} .. {r['rps_range'][1]:+.1%}) | "
              f"{r['open_cpu']:.2f} | {r['cpu']:.2f} | **{r['server_cpu_ms_change']:+.1%}** "
              f"({r['server_cpu_ms_range'][0]:+.1%} .. {r['server_cpu_ms_range'][1]:+.1%}) | {r['errors']} |"
              for r in rows]
    return "\n".join(lines)


# ---- /embed ------------------------------------------------------------------------------------------
def embed_row(url: str, name: str, images: list[bytes], npy: bool, per_request: int, requests: int,
              concurrency: int) -> dict:
    """`requests` POST /embed of `per_request` images each (after one warm-up per thread); the client
    parses every answer (json.loads, or np.load), as a real one would."""
    import io

    import httpx

    accept = {"Accept": "application/x-npy"} if npy else {}
    batches = [[images[(k * per_request + j) % len(images)] for j in range(per_request)]
               for k in range(requests + concurrency)]
    local, clients = threading.local(), []

    def post(batch):
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=300)
            clients.append(local.client)
        files = [("files", (f"{j}.png", data, "image/png")) for j, data in enumerate(batch)]
        t0 = time.perf_counter()
        r = local.client.post(f"{url}/embed", files=files, headers=accept)
        ok = r.status_code == 200
        if ok:
            rows = np.load(io.BytesIO(r.content)) if npy else json.loads(r.content)["embeddings"]
            ok = len(rows) == len(batch)
        return time.perf_counter() - t0, ok, len(r.content)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, batches[:concurrency]))
        t0 = time.perf_counter()
        results = list(pool.map(post, batches[concurrency:]))
        wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    ms = np.asarray([r[0] for r in results]) * 1000
    row = {"path": name, "format": "npy" if npy else "JSON", "concurrency": concurrency, "requests": requests,
           "per_request": per_request, "images_per_s": requests * per_request / wall,
           "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
           "mb": float(np.mean([r[2] for r in results])) / 1e6, "errors": sum(not r[1] for r in results)}
    print(f"embed {name:<6} {row['format']:<4} c={concurrency} {row['images_per_s']:7.1f} images/s  "
          f"p50 {row['p50']:7.1f} ms  {row['mb']:.2f} MB/answer  errors {row['errors']}", flush=True)
    return row


def embed_table(rows: list[dict]) -> str:
    lines = ["| images | answer | concurrency | requests x images | images/s | p50 ms/request | p99 ms | MB/answer | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['format']} | {r['concurrency']} | {r['requests']} x {r['per_request']} | "
              f"{r['images_per_s']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['mb']:.2f} | {r['errors']} |"
              for r in rows]
    return "\n".join(lines)


# ---- the page ----------------------------------------------------------------------------------------
PAGE_REQUESTS = ["/", "/static/app.js", "/static/style.css", "/runs", "/info"]


def page_load(url: str, loads: int) -> dict:
    """First-load figures of `GET /`: the page's own requests over a fresh connection each time, and
    headless Chromium (cache off) until the run's facts are on screen, where chromium is installed."""
    import httpx

    http_ms, sizes = [], []
    for _ in range(loads):
        with httpx.Client(timeout=30) as client:
            t0 = time.perf_counter()
            sizes = [len(client.get(f"{url}{path}").content) for path in PAGE_REQUESTS]
            http_ms.append((time.perf_counter() - t0) * 1000)
    out = {"bytes": sum(sizes[:3]), "api_bytes": sum(sizes[3:]), "http_ms": float(np.median(http_ms))}
    chromium, driver_path = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not (chromium.exists() and driver_path.exists()):
        out["browser"] = "chromium not installed (apt-get install chromium chromium-driver)"
        return out
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='fc-bench-chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(driver_path)), options=options)
    ready, loaded = [], []
    version = driver.capabilities.get("browserVersion", "?")
    try:
        driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})  # every load a first load
        for _ in range(loads + 1):  # the first warms Chromium itself up, and is left out
            driver.get(f"{url}/")
            mark = "return performance.getEntriesByName('featurecache:ready').map(e => e.startTime)[0]"
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(mark) is not None)
            ready.append(driver.execute_script(mark))
            loaded.append(driver.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd"))
    finally:
        driver.quit()
    out.update(browser=f"Chromium {version}", load_ms=float(np.median(loaded[1:])), ready_ms=float(np.median(ready[1:])))
    return out


def token_verdict(rows: list[dict]) -> str:
    by = {(r["path"], r["server"]): r for r in rows}
    new_token, new_control = by.get(("new", "token")), by.get(("new", "control"))
    if not (new_token and new_control):
        return ""
    cpu, floor = new_token["server_cpu_ms_change"], abs(new_control["server_cpu_ms_change"])
    verdict = (f"within the control's {floor:.1%}, so below what this machine can resolve" if abs(cpu) <= floor else
               f"beyond the control's {floor:.1%}")
    return (f"On `/predict` with new images (the network runs) at concurrency {new_token['concurrency']}, the token "
            f"server spent **{cpu:+.1%}** CPU per request against the open one, {verdict}; throughput moved "
            f"{new_token['rps_change']:+.1%} with the token and {new_control['rps_change']:+.1%} for the control.")


def page_line(page: dict, loads: int) -> str:
    if "load_ms" not in page:
        return f"In a browser: not measured, {page['browser']}."
    return (f"In headless {page['browser']} with its cache off (every load a first load; median of {loads} after "
            f"one warm-up): the load event at **{page['load_ms']:.0f} ms**, the run's facts on screen (after "
            f"`/runs` and `/info`) at **{page['ready_ms']:.0f} ms**.")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "CPU model unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a fitted run (default: make one on digit PNGs)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    ap.add_argument("--requests", type=int, default=500, help="measured requests per concurrency")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--per-class", type=int, default=40, help="digit PNGs per class for the made run")
    ap.add_argument("--token-rounds", type=int, default=6, help="rounds of the token's cost (open, token, control)")
    ap.add_argument("--embed-requests", type=int, default=8, help="measured /embed requests per row")
    ap.add_argument("--embed-images", type=int, default=64, help="images per /embed request")
    ap.add_argument("--embed-concurrency", type=int, default=2)
    ap.add_argument("--page-loads", type=int, default=5, help="first loads of the page to take the median of")
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
    embed_sources = [("cached", cached), ("new", fresh)] if cached else [("new", fresh)]

    def embed_and_page(url):
        embeds = [embed_row(url, name, images, npy, args.embed_images, args.embed_requests, args.embed_concurrency)
                  for name, images in embed_sources for npy in (False, True)]
        return embeds, page_load(url, args.page_loads)

    rows, cmd, (embeds, page) = serve_and_measure(run_id, env, args, 1, loads, log, embed_and_page)
    more, cmd2, _ = serve_and_measure(run_id, env, args, 2, [("new", fresh, max(levels))], log)
    rows += more
    token_rows, token_cmd = token_cost(run_id, env, args, [load for load in loads if load[2] == max(levels)],
                                       cache.parent)
    after = speed()
    load1 = os.getloadavg()

    top = next(r for r in rows if r["path"] == "new" and r["workers"] == 1 and r["concurrency"] == max(levels))
    body = f"""Command: `{shlex.join(["python", "scripts/bench_serve.py", *sys.argv[1:]])}`

Server: `{cmd}` (`--workers 2` for the last row). {os.cpu_count()} CPU cores ({cpu_model()}) shared by the
server, the client and whatever else ran: load average {load0[0]:.2f} before, {load1[0]:.2f} after. Run {run_id}.

Single-image multipart POSTs from httpx clients in threads (one keep-alive connection each) on
loopback; {args.requests} measured requests per row after a warm-up of {n - args.requests}. "new" images are
random-noise PNGs not in the cache, so the network runs for each; "cached" ones are the run's own
training PNGs, answered from the stored vectors.

Backbone alone (the server's preprocess + forward + pool at batch {args.max_batch}, same images):
**{before:.1f} images/s** before the load, **{after:.1f}** after. At concurrency {max(levels)} the server
delivers **{top['rps']:.1f} images/s**, {top['rps'] / ((before + after) / 2):.0%} of their mean.

{table(rows)}

### The token's cost

`{token_cmd}` beside two servers of the same run without `--token` ("open", and "open again" as
the control: the difference two identical servers show on this machine, the noise floor), loaded in
turns at concurrency {max(levels)} with the order rotating each round, {args.token_rounds} rounds of the rows above.
Each change is the median over the rounds of that server's figure over the open one measured next to
it. Server CPU is the server process's own (utime + stime from /proc) per request: other load on the
machine moves it far less than throughput. The check is one SHA-256 of the presented token and
`hmac.compare_digest` against the stored digest, in a plain ASGI middleware before the body is read.

{token_verdict(token_rows)}

{token_table(token_rows)}

### POST /embed

{args.embed_images} images per request, {args.embed_requests} measured requests per row after one warm-up per thread, at
concurrency {args.embed_concurrency}; "JSON" is the default answer, "npy" the answer to `Accept: application/x-npy`
(numpy.save bytes of float32 rows). The latency includes the client's parse of the answer.

{embed_table(embeds)}

### The page's first load

Its own requests ({", ".join(f"`{p}`" for p in PAGE_REQUESTS)}) over a fresh connection: {page["bytes"] / 1024:.1f} KiB of
HTML, JavaScript and CSS plus {page["api_bytes"] / 1024:.1f} KiB of JSON, **{page["http_ms"]:.1f} ms** (median of {args.page_loads}).
{page_line(page, args.page_loads)}
"""
    print(body)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", "Serving (scripts/bench_serve.py)", body)


if __name__ == "__main__":
    main()
