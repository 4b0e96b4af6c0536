"""Extraction benchmark: images/s, cache-hit time and peak memory, written to docs/BENCHMARKS.md.

    python scripts/bench_extract.py                 # the full run (60,000 Fashion-MNIST images at 64px)
    python scripts/bench_extract.py --n 5000        # a quicker run; the table says which n was used

1. Throughput of vgg16 (random weights: speed does not depend on them) at 32 and 64 px.
2. Peak RSS of `featurecache extract` on n Fashion-MNIST 28x28 images upsized to 64 (a subprocess,
   measured by the kernel's maxrss): memory must not grow with the dataset.
3. The rerun of that exact command: a cache hit, timed end to end (process start included).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from docs_section import write_section  # noqa: E402


def throughput(size: int, n: int, batch_size: int) -> float:
    """Images/s of the compiled forward pass plus preprocessing, after one warm-up batch."""
    import numpy as np

    from featurecache.backbones import get_backbone, preprocess
    from featurecache.backbones.build import build_model
    from featurecache.backbones.weights import resolve_weights
    from featurecache.extract import forward_fn

    b = get_backbone("vgg16")
    model = build_model(b, resolve_weights(b, "random"), size)
    fwd = forward_fn(model, ["block5_pool"])
    x = np.random.default_rng(0).integers(0, 255, (batch_size, size, size, 3), dtype=np.uint8)
    fwd(preprocess(x, "caffe"))
    t0 = time.perf_counter()
    for _ in range(n // batch_size):
        fwd(preprocess(x, "caffe"))
    return (n // batch_size) * batch_size / (time.perf_counter() - t0)


def run_cli(args: list[str], env: dict) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the child, stdout) of one featurecache command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "featurecache.cli", *args], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"featurecache {shlex.join(args)} failed ({proc.returncode})")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, (peak if peak > before else 0) * 1024, proc.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60000, help="Fashion-MNIST train images for memory and cache hit")
    ap.add_argument("--n-test", type=int, default=10000, help="Fashion-MNIST test images extracted with them")
    ap.add_argument("--weights", default="hed-bsds", help="weights of the memory run (its cache is reusable)")
    ap.add_argument("--layers", default="block3_pool,block4_pool,block5_pool", help="taps of the memory run")
    ap.add_argument("--speed-images", type=int, default=512, help="images per throughput measurement")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()

    rows = []
    for size in (32, 64):
        ips = throughput(size, args.speed_images, args.batch_size)
        rows.append((f"vgg16 -> block5_pool at {size}px, batch {args.batch_size}", f"{ips:.1f} images/s"))
        print(rows[-1])

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="fc-bench-"))
    env = dict(os.environ, FEATURECACHE_DIR=str(cache), TF_CPP_MIN_LOG_LEVEL="3")
    layers = [a for name in args.layers.split(",") for a in ("--layer", name)]
    cmd = ["extract", "--data", "fashion-mnist", "--max-train", str(args.n), "--max-test", str(args.n_test),
           "--model", "vgg16", "--weights", args.weights, *layers, "--size", "64",
           "--batch-size", str(args.batch_size), "--quiet"]
    seconds, peak, out = run_cli(cmd, env)
    print(out)
    n_total = args.n + args.n_test
    rows.append((f"extract {n_total:,} Fashion-MNIST 28x28 images upsized to 64 (vgg16 {args.weights}, "
                 f"{len(layers) // 2} taps {args.layers} flattened, one pass)",
                 f"{seconds:.0f} s, {n_total / seconds:.1f} images/s, peak RSS {peak / 2**30:.2f} GiB"))
    hit_seconds, hit_peak, out = run_cli(cmd, env)
    assert "cache hit" in out, out
    rows.append((f"cache hit, same command, {n_total:,} images (process start to exit)",
                 f"{hit_seconds:.2f} s, peak RSS {hit_peak / 2**30:.2f} GiB"))
    for r in rows[-2:]:
        print(r)

    table = "\n".join(["| measurement | figure |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])
    body = (f"Command: `python scripts/bench_extract.py {shlex.join(sys.argv[1:])}`".rstrip() + "\n\n"
            f"Machine: {os.cpu_count()} cores, TensorFlow engine. Targets: cache hit for 60,000 images "
            "under 2 s; peak RSS under 2 GB while extracting 60,000 images upsized to 64.\n\n" + table)
    if not args.no_write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", "Extraction (scripts/bench_extract.py)", body)


if __name__ == "__main__":
    main()
