"""Engines: what runs a backbone's forward pass (TensorFlow, ONNX Runtime or OpenVINO).

Every engine gets the same preprocessed NHWC batch and returns the same NHWC tap outputs, so the
engine is not part of a feature set's key: parity tests (tests/engines/test_engines.py) hold each engine to
1e-4 of the feature scale against TensorFlow on every tap. Precision is part of the key: bf16 and int8
vectors are different feature sets, each run by OpenVINO. `auto` runs a visible GPU's engine, else the
engine measured fastest on this machine for the graph (choice.py), else the first installed engine
of AUTO_ORDER.

Conversion (Keras -> ONNX -> OpenVINO IR, and int8 calibration) happens once per (model, weights,
taps, size, precision) and is cached under <cache>/engines/<key>/ (see graphs.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import FeatureCacheError
from ..settings import BF16_ENGINE, INT8_ENGINE, Precision
from . import choice
from .runtimes import threads  # noqa: F401  (every core this process may use)

# The engines, declared once: --engine's choices (featurecache/cli/options.py), `featurecache.toml`'s check of
# them (config.py asks the option) and the API's defaults all read these.
ENGINES = ("tensorflow", "onnxruntime", "openvino")
ENGINE_CHOICES = ("auto", *ENGINES)
# Fastest first: in docs/BENCHMARKS.md (Engines), ONNX Runtime with one 1-thread stream per core beat
# OpenVINO's best setting on both vgg16 at 64 and efficientnet_lite0 at 224, and both beat TensorFlow.
AUTO_ORDER = ("onnxruntime", "openvino", "tensorflow")
# Python modules each engine needs (the ONNX exporter needs onnx for both converted engines).
_NEEDS = {"tensorflow": ("tensorflow",), "onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
_PIP = {"tensorflow": "tensorflow", "onnxruntime": "onnxruntime onnx", "openvino": "openvino onnx",
        "nncf": "nncf"}


def installed(engine: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in _NEEDS[engine])


def choose(engine: str, precision: str = "float32") -> str:
    """The engine that will run: `auto` resolved, an explicit choice checked (one line if unusable)."""
    Precision(precision)  # an unknown name fails here, in one line
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
    if precision == "bf16":
        if engine not in ("auto", BF16_ENGINE):
            raise FeatureCacheError(f"--engine {engine}: --precision bf16 runs on {BF16_ENGINE} only; "
                                    f"use --engine auto or --engine {BF16_ENGINE}")
        if not choice.has_bf16():
            raise FeatureCacheError("--precision bf16: this CPU has neither AVX512_BF16 nor AMX (no bfloat16 "
                                    "arithmetic); use --precision float32, or int8")
        if not installed(BF16_ENGINE):
            raise FeatureCacheError(f"--engine {BF16_ENGINE}: --precision bf16 needs it, and it is not installed; "
                                    f"run `pip install {_PIP[BF16_ENGINE]}`")
        return BF16_ENGINE
    if engine == "auto":
        return next(e for e in AUTO_ORDER if installed(e) or e == "tensorflow")
    if not installed(engine):
        raise FeatureCacheError(f"--engine {engine}: not installed; run `pip install {_PIP[engine]}` "
                                "or use --engine auto")
    return engine


@dataclass(frozen=True)
class Forward:
    """One engine's forward pass: preprocessed NHWC float32 batch -> [NHWC output per tap], numpy."""
    engine: str  # what runs it (auto resolved; tensorflow where a conversion fell back)
    taps: tuple[str, ...]
    run: Callable[[np.ndarray], list[np.ndarray]]
    device: str = "cpu"  # or "gpu" (auto on a machine with a visible NVIDIA GPU)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.run(x)


def make_forward(option: str, model, graph, cache_dir: Path, precision: Precision = Precision(),
                 calibration_images=None, log=None, measure: bool = False) -> Forward:
    """The forward pass of `graph` (engines.graphs.Graph: model, weights, size, taps) for `--engine option`.
    `model`: the Keras model, or a function that builds it (built only if a conversion or TensorFlow needs it).

    With `auto`, a model the exporter cannot convert runs on TensorFlow with a notice (same vectors);
    an engine named explicitly fails in one line instead. `calibration_images()` gives the int8
    calibration batch when the int8 graph is not cached yet. `measure`: auto may time every installed
    engine on this graph when this machine has no remembered choice for it (choice.py).
    """
    engine = choose(option, precision.name)
    if option != "auto" or precision.name != "float32":
        return _build(engine, option, model, graph, cache_dir, precision, calibration_images, log)
    gpu = choice.gpu_engine(installed)
    if gpu:
        return _build(gpu, option, model, graph, cache_dir, precision, calibration_images, log, device="gpu")
    built: dict[str, Forward] = {}

    def rate(name: str) -> float | None:
        """Images/s of one timed pass (the first call builds the engine and runs a warm-up pass)."""
        first = name not in built
        if first:
            try:
                built[name] = _build(name, "timing", model, graph, cache_dir, precision, None, log)
            except FeatureCacheError:
                return None
        return images_per_second(built[name], graph.size, warm=first) if built[name].engine == name else None

    candidates = [e for e in AUTO_ORDER if installed(e) or e == "tensorflow"]
    chosen = choice.pick(cache_dir, graph, candidates, rate, measure, engine, precision.name, log)
    return built.get(chosen) or _build(chosen, option, model, graph, cache_dir, precision, calibration_images, log)


def _probe(size: int, batch: int = 32) -> np.ndarray:
    """Values do not change a forward's speed: seeded random pixels in the network's input range stand in.
    32 images: four chunks of 8, so every engine's streams are busy as in an extraction."""
    return np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def images_per_second(fwd: Forward, size: int, warm: bool = True) -> float:
    """Images/s of one timed pass over the probe batch (after a warm-up pass, which builds the engine's
    kernels, unless `warm` is False because one already ran)."""
    import time

    x = _probe(size)
    if warm:
        fwd(x)
    t0 = time.perf_counter()
    fwd(x)
    return len(x) / (time.perf_counter() - t0)


def _build(engine: str, option: str, model, graph, cache_dir: Path, precision: Precision, calibration_images,
           log, device: str = "cpu") -> Forward:
    from . import graphs
    from .tensorflow import tensorflow_forward

    taps = list(graph.taps)
    if engine == "tensorflow":
        return Forward(engine, graph.taps, tensorflow_forward(graphs.built(model), taps), device)
    from . import runtimes
    from .onnx_export import Unsupported

    try:
        path = graphs.convert(engine, model, graph, cache_dir, precision, calibration_images, log)
    except Unsupported as e:
        if option == "timing":
            raise FeatureCacheError(str(e)) from None
        if option != "auto" or precision.name != "float32":
            flag = f"--precision {precision.name}" if precision.name != "float32" else f"--engine {engine}"
            raise FeatureCacheError(f"{flag}: cannot convert {graph.model} ({e}); use --engine tensorflow"
                                    + (" --precision float32" if precision.name != "float32" else "")) from None
        if log:
            log(f"notice: {engine} cannot run {graph.model} ({e}); using tensorflow (same vectors)")
        return Forward("tensorflow", graph.taps, tensorflow_forward(graphs.built(model), taps))
    settings = {"precision": "bf16"} if precision.bf16 else {"device": "gpu"} if device == "gpu" else {}
    return Forward(engine, graph.taps, runtimes.forward(engine, path, taps, **settings), device)
