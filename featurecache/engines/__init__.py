"""Engines: what runs a backbone's forward pass (TensorFlow, ONNX Runtime or OpenVINO).

Every engine gets the same preprocessed NHWC batch and returns the same NHWC tap outputs, so the
engine is not part of a feature set's key: parity tests (tests/test_engines.py) hold each engine to
1e-4 of the feature scale against TensorFlow on every tap. Precision is part of the key: int8 vectors
are a different feature set. `auto` takes the first installed engine of AUTO_ORDER, the order measured
by scripts/bench_extract.py (docs/BENCHMARKS.md).

Conversion (Keras -> ONNX -> OpenVINO IR, and int8 calibration) happens once per (model, weights,
taps, size, precision) and is cached under <cache>/engines/<key>/ (see graphs.py).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import FeatureCacheError

ENGINES = ("tensorflow", "onnxruntime", "openvino")
ENGINE_CHOICES = ("auto", *ENGINES)
# Fastest first: in docs/BENCHMARKS.md (Engines), ONNX Runtime with one 1-thread stream per core beat
# OpenVINO's best setting on both vgg16 at 64 and efficientnet_lite0 at 224, and both beat TensorFlow.
AUTO_ORDER = ("onnxruntime", "openvino", "tensorflow")
PRECISIONS = ("float32", "int8")
INT8_ENGINE = "openvino"  # nncf's post-training quantisation targets OpenVINO's int8 kernels
# Python modules each engine needs (the ONNX exporter needs onnx for both converted engines).
_NEEDS = {"tensorflow": ("tensorflow",), "onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
_PIP = {"tensorflow": "tensorflow", "onnxruntime": "onnxruntime onnx", "openvino": "openvino onnx",
        "nncf": "nncf"}


def installed(engine: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in _NEEDS[engine])


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise FeatureCacheError(f"--precision {precision}: unknown; use one of {', '.join(PRECISIONS)}")
    return precision


def choose(engine: str, precision: str = "float32") -> str:
    """The engine that will run: `auto` resolved, an explicit choice checked (one line if unusable)."""
    check_precision(precision)
    if engine not in ENGINE_CHOICES:
        raise FeatureCacheError(f"--engine {engine}: unknown; use one of {', '.join(ENGINE_CHOICES)}")
    if precision == "int8":
        if engine not in ("auto", INT8_ENGINE):
            raise FeatureCacheError(f"--engine {engine}: --precision int8 runs on {INT8_ENGINE} only; "
                                    f"use --engine auto or --engine {INT8_ENGINE}")
        for name, modules in ((INT8_ENGINE, _NEEDS[INT8_ENGINE]), ("nncf", ("nncf",))):
            if not all(importlib.util.find_spec(m) for m in modules):
                raise FeatureCacheError(f"--engine {INT8_ENGINE}: --precision int8 needs {name}, which is not "
                                        f"installed; run `pip install {_PIP[name]}`")
        return INT8_ENGINE
    if engine == "auto":
        return next(e for e in AUTO_ORDER if installed(e) or e == "tensorflow")
    if not installed(engine):
        raise FeatureCacheError(f"--engine {engine}: not installed; run `pip install {_PIP[engine]}` "
                                "or use --engine auto")
    return engine


def precision_key(precision: str, calibration: str = "") -> str:
    """The key's `precision` part: float32 keeps the historic "fp32" so existing sets stay valid;
    int8 names its engine and calibration sample, both of which move the vectors."""
    check_precision(precision)
    return "fp32" if precision == "float32" else f"int8-{INT8_ENGINE}-{calibration}"


def threads() -> int:
    """Every core this process may use (cgroup and affinity limits included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_forward(option: str, model, backbone, weights, size: int, taps: list[str], cache_dir: Path,
                 precision: str = "float32", calibration: str = "", calibration_images=None, log=None):
    """(engine used, forward(preprocessed NHWC batch) -> [NHWC output per tap]) for `--engine option`.

    With `auto`, a model the exporter cannot convert runs on TensorFlow with a notice (same vectors);
    an engine named explicitly fails in one line instead. `calibration_images()` gives the int8
    calibration batch when the int8 graph is not cached yet.
    """
    from ..extract import forward_fn

    engine = choose(option, precision)
    if engine == "tensorflow":
        return engine, forward_fn(model, taps)
    from . import graphs, runtimes
    from .onnx_export import Unsupported

    try:
        path = graphs.graph(engine, model, backbone.name, weights.id, size, taps, cache_dir, precision, calibration,
                            calibration_images, log)
    except Unsupported as e:
        if option != "auto" or precision == "int8":
            flag = "--precision int8" if precision == "int8" else f"--engine {engine}"
            raise FeatureCacheError(f"{flag}: cannot convert {backbone.name} ({e}); use --engine tensorflow"
                                    + (" --precision float32" if precision == "int8" else "")) from None
        if log:
            log(f"notice: {engine} cannot run {backbone.name} ({e}); using tensorflow (same vectors)")
        return "tensorflow", forward_fn(model, taps)
    return engine, runtimes.forward(engine, path, taps)
