"""The Python API: the same steps the CLI runs, for scripts and notebooks.

    from featurecache.api import load_features
    X_train, y_train, X_test, y_test, classes = load_features("digits", model="vgg16", weights="hed-bsds")

    from featurecache.api import FeatureSpec, make_encoder
    enc = make_encoder(FeatureSpec("vgg16", "hed-bsds", ("block3_pool",), size=32))
    vectors = enc(["a.png", "b.jpg"])["block3_pool"]     # paths, bytes or uint8 arrays
    enc.description                                      # plain and picklable: .build() it elsewhere
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .datasets import Dataset
from .errors import FeatureCacheError
from .extract import Resolved, Summary, extract
from .datasets import DataOptions  # noqa: F401  (public values)
from .settings import (INT8_RECIPE, FeatureSpec, Precision, RunSettings, calibrated, default_cache_dir,  # noqa: F401
                       default_engine, resolve, spec_args)
from .store import FeatureStore


def extract_dataset(ds: Dataset, spec: FeatureSpec, cache_dir: Path, batch_size: int = 64,
                    progress: bool = True, log=None, on_error: str = "fail",
                    engine: str | None = None, executor: str = "local", cluster=None) -> tuple[Resolved, Summary]:
    """Store the vectors of both splits of `ds` (see featurecache.extract.run_extract). executor:
    local | ray, with `cluster` (featurecache.cluster.ClusterSettings) saying where and how wide."""
    return extract([ds.train.images, ds.test.images], spec, cache_dir, ds.native_size(),
                   batch_size=batch_size, progress=progress, log=log, on_error=on_error,
                   engine=engine or default_engine(), executor=executor, cluster=cluster)


def dataset_features(ds: Dataset, spec: FeatureSpec, cache_dir: Path, data: DataOptions | None = None,
                     compute: bool = False, batch_size: int = 64, progress: bool = True, log=None,
                     on_error: str = "fail", engine: str | None = None, executor: str = "local", cluster=None):
    """(resolved, X_train, X_test) for the single tap of `spec`, from the cache.

    With compute=False a missing feature set is an error that quotes the extract command to run;
    with compute=True the missing vectors are extracted first. Images the set left out as
    unreadable (`extract --on-error skip`) are dropped from `ds` itself, so its labels stay aligned.
    """
    if len(spec.layers) > 1:
        raise FeatureCacheError("--layer: give one layer to fit on (extract accepts several)")
    spec = calibrated(spec, ds.train.images.ids)
    if compute:
        res, _ = extract_dataset(ds, spec, cache_dir, batch_size, progress, log, on_error, engine, executor, cluster)
    else:
        res = resolve(spec, ds.native_size(), cache_dir)
    layer = res.layers[0]
    fs = FeatureStore(cache_dir).get(res.set_ids[layer])
    dropped = ds.drop(fs.skipped()) if fs is not None else []
    if dropped:
        say = log or (lambda m: print(m, file=sys.stderr))
        say(f"notice: left out {len(dropped)} unreadable image(s) that extraction skipped: "
            + ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else ""))
    ids = ds.train.images.ids + ds.test.images.ids
    lacking = len(ids) if fs is None else len(fs.missing(ids))
    if lacking:
        cmd = shlex.join(["featurecache", "extract", *(data.args() if data else ["--data", ds.name]),
                          *spec_args(spec, layer), *(["--cache-dir", str(cache_dir)]
                                                     if cache_dir != default_cache_dir() else [])])
        raise FeatureCacheError(f"no cached features for {lacking} of {len(ids)} images "
                                f"({spec.model}/{layer} at {res.size}px); run `{cmd}` or add --extract")
    return res, fs.gather(ds.train.images.ids), fs.gather(ds.test.images.ids)


def load_features(data: str = "digits", model: str = "vgg16", weights: str = "hed-bsds",
                  layer: str | None = None, pool: str = "flatten", size: int | None = None,
                  resize: str = "auto", preprocess: str = "auto", extract: bool = True,
                  cache_dir: str | Path | None = None, progress: bool = True, engine: str | None = None,
                  precision: str = "float32", **data_options):
    """(X_train, y_train, X_test, y_test, class_names) of one tap, extracting what is missing.

    engine: auto | tensorflow | onnxruntime | openvino (what runs the network; same vectors);
    precision: float32 | int8 (int8 is a different feature set, calibrated on the training images).
    """
    opts = DataOptions(data, **data_options)
    ds = opts.load()
    spec = FeatureSpec(model, weights, (layer,) if layer else (), pool, size, resize, preprocess,
                       precision=precision)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    _, x_train, x_test = dataset_features(ds, spec, cache, opts, compute=extract, progress=progress, engine=engine)
    return x_train, ds.train.labels, x_test, ds.test.labels, list(ds.class_names)


def make_encoder(spec: FeatureSpec, cache_dir: str | Path | None = None, engine: str | None = None,
                 on_error: str = "fail", native_size: int | None = None, train_ids: list[str] | None = None,
                 log=None):
    """The encoder of `spec` (featurecache.encoder.Encoder): images -> {tap: vectors}, nothing stored.

    engine: auto | tensorflow | onnxruntime | openvino (default: $FEATURECACHE_ENGINE or auto);
    on_error: fail | skip; native_size: the images' side when spec.size is None; train_ids: the
    training images' ids an int8 spec calibrates on (its graph must then be in the cache already, as
    `extract --precision int8` leaves it). The network is built on first use.
    """
    from .encoder import Encoder
    from .engines import choose

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    spec = calibrated(spec, train_ids or []) if train_ids else spec
    engine = engine or default_engine()
    choose(engine, spec.precision)
    return Encoder(resolve(spec, native_size, cache), cache, engine, on_error, log=log)


def encode_images(images, spec: FeatureSpec, cache_dir: str | Path | None = None, engine: str | None = None,
                  batch_size: int = 64, log=None) -> dict:
    """{tap: (N, dims) float32} for `images` (paths, bytes or uint8 arrays), in batches; nothing stored."""
    import numpy as np

    enc = make_encoder(spec, cache_dir, engine, log=log)
    images = list(images)
    parts = [enc(images[k:k + batch_size]) for k in range(0, len(images), batch_size)]
    return {t: np.concatenate([p[t] for p in parts]) for t in enc.taps}


def time_engines(spec: FeatureSpec, images, engines=("tensorflow", "onnxruntime", "openvino"),
                 cache_dir: str | Path | None = None, batch_size: int = 64, rounds: int = 3, log=None) -> dict:
    """{engine: {"images_per_second", "setup_seconds"}} of each installed engine on `images` (decoded
    once, outside the timing): the best of `rounds` passes over them, after one warm-up batch."""
    import time

    from .engines import installed

    out = {}
    for engine in engines:
        if engine != "tensorflow" and not installed(engine):
            continue
        t0 = time.perf_counter()
        enc = make_encoder(spec, cache_dir, engine, log=log).load()
        batch = enc.prepare(list(images))
        enc.encode_pixels(batch.pixels[:batch_size])  # compilation and allocation, not steady state
        setup = time.perf_counter() - t0
        best = 0.0
        for _ in range(rounds):
            t1 = time.perf_counter()
            for k in range(0, len(batch), batch_size):
                enc.encode_pixels(batch.pixels[k:k + batch_size])
            best = max(best, len(batch) / (time.perf_counter() - t1))
        out[enc.engine] = {"images_per_second": round(best, 1), "setup_seconds": round(setup, 2)}
    return out


def extract_views(ds: Dataset, spec: FeatureSpec, views, run: RunSettings, test_too: bool = False) -> list[Summary]:
    """Store the vectors of augmented views (featurecache/augment.py) of the training images, and of the
    test images only when `test_too` (test-time augmentation): views never reach test rows otherwise."""
    from dataclasses import replace

    from . import augment
    from .extract import run_extract

    sources = [ds.train.images, ds.test.images] if test_too else [ds.train.images]
    return [run_extract(sources, replace(spec, view=v), run, ds.native_size())[1] for v in augment.check(views)]
