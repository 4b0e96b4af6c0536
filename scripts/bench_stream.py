"""A fit larger than the memory it may use: peak memory of `fit --head sgd --max-memory M` on a matrix ~2x M.

    python scripts/bench_stream.py --cache-dir /work/fmcache [--max-memory 700MB]

Reads features already stored (vgg16 hed-bsds block3_pool + block4_pool at 64 px, max2x2: 6,144 dims per
image; `featurecache extract --data fashion-mnist --model vgg16 --weights hed-bsds --size 64 --resize nearest
--layer block3_pool --layer block4_pool` first). Fits the same sgd head twice as a user would, in a child
process each: once streamed under --max-memory, once with the whole matrix in memory, and records each
child's peak resident memory next to the bound. Figures go to docs/BENCHMARKS.md ("Streaming fit").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from featurecache import bench

ROOT = Path(__file__).resolve().parents[1]
FIT = ["fit", "--data", "fashion-mnist", "--model", "vgg16", "--weights", "hed-bsds", "--size", "64", "--resize",
       "nearest", "--layer", "block3_pool", "--layer", "block4_pool", "--pool", "max2x2", "--head", "sgd", "--json"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--max-memory", default="700MB")
    p.add_argument("--max-train", type=int, help="a stratified subset (the matrix scales with it)")
    args = p.parse_args()
    fit = FIT + (["--max-train", str(args.max_train)] if args.max_train else [])
    env = dict(os.environ, FEATURECACHE_DIR=str(args.cache_dir))
    bound = bench.parse_size(args.max_memory, "--max-memory")
    rows = []
    for label, extra in (("streamed", ["--max-memory", args.max_memory]), ("in memory", [])):
        run = bench.run_cli(fit + extra, env=env)
        answer = json.loads(run.stdout)
        matrix = 4 * answer["dims"] * (answer["n_train"] + answer["n_test"])
        rows.append((label, extra, answer, matrix, run))
        print(f"{label}: peak RSS {run.peak_rss / 1e6:.0f} MB, matrix {matrix / 1e6:.0f} MB, "
              f"test {answer['test_accuracy']:.4f}, fit {answer['fit_seconds']:.1f} s", flush=True)
    lines = [f"Command: `python scripts/bench_stream.py --cache-dir {args.cache_dir} --max-memory {args.max_memory}"
             + (f" --max-train {args.max_train}" if args.max_train else "") + "` "
             f"on {bench.cpu_model()}, 2 cores shared with other jobs.",
             "", "| fit | --max-memory | matrix (train + test) | peak RSS of the fit process | within the bound | "
             "fit s | test acc |", "|---|---|---|---|---|---|---|"]
    for label, extra, answer, matrix, run in rows:
        within = "yes" if run.peak_rss <= bound else "no"
        lines.append(f"| {label} | {args.max_memory if extra else '-'} | {matrix / 1e6:,.0f} MB | "
                     f"{run.peak_rss / 1e6:,.0f} MB | {within if extra else '-'} | {answer['fit_seconds']:.1f} | "
                     f"{answer['test_accuracy']:.2%} |")
    lines += ["", "The command: `featurecache " + shlex.join(fit + ["--max-memory", args.max_memory]) + "`. Peak RSS "
              "is the child's own `ru_maxrss` (Python, scikit-learn and h5py included)."]
    bench.write_section(ROOT / "docs" / "BENCHMARKS.md", "Streaming fit", "\n".join(lines))


if __name__ == "__main__":
    main()
