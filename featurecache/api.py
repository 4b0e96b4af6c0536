"""The Python API: the same steps the CLI runs, for scripts and notebooks.

    from featurecache.api import load_features
    X_train, y_train, X_test, y_test, classes = load_features("digits", model="vgg16", weights="hed-bsds")

    from featurecache.api import FeatureSpec, make_encoder
    enc = make_encoder(FeatureSpec("vgg16", "hed-bsds", ("block3_pool",), size=32))
    vectors = enc(["a.png", "b.jpg"])["block3_pool"]     # paths, bytes or uint8 arrays
    enc.description                                      # plain and picklable: .build() it elsewhere

`load_features` is the convenience face (plain keywords). Every other function takes the values the
CLI builds from its options: the data (a Dataset or images), a FeatureSpec (what shapes the vectors)
and a RunSettings (how the run goes: cache folder, engine, batch size, on-error policy, log).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .data.datasets import Dataset
from .engines import ENGINE_CHOICES, ENGINES  # noqa: F401  (public: the choice lists)
from .errors import FeatureCacheError
from .extraction.extract import Resolved, Summary, run_extract
from .data.datasets import DataOptions  # noqa: F401  (public values)
from .settings import (INT8_RECIPE, PRECISIONS, FeatureSpec, Precision, RunSettings, calibrated, default_cache_dir,
                       default_engine, resolve, spec_args)
from .store.sets import FeatureStore


def extract_dataset(ds: Dataset, spec: FeatureSpec, run: RunSettings) -> tuple[Resolved, Summary]:
    """Store the vectors of both splits of `ds` (see featurecache.extraction.extract.run_extract)."""
    return run_extract([ds.train.images, ds.test.images], spec, run, ds.native_size())


def dataset_features(ds: Dataset, spec: FeatureSpec, run: RunSettings, data: DataOptions | None = None,
                     compute: bool = False):
    """(resolved, X_train, X_test) for the single tap of `spec`, from the cache.

    With compute=False a missing feature set is an error that quotes the extract command to run (with
    `data`'s options, when given); with compute=True the missing vectors are extracted first. Images
    the set left out as unreadable (`extract --on-error skip`) are dropped from `ds` itself, so its
    labels stay aligned.
    """
    if len(spec.layers) > 1:
        raise FeatureCacheError("--layer: give one layer to fit on (extract accepts several)")
    spec = calibrated(spec, ds.train.images.ids)
    if compute:
        res, _ = extract_dataset(ds, spec, run)
    else:
        res = resolve(spec, ds.native_size(), run.cache_dir)
    layer = res.layers[0]
    fs = FeatureStore(run.cache_dir).get(res.set_ids[layer])
    dropped = ds.drop(fs.skipped()) if fs is not None else []
    if dropped:
        run.say(f"notice: left out {len(dropped)} unreadable image(s) that extraction skipped: "
                + ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else ""))
    ids = ds.train.images.ids + ds.test.images.ids
    lacking = len(ids) if fs is None else len(fs.missing(ids))
    if lacking:
        cmd = shlex.join(["featurecache", "extract", *(data.args() if data else ["--data", ds.name]),
                          *spec_args(spec, layer), *(["--cache-dir", str(run.cache_dir)]
                                                     if run.cache_dir != default_cache_dir() else [])])
        raise FeatureCacheError(f"no cached features for {lacking} of {len(ids)} images "
                                f"({spec.model}/{layer} at {res.size}px); run `{cmd}` or add --extract")
    return res, fs.gather(ds.train.images.ids), fs.gather(ds.test.images.ids)


def load_features(data: str = "digits", model: str = "vgg16", weights: str = "hed-bsds",
                  layer: str | None = None, pool: str = "flatten", size: int | None = None,
                  resize: str = "auto", preprocess: str = "auto", extract: bool = True,
                  cache_dir: str | Path | None = None, progress: bool = True, engine: str | None = None,
                  precision: str = "float32", **data_options):
    """(X_train, y_train, X_test, y_test, class_names) of one tap, extracting what is missing.

    The convenience face for scripts and notebooks: plain keywords, which it packs into the values
    (DataOptions, FeatureSpec, RunSettings) that every other function here takes.
    engine: one of featurecache.engines.ENGINE_CHOICES (what runs the network; same vectors; default
    $FEATURECACHE_ENGINE or auto); precision: one of settings.PRECISIONS (bf16 and int8 are feature sets
    of their own, int8 calibrated on the training images).
    """
    opts = DataOptions(data, **data_options)
    ds = opts.load()
    spec = FeatureSpec(model, weights, (layer,) if layer else (), pool, size, resize, preprocess,
                       precision=precision)
    run = RunSettings(Path(cache_dir) if cache_dir else default_cache_dir(), engine or default_engine(),
                      progress=progress)
    _, x_train, x_test = dataset_features(ds, spec, run, opts, compute=extract)
    return x_train, ds.train.labels, x_test, ds.test.labels, list(ds.class_names)


def make_encoder(spec: FeatureSpec, run: RunSettings | None = None, native_size: int | None = None,
                 train_ids: list[str] | None = None):
    """The encoder of `spec` (featurecache.encoding.encoder.Encoder): images -> {tap: vectors}, nothing stored.

    run: where the cache is, which engine runs the network, the on-error policy and the log (default:
    RunSettings(default_cache_dir())); native_size: the images' side when spec.size is None; train_ids:
    the training images' ids an int8 spec calibrates on (its graph must then be in the cache already, as
    `extract --precision int8` leaves it). The network is built on first use.
    """
    from .encoding.encoder import Encoder
    from .engines import choose

    run = run or RunSettings(default_cache_dir())
    spec = calibrated(spec, train_ids or []) if train_ids else spec
    choose(run.engine, spec.precision)
    return Encoder(resolve(spec, native_size, run.cache_dir), run.cache_dir, run.engine, run.on_error, log=run.log)


def encode_images(images, spec: FeatureSpec, run: RunSettings | None = None) -> dict:
    """{tap: (N, dims) float32} for `images` (paths, bytes or uint8 arrays), in batches of
    run.batch_size; nothing stored."""
    import numpy as np

    run = run or RunSettings(default_cache_dir())
    enc = make_encoder(spec, run)
    images = list(images)
    parts = [enc(images[k:k + run.batch_size]) for k in range(0, len(images), run.batch_size)]
    return {t: np.concatenate([p[t] for p in parts]) for t in enc.taps}


def time_engines(images, spec: FeatureSpec, run: RunSettings | None = None, engines=ENGINES,
                 rounds: int = 3) -> dict:
    """{engine: {"images_per_second", "setup_seconds"}} of each installed engine of `engines` on `images`
    (decoded once, outside the timing), in batches of run.batch_size: the best of `rounds` passes over
    them, after one warm-up batch. run.engine is not used: each engine of `engines` is timed."""
    import time
    from dataclasses import replace

    from .engines import installed

    run = run or RunSettings(default_cache_dir())
    batch_size = run.batch_size
    out = {}
    for engine in engines:
        if engine != "tensorflow" and not installed(engine):
            continue
        t0 = time.perf_counter()
        enc = make_encoder(spec, replace(run, engine=engine)).load()
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


def extract_views(ds: Dataset, spec: FeatureSpec, run: RunSettings, views, test_too: bool = False) -> list[Summary]:
    """Store the vectors of augmented views (featurecache/data/augment.py) of the training images, and of the
    test images only when `test_too` (test-time augmentation): views never reach test rows otherwise."""
    from dataclasses import replace

    from .data import augment

    sources = [ds.train.images, ds.test.images] if test_too else [ds.train.images]
    return [run_extract(sources, replace(spec, view=v), run, ds.native_size())[1] for v in augment.check(views)]
