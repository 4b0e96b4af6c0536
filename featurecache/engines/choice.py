"""What `--engine auto` runs: a GPU engine when one is visible, else the engine measured fastest on
this machine for this model, size and taps, remembered in <cache>/engines/choice.json.

The fixed order (engines.AUTO_ORDER) was measured on one CPU; on another the winner changed (OpenVINO
beat ONNX Runtime by 7-18% on an AVX-512 machine, docs/BENCHMARKS.md). So auto times a short warm-up
of every installed engine on the user's own graph and keeps the fastest. A measurement costs a
conversion per engine and a few batches each (seconds to tens of seconds), so it is made where it
pays: by `plan`, and by an extraction of at least MEASURE_FROM images; smaller jobs use what is
remembered, else the fixed order. The record is keyed by the machine (CPU model and flags, cores,
engine library versions): when any of those change, or the file is unreadable, it is measured again,
with a notice. Writing is atomic (temporary file, rename); a lost race only costs a measurement.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .. import versions
from ..fingerprint import key_id

RECORD = "choice.json"
FORMAT = 1
MEASURE_FROM = 2000  # images to compute from which an extraction measures (a measurement: ~5-30 s)
ROUNDS = 3  # timed passes per engine, taking turns
# CPU flags that decide which kernels the engines pick; the rest (virtualisation, bug flags) do not.
_KERNEL_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                 "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile", "neon", "asimd", "sve")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    """(CPU model name, flags) from /proc/cpuinfo; ("", {}) where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", frozenset()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name, frozenset(flags)


def cpu_flags() -> frozenset:
    return _cpuinfo()[1]


def has_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (AVX512_BF16 or AMX), which OpenVINO's
    bf16 inference precision needs to be faster rather than emulated."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def machine() -> dict:
    """What a measured choice depends on: the CPU, the cores this process may use, the engines' versions."""
    from .runtimes import threads

    name, flags = _cpuinfo()
    return {"cpu": name, "flags": sorted(f for f in flags if f in _KERNEL_FLAGS), "cores": threads(),
            "libraries": versions.library_versions("onnxruntime", "openvino", "tensorflow")}


def machine_id() -> str:
    return key_id(machine())


def nvidia_present() -> bool:
    """A cheap look for an NVIDIA driver, so machines without one never import a GPU runtime to ask."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def gpu_engine(installed: Callable[[str], bool]) -> str | None:
    """The engine that runs on a visible NVIDIA GPU: ONNX Runtime with its CUDA provider (the
    `featurecache[gpu]` extra), else TensorFlow when it lists a GPU; None when none is visible."""
    if not nvidia_present():
        return None
    if installed("onnxruntime"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return "onnxruntime"
    try:
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return "tensorflow"
    except ImportError:
        pass
    return None


def record_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / "engines" / RECORD


def workload_id(graph, precision: str) -> str:
    return key_id({"graph": graph.parts(), "precision": precision})


def read(cache_dir: Path, log=None) -> dict:
    """This machine's record ({"machine", "machine_id", "choices"}): a fresh one when the file is absent,
    unreadable (with a notice) or written on another machine or library versions (with a notice)."""
    path, mid = record_path(cache_dir), machine_id()
    fresh = {"format": FORMAT, "machine_id": mid, "machine": machine(), "choices": {}}
    if not path.is_file():
        return fresh
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT or not isinstance(record.get("choices"), dict):
            raise ValueError("not a choice record")
    except (OSError, ValueError, AttributeError) as e:
        _say(log, f"notice: {path} is unreadable ({type(e).__name__}); measuring the engines again")
        return fresh
    if record.get("machine_id") != mid:
        _say(log, f"notice: the CPU, cores or engine versions changed since {path} was written; "
                  "measuring the engines again")
        return fresh
    return record


def remembered(cache_dir: Path, graph, precision: str = "float32") -> dict | None:
    """The measured entry of this graph on this machine ({"engine", "images_per_second", "measured_at"}),
    or None; reads only, never measures, never says anything."""
    path = record_path(cache_dir)
    try:
        record = json.loads(path.read_text())
        if record.get("machine_id") == machine_id():
            return record["choices"].get(workload_id(graph, precision))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return None


def _write(cache_dir: Path, record: dict) -> None:
    path = record_path(cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the choice is still made, only not remembered


def pick(cache_dir: Path, graph, candidates: list[str], rate: Callable[[str], float | None], measure: bool,
         fallback: str, precision: str = "float32", log=None) -> str:
    """The engine auto runs: the remembered choice of this graph on this machine; else, when `measure`,
    `rate(engine)` (images/s, None where the engine cannot run it) of every candidate, best kept and
    remembered; else `fallback` (the fixed order's first). `rate` is called ROUNDS times per engine."""
    if len(candidates) < 2:
        return candidates[0] if candidates else fallback
    if not measure:
        entry = remembered(cache_dir, graph, precision)
        return entry["engine"] if entry and entry.get("engine") in candidates else fallback
    record, wid = read(cache_dir, log), workload_id(graph, precision)
    entry = record["choices"].get(wid)
    if isinstance(entry, dict) and entry.get("engine") in candidates:
        return entry["engine"]
    # Rounds taking turns (order reversed every other round), median kept: other jobs' load moves within
    # seconds, and each engine should meet the same share of it.
    runs: dict[str, list[float]] = {e: [] for e in candidates}
    for r in range(ROUNDS):
        for engine in (candidates if r % 2 == 0 else candidates[::-1]):
            if r == 0 or runs[engine]:
                ips = rate(engine)
                if ips:
                    runs[engine].append(ips)
    rates = {e: round(sorted(v)[len(v) // 2], 1) for e, v in runs.items() if v}
    if not rates:
        return fallback
    best = max(rates, key=rates.get)
    record["choices"][wid] = {"engine": best, "images_per_second": rates, "measured_at": time.time(),
                              "model": graph.model, "size": graph.size, "taps": sorted(graph.taps)}
    _write(cache_dir, record)
    _say(log, f"notice: auto measured {graph.model} {graph.size}px on this machine: "
              + ", ".join(f"{e} {r} images/s" for e, r in sorted(rates.items(), key=lambda x: -x[1]))
              + f"; using {best} (remembered in {record_path(cache_dir)})")
    return best


def _say(log, msg: str) -> None:
    if log:
        log(msg)
