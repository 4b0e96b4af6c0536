"""The converted-graph cache: <cache>/engines/<graph id>/ per (model, weights, size, taps).

    model.onnx                         the float32 graph (onnx_export), run by ONNX Runtime
    openvino-<ver>.xml/.bin            the same graph as OpenVINO IR (weights kept in float32)
    int8-<calibration>.onnx            nncf's int8 QDQ graph, calibrated on a sample of the user's images
                                       (OpenVINO runs it; `export` embeds it). int8-<sample>-openvino-<ver>:
                                       the first recipe's IR, still read
    meta.json                          what the id was made from

Each file is written under a temporary name and renamed into place (the .bin before its .xml), so a
killed conversion leaves nothing half-written, and two processes converting at once both end with a
complete file. Conversion happens once; later builds only read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import versions
from ..errors import FeatureCacheError
from ..fingerprint import key_id
from ..settings import Precision, is_current
from . import onnx_export


@dataclass(frozen=True)
class Graph:
    """What a converted graph is made from: the network, its weights, the input size and the taps."""
    model: str
    weights_id: str
    size: int
    taps: tuple[str, ...]

    def parts(self) -> dict:
        return {"format": onnx_export.FORMAT, "opset": onnx_export.OPSET, "model": self.model,
                "weights": self.weights_id, "size": int(self.size), "taps": sorted(self.taps)}

    def folder(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / "engines" / key_id(self.parts(), spacing=True)


def graph_parts(model_name: str, weights_id: str, size: int, taps: list[str]) -> dict:
    return Graph(model_name, weights_id, size, tuple(taps)).parts()


def graph_dir(cache_dir: Path, parts: dict) -> Path:
    return Path(cache_dir) / "engines" / key_id(parts, spacing=True)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def built(model):
    """The Keras model from `model`: the model itself, or a function that builds it. A function is called
    only where a graph must be converted (or TensorFlow runs it), so a process whose graphs are cached
    (a Ray actor, `predict`, `serve`) never builds the network or imports TensorFlow for it."""
    return model() if callable(model) and not hasattr(model, "layers") else model


def _onnx(folder: Path, model, taps: list[str], log) -> Path:
    path = folder / "model.onnx"
    if not path.is_file():
        model = built(model)
        proto = onnx_export.export(model, sorted(taps))
        folder.mkdir(parents=True, exist_ok=True)
        tmp = _tmp(path)
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, path)
        if log:
            log(f"notice: converted {model.name} ({', '.join(sorted(taps))}) to ONNX once: {folder}")
    return path


def _save_ir(ov_model, xml: Path) -> None:
    import openvino as ov

    tmp = xml.with_name(f".tmp{os.getpid()}-{xml.name}")  # OpenVINO insists on the .xml suffix
    ov.save_model(ov_model, str(tmp), compress_to_fp16=False)  # fp16 weights would break float32 parity
    os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
    os.replace(tmp, xml)


def convert(engine: str, model, graph: Graph, cache_dir: Path, precision: Precision = Precision(),
            calibration_images=None, log=None) -> Path:
    """Path of the cached graph `engine` runs, converting (and calibrating) on first use only."""
    from ..store import touch_used

    parts, taps = graph.parts(), list(graph.taps)
    folder = graph.folder(cache_dir)
    if folder.is_dir():
        touch_used(folder)  # a use: `cache prune` removes least recently used graphs first
    if not (folder / "meta.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = _tmp(folder / "meta.json")
        tmp.write_text(json.dumps(parts, indent=1))
        os.replace(tmp, folder / "meta.json")
    if engine == "onnxruntime":
        return _onnx(folder, model, taps, log)
    ver = versions.version("openvino")
    if not precision.int8:
        xml = folder / f"openvino-{ver}.xml"
        if not xml.is_file():
            import openvino as ov

            _save_ir(ov.convert_model(str(_onnx(folder, model, taps, log))), xml)
        return xml
    from .int8 import quantize

    if not is_current(precision.calibration):  # the first recipe's OpenVINO IR: read where cached, never made
        xml = folder / f"int8-{precision.calibration}-openvino-{ver}.xml"
        if not xml.is_file():
            raise FeatureCacheError(f"--precision int8: sample {precision.calibration} names an int8 graph of an "
                                    f"earlier featurecache, which is not in {folder}; extract with --precision int8 "
                                    "again (a new feature set) and fit the head on it")
        return xml
    path = folder / f"int8-{precision.calibration}.onnx"
    if not path.is_file() and calibration_images is None:
        # e.g. `cache verify` of one tap of a set extracted beside others: that graph has this tap's vectors too
        path = int8_graph(cache_dir, graph, precision.calibration) or path
    if not path.is_file():
        if calibration_images is None:
            raise FeatureCacheError(f"--precision int8: the int8 graph calibrated on sample {precision.calibration} "
                                    f"is not in {folder}; run `featurecache extract --precision int8` on the "
                                    "training data again to recreate it")
        images = np.asarray(calibration_images())
        if log:
            log(f"notice: calibrating int8 {graph.model} on {len(images)} of your training images (once)")
        proto = quantize(str(_onnx(folder, model, taps, log)), images)
        tmp = _tmp(path)
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, path)
    return path


def int8_graph(cache_dir: Path, graph: Graph, calibration: str) -> Path | None:
    """The cached int8 QDQ graph of `graph`, or of a graph over more taps of the same network (a tap's int8
    vectors do not depend on the other taps: tests/test_precision.py), or None."""
    name = f"int8-{calibration}.onnx"
    exact = graph.folder(cache_dir) / name
    if exact.is_file():
        return exact
    want = {k: v for k, v in graph.parts().items() if k != "taps"}
    for meta in sorted((Path(cache_dir) / "engines").glob("*/meta.json")):
        try:
            parts = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if {k: v for k, v in parts.items() if k != "taps"} == want and set(graph.taps) <= set(parts.get("taps", [])) \
                and (meta.parent / name).is_file():
            return meta.parent / name
    return None


def graph(engine: str, model, model_name: str, weights_id: str, size: int, taps: list[str], cache_dir: Path,
          precision: str = "float32", calibration: str = "", calibration_images=None, log=None) -> Path:
    """`convert` with loose arguments, for the benchmark scripts until they move to featurecache.api."""
    return convert(engine, model, Graph(model_name, weights_id, size, tuple(taps)), cache_dir,
                   Precision(precision, calibration), calibration_images, log)
