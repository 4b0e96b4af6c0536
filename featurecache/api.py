"""The Python API: the same steps the CLI runs, for scripts and notebooks.

    from featurecache.api import load_features
    X_train, y_train, X_test, y_test, classes = load_features("digits", model="vgg16", weights="hed-bsds")
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .datasets import Dataset, load_dataset
from .errors import FeatureCacheError
from .extract import FeatureSpec, Resolved, Summary, calibrated, extract, resolve
from .store import FeatureStore


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEATURECACHE_DIR", "cache"))


def default_engine() -> str:
    """--engine's default: auto (the fastest installed engine), or $FEATURECACHE_ENGINE."""
    return os.environ.get("FEATURECACHE_ENGINE", "auto")


@dataclass(frozen=True)
class DataOptions:
    """How `--data` is read: everything that decides which images form train and test."""
    data: str
    data_dir: str | None = None
    test_size: float = 0.25
    seed: int = 0
    max_train: int | None = None
    max_test: int | None = None

    def load(self) -> Dataset:
        return load_dataset(self.data, self.data_dir, self.test_size, self.seed, self.max_train, self.max_test)

    def args(self) -> list[str]:
        out = ["--data", self.data]
        for flag, value, default in (("--data-dir", self.data_dir, None), ("--test-size", self.test_size, 0.25),
                                     ("--seed", self.seed, 0), ("--max-train", self.max_train, None),
                                     ("--max-test", self.max_test, None)):
            if value != default:
                out += [flag, str(value)]
        return out


def spec_args(spec: FeatureSpec, layer: str | None = None) -> list[str]:
    """The command-line options that reproduce `spec` (for hints and reports)."""
    out = ["--model", spec.model, "--weights", spec.weights]
    for name in ([layer] if layer else spec.layers):
        out += ["--layer", name]
    defaults = FeatureSpec(spec.model)
    for flag, attr in (("--pool", "pool"), ("--size", "size"), ("--resize", "resize"),
                       ("--preprocess", "preprocess"), ("--precision", "precision")):
        if getattr(spec, attr) != getattr(defaults, attr):
            out += [flag, str(getattr(spec, attr))]
    return out


def extract_dataset(ds: Dataset, spec: FeatureSpec, cache_dir: Path, batch_size: int = 64,
                    progress: bool = True, log=None, on_error: str = "fail",
                    engine: str | None = None) -> tuple[Resolved, Summary]:
    return extract([ds.train.images, ds.test.images], spec, cache_dir, ds.native_size(),
                   batch_size=batch_size, progress=progress, log=log, on_error=on_error,
                   engine=engine or default_engine())


def dataset_features(ds: Dataset, spec: FeatureSpec, cache_dir: Path, data: DataOptions | None = None,
                     compute: bool = False, batch_size: int = 64, progress: bool = True, log=None,
                     on_error: str = "fail", engine: str | None = None):
    """(resolved, X_train, X_test) for the single tap of `spec`, from the cache.

    With compute=False a missing feature set is an error that quotes the extract command to run;
    with compute=True the missing vectors are extracted first. Images the set left out as
    unreadable (`extract --on-error skip`) are dropped from `ds` itself, so its labels stay aligned.
    """
    if len(spec.layers) > 1:
        raise FeatureCacheError("--layer: give one layer to fit on (extract accepts several)")
    spec = calibrated(spec, ds.train.images.ids)
    if compute:
        res, _ = extract_dataset(ds, spec, cache_dir, batch_size, progress, log, on_error, engine)
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
                  resize: str = "nearest", preprocess: str = "auto", extract: bool = True,
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
