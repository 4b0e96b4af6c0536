"""Engines side by side (run by `python scripts/bench_extract.py --engines`): images/s of every engine as
`--engine` offers it, vgg16 at 64 and efficientnet_lite0 at 224, against TensorFlow and against the matrix
product ceiling; int8 (OpenVINO, calibrated as `extract --precision int8` does). int8's accuracy cost is
measured on the whole Fashion-MNIST test set by `bench_extract.py --precisions`.

Each configuration is the encoder extraction itself uses (`featurecache.api.make_encoder`), timed on
decoded images: preprocessing, the network and pooling, not decoding. Fairness on a shared machine: every
configuration is measured in short bursts, round-robin, for several rounds, and its best round is kept, so
a burst of someone else's load hurts all alike.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from featurecache.api import ENGINES, DataOptions, FeatureSpec, RunSettings, extract_dataset, make_encoder
from featurecache.errors import FeatureCacheError

CASES = (("vgg16", "hed-bsds", 64, "block5_pool"), ("efficientnet_lite0", "imagenet", 224, "top_activation"))


def matmul_gflops(n: int = 4096, repeats: int = 3) -> float:
    """numpy float32 n x n x n product (BLAS, every core): the practical ceiling for dense convolution."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _time(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def case_spec(case) -> FeatureSpec:
    name, weights, size, tap = case
    return FeatureSpec(name, weights, (tap,), size=size)


def configurations(case, cache: Path, calibration: DataOptions, log) -> dict:
    """{label: (engine, precision, encoder)} for one network: each installed engine in float32, and OpenVINO
    int8 calibrated on `calibration`'s training images (the extraction that calibrates it runs first)."""
    spec = case_spec(case)
    configs = {}
    for engine in ENGINES:
        try:
            enc = make_encoder(spec, RunSettings(cache, engine=engine, log=log)).load()
        except FeatureCacheError as e:  # not installed here
            log(f"skip {engine}: {e}")
            continue
        configs[f"{enc.engine}, float32"] = (enc.engine, "float32", enc)
    int8 = replace(spec, precision="int8")
    ds = calibration.load()
    try:
        extract_dataset(ds, int8, RunSettings(cache, progress=False, log=log, engine="openvino"))
        enc = make_encoder(int8, RunSettings(cache, engine="openvino", log=log), train_ids=ds.train.images.ids).load()
        configs["openvino, int8 (nncf)"] = ("openvino", "int8", enc)
    except FeatureCacheError as e:
        log(f"skip int8: {e}")
    return configs


def measure(configs: dict, pixels: np.ndarray, images: int, rounds: int) -> dict[str, float]:
    """Best images/s of each configuration over `rounds` round-robin bursts of `images` images."""
    for _, _, enc in configs.values():
        enc.encode_pixels(pixels)  # warm-up: compilation, allocation
    best = {label: 0.0 for label in configs}
    for _ in range(rounds):
        for label, (_, _, enc) in configs.items():
            steps = max(1, images // len(pixels))
            seconds = _time(lambda: [enc.encode_pixels(pixels) for _ in range(steps)])
            best[label] = max(best[label], steps * len(pixels) / seconds)
    return best


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
