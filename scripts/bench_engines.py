"""Engines side by side (run by `python scripts/bench_extract.py --engines`): images/s of every engine
in one process, vgg16 at 64 and efficientnet_lite0 at 224, against TensorFlow and against the matrix
product ceiling; the tuning alternatives; a per-layer profile; int8's accuracy cost on Fashion-MNIST.

Fairness on a shared machine: every configuration is measured in short bursts, round-robin, for
several rounds, and its best round is kept, so a burst of someone else's load hurts all alike.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from featurecache.backbones import get_backbone, preprocess
from featurecache.backbones.build import build_model
from featurecache.backbones.weights import resolve_weights
from featurecache.engines import graphs, runtimes
from featurecache.extract import forward_fn

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


def conv_flops(model, tap: str) -> float:
    """FLOPs (2 per multiply-add) of the convolutions up to `tap`, per image; the rest is noise."""
    total = 0.0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in ("Conv2D", "DepthwiseConv2D"):
            _, h, w, c_out = layer.output.shape
            kh, kw, c_in = layer.get_weights()[0].shape[:3]
            total += 2.0 * h * w * kh * kw * (c_in * c_out if kind == "Conv2D" else c_in)
        if layer.name == tap:
            break
    return total


def configurations(case, cache: Path, log) -> tuple[dict, object, float]:
    """{label: (engine, precision, forward)} for one network, plus its model and FLOPs per image."""
    name, weights, size, tap = case
    backbone = get_backbone(name)
    w = resolve_weights(backbone, weights, cache_dir=cache)
    model = build_model(backbone, w, size)
    onnx_path = graphs.graph("onnxruntime", model, name, w.id, size, [tap], cache, log=log)
    ir = graphs.graph("openvino", model, name, w.id, size, [tap], cache, log=log)
    configs = {"tensorflow (Keras, tf.function)": ("tensorflow", "float32", forward_fn(model, [tap]))}
    for streams, chunk in ((1, None), (2, 8), (2, 16), (2, 32)):
        label = (f"onnxruntime, {streams} streams x 1 thread, chunks of {chunk}" if streams > 1
                 else "onnxruntime, 1 session x 2 threads")
        configs[label] = ("onnxruntime", "float32",
                          runtimes.onnxruntime_forward(onnx_path, [tap], streams=streams, chunk=chunk or 16))
    configs["openvino, LATENCY hint (1 stream x 2 threads)"] = (
        "openvino", "float32", runtimes.openvino_forward(ir, [tap], hint="LATENCY"))
    for chunk in (8, 16, 32):
        configs[f"openvino, THROUGHPUT, 2 streams, chunks of {chunk}"] = (
            "openvino", "float32", runtimes.openvino_forward(ir, [tap], chunk=chunk))
    return configs, model, conv_flops(model, tap)


def add_int8(configs: dict, case, cache: Path, calibration: np.ndarray, log) -> None:
    name, weights, size, tap = case
    backbone = get_backbone(name)
    w = resolve_weights(backbone, weights, cache_dir=cache)
    model = build_model(backbone, w, size)
    xml = graphs.graph("openvino", model, name, w.id, size, [tap], cache, "int8", "bench",
                       lambda: calibration, log)
    for chunk in (8, 16):
        configs[f"openvino int8 (nncf), THROUGHPUT, 2 streams, chunks of {chunk}"] = (
            "openvino", "int8", runtimes.openvino_forward(xml, [tap], chunk=chunk))


def measure(configs: dict, x: np.ndarray, images: int, rounds: int) -> dict[str, float]:
    """Best images/s of each configuration over `rounds` round-robin bursts of `images` images."""
    for _, _, f in configs.values():
        f(x)  # warm-up: compilation, allocation
    best = {label: 0.0 for label in configs}
    for _ in range(rounds):
        for label, (_, _, f) in configs.items():
            steps = max(1, images // len(x))
            seconds = _time(lambda: [f(x) for _ in range(steps)])
            best[label] = max(best[label], steps * len(x) / seconds)
    return best


def profile(xml: Path, tap: str, x: np.ndarray, top: int = 8) -> list[tuple[str, float, float]]:
    """OpenVINO's per-layer counters on one LATENCY pass: (layer type, ms, share), largest first."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY",
                                                         "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    request.infer({0: x})
    request.infer({0: x})
    by_type: dict[str, float] = {}
    for info in request.get_profiling_info():
        key = f"{info.node_type} ({info.exec_type})"
        by_type[key] = by_type.get(key, 0.0) + info.real_time.total_seconds() * 1e3
    total = sum(by_type.values())
    return [(k, v, v / total) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])[:top]]


def int8_accuracy(n_train: int, n_test: int, cache: Path, log) -> dict:
    """linsvc test accuracy on vgg16 hed-bsds block5_pool at 64: float32 vs int8 features."""
    from featurecache.api import DataOptions, dataset_features
    from featurecache.extract import FeatureSpec
    from featurecache.heads import make_pipeline

    opts = DataOptions("fashion-mnist", max_train=n_train, max_test=n_test)
    ds = opts.load()
    out = {}
    for precision in ("float32", "int8"):
        spec = FeatureSpec("vgg16", "hed-bsds", ("block5_pool",), size=64, precision=precision)
        t0 = time.perf_counter()
        _, x_train, x_test = dataset_features(ds, spec, cache, opts, compute=True, progress=False, log=log)
        seconds = time.perf_counter() - t0
        pipe = make_pipeline("linsvc", {}, "l2", None).fit(x_train, ds.train.labels)
        out[precision] = {"accuracy": float((pipe.predict(x_test) == ds.test.labels).mean()),
                          "extract_seconds": seconds}
    return out


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
