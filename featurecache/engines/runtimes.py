"""Running a cached graph on ONNX Runtime or OpenVINO, with thread settings chosen by measurement.

Both engines are fastest here with one stream per core: each core runs a whole chunk of images
through the network on its own (no per-layer fork/join between cores, caches hold one chunk's
activations), rather than every layer split across cores. scripts/bench_extract.py measures the
alternatives side by side; the defaults below are its winners on the 2-core benchmark machine.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import graphs
from .onnx_export import INPUT, output_name

CHUNK = 8  # images per stream request: measured best (or tied) among 8, 16, 32 for ONNX Runtime


def threads() -> int:
    """Every core this process may use (cgroup and affinity limits included), or $FEATURECACHE_THREADS
    where a scheduler gave this process fewer (a Ray actor's reserved CPUs)."""
    given = os.environ.get("FEATURECACHE_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _chunks(x: np.ndarray, chunk: int) -> list[np.ndarray]:
    return [x[k:k + chunk] for k in range(0, len(x), chunk)]


def onnxruntime_forward(path, taps: list[str], streams: int | None = None, chunk: int = CHUNK,
                        level: str = "all", device: str = "cpu"):
    """streams sessions' worth of parallelism: one 1-thread session run from `streams` threads at
    once (ORT's run is thread-safe), or one session using every core when streams == 1.
    device="gpu": one session on CUDA (whole batches; the GPU is the parallelism), CPU for what CUDA lacks."""
    import onnxruntime as ort

    streams = 1 if device == "gpu" else streams or threads()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1 if streams > 1 else threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "gpu" else ["CPUExecutionProvider"]
    session = graphs.load(path, lambda p: ort.InferenceSession(str(p), so, providers=providers))
    names = [output_name(t) for t in taps]
    pool = ThreadPoolExecutor(streams) if streams > 1 else None

    def run(x):
        return session.run(names, {INPUT: x})

    def forward(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if pool is None:
            return run(x)
        parts = list(pool.map(run, _chunks(x, chunk)))
        return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]

    return forward


def openvino_config(hint: str = "THROUGHPUT", streams: int | None = None, precision: str = "f32") -> dict:
    """OpenVINO CPU settings: `threads()` threads in `streams` streams (one per core by default)."""
    config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads()}
    if os.environ.get("FEATURECACHE_THREADS"):
        # Given fewer cores than the machine has (a Ray actor), OpenVINO would still pin its threads to the
        # first cores: two 1-thread actors then shared core 0 at half speed each (measured: each actor at 53%
        # of a core, 0.53x in-process). Let the OS place them.
        config["ENABLE_CPU_PINNING"] = False
    if hint == "THROUGHPUT":
        config["NUM_STREAMS"] = streams or threads()
    return config


def openvino_forward(path, taps: list[str], hint: str = "THROUGHPUT", streams: int | None = None,
                     chunk: int = CHUNK, precision: str = "f32"):
    """OpenVINO's CPU streams kept busy: a batch is cut into chunks, handed round-robin to one infer
    request per stream. No Python callbacks: OpenVINO would run them (and any garbage collection
    they trigger, which can destroy a request queue from its own thread) on its worker threads.
    precision: the inference precision hint, f32 (float32 parity) or bf16 (--precision bf16; the
    graph and its outputs stay float32, the arithmetic is rounded to bfloat16)."""
    import openvino as ov

    config = openvino_config(hint, streams, precision)
    compiled = graphs.load(path, lambda p: ov.Core().compile_model(str(p), "CPU", config))
    outputs = [compiled.output(output_name(t)) for t in taps]
    requests = [compiled.create_infer_request()
                for _ in range(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))]

    def forward(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = _chunks(x, chunk) if len(requests) > 1 else [x]
        results = [None] * len(parts)

        def collect(k):
            request = requests[k % len(requests)]
            request.wait()
            results[k] = [request.get_tensor(o).data.copy() for o in outputs]

        for k, part in enumerate(parts):
            if k >= len(requests):
                collect(k - len(requests))  # its request is free again once that chunk is in
            requests[k % len(requests)].start_async({0: part})
        for k in range(max(len(parts) - len(requests), 0), len(parts)):
            collect(k)
        return [np.concatenate([r[j] for r in results]) for j in range(len(outputs))]

    return forward


def forward(engine: str, path, taps: list[str], **settings):
    if engine == "onnxruntime":
        return onnxruntime_forward(path, taps, **settings)
    return openvino_forward(path, taps, **settings)
