"""Are vectors bit-identical when the same image is computed in another batch, position or thread count?
Written to docs/RELIABILITY.md.

    python scripts/bench_determinism.py [--write-docs]

vgg16 (seeded random weights) at 32 px, block5_pool, 60 digits; the reference is batch size 8 in order.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from featurecache.api import DataOptions, FeatureSpec, RunSettings, make_encoder
from featurecache.bench import write_section

ROOT = Path(__file__).resolve().parents[1]


def vectors() -> dict:
    """{case: (n, 512) vectors in dataset order} computed in this process, by the encoder extraction uses."""
    import tempfile

    ds = DataOptions("digits", max_train=60, max_test=30).load()
    spec = FeatureSpec("vgg16", "random", ("block5_pool",), size=32)
    enc = make_encoder(spec, RunSettings(Path(tempfile.mkdtemp()), engine="tensorflow"))
    x = enc.prepare([ds.train.images.load(k) for k in range(60)]).pixels

    def run(bs, order):
        out = np.empty((60, 512), np.float32)
        for k in range(0, 60, bs):
            rows = order[k:k + bs]
            out[rows] = enc.encode_pixels(x[rows])["block5_pool"]
        return out

    ident = np.arange(60)
    perm = np.random.default_rng(0).permutation(60)
    return {"reference": run(8, ident), "bs1": run(1, ident), "bs1-shuffled": run(1, perm),
            "bs7": run(7, ident), "bs16": run(16, ident), "bs60": run(60, ident), "bs8-shuffled": run(8, perm)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:  # a fresh process, perhaps with other thread settings
        np.savez(a.child, **vectors())
        return
    here = vectors()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"determinism-{os.getpid()}"
    runs = {}
    for k, (name, extra) in enumerate((("another process", {}), ("1 intra-op thread", {"TF_NUM_INTRAOP_THREADS": "1"}))):
        path = f"{out}-{k}.npz"
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra)
        subprocess.run([sys.executable, __file__, "--child", path], env=env, check=True)
        with np.load(path) as z:
            runs[name] = dict(z)
        os.unlink(path)
    ref = here["reference"]
    alone = here["bs1"]
    cases = [("batch size 8, same order, another process", runs["another process"]["reference"], ref),
             ("alone (batch size 1), shuffled order, vs alone in order", here["bs1-shuffled"], alone),
             ("alone, another process, vs alone here", runs["another process"]["bs1"], alone),
             ("alone, vs in batches of 8", alone, ref),
             ("batch size 7", here["bs7"], ref), ("batch size 16", here["bs16"], ref),
             ("batch size 60", here["bs60"], ref),
             ("batch size 8, shuffled (other batch positions)", here["bs8-shuffled"], ref),
             ("batch size 8, 1 intra-op thread", runs["1 intra-op thread"]["reference"], ref)]
    rows = [f"| {name} | {'yes' if np.array_equal(v, base) else 'no'} | {np.abs(v - base).max():.2g} |"
            for name, v, base in cases]
    body = f"""Command: `python scripts/bench_determinism.py --write-docs` (vgg16, seeded random weights, 32 px,
block5_pool, 60 digits, TensorFlow on CPU; largest value {np.abs(ref).max():.2f}). Compared with batch size 8, in order, unless said.

| the same images computed ... | bit-identical? | max abs difference |
|---|---|---|
{chr(10).join(rows)}

The key rightly leaves batch size, position and thread count out (the differences are ~1 ulp), but a
resumed run -- which batches different images together -- cannot be compared bit for bit unless every
image is computed alone. The chaos run therefore uses `--batch-size 1` and demands bit equality;
`cache verify --data` compares with a tolerance of 1e-4 of the row's largest value."""
    print(body)
    if a.write_docs:
        write_section(ROOT / "docs" / "RELIABILITY.md", "Are vectors bit-identical between runs?", body)


if __name__ == "__main__":
    main()
