"""The converted-graph cache: <cache>/engines/<graph id>/ per (model, weights, size, taps).

    model.onnx                         the float32 graph (onnx_export), run by ONNX Runtime
    openvino-<ver>.xml/.bin            the same graph as OpenVINO IR (weights kept in float32)
    int8-<calibration>.onnx            nncf's int8 QDQ graph, calibrated on a sample of the user's images
                                       (OpenVINO runs it; `export` embeds it). int8-<sample>-openvino-<ver>:
                                       the first recipe's IR, still read
    meta.json                          what the id was made from
    .featurecache-graph                OWNER: the proof `cache prune` asks for before removing a folder
                                       (older graphs have only meta.json, recognised by `ours` too)
    .in_use                            IN_USE: every process using the graph holds a shared flock on it

Each file is written under a temporary name and renamed into place (the .bin before its .xml), so a
killed conversion leaves nothing half-written, and two processes converting at once both end with a
complete file. Conversion happens once; later builds only read.

In use: a process takes its shared lock (`hold`) before it looks for, converts or loads a graph, and keeps
it until it exits; `cache prune` removes a graph only under the exclusive lock, tried without waiting, so a
graph in use is skipped, and the kernel drops a dead process's lock (no marker outlives its process). A
graph removed anyway (by hand, or by a remover that ignores the lock) is converted again (`load`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


OWNER = ".featurecache-graph"
IN_USE = ".in_use"
NOT_OURS = f"not featurecache's (neither a {OWNER} marker nor a converted graph's meta.json in it); left alone"
_PARTS = set(Graph("", "", 0, ()).parts())  # the keys of a graph's meta.json
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_HELD: dict[str, int] = {}  # graph folder -> the descriptor of this process's shared lock on its IN_USE


def ours(folder: Path) -> bool:
    """Whether `folder` provably holds a converted graph of featurecache's: its OWNER marker, or (a graph
    converted before the marker existed) a meta.json of Graph.parts' keys whose id names the folder."""
    if (folder / OWNER).is_file():
        return True
    try:
        parts = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(parts, dict) and set(parts) == _PARTS and key_id(parts, spacing=True) == folder.name


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def hold(folder: Path) -> None:
    """Mark the graph in `folder` in use by this process until it exits (see the module's docstring).
    Where the cache is read-only an existing IN_USE is locked read-only, else nothing is marked: such a cache
    is not pruned from here. Where flock is missing (some network file systems) nothing is marked either."""
    from ..store.sets import writing

    key = str(folder)
    if key in _HELD:
        if _same_file(_HELD[key], folder / IN_USE):
            return
        os.close(_HELD.pop(key))  # the folder was removed (and maybe remade) meanwhile: lock the new one
    while True:
        path = folder / IN_USE
        try:
            with writing(folder.parent, f"convert a graph into {folder}"):
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FeatureCacheError:
            if not path.is_file():
                return  # a read-only cache whose graph was never marked: nothing to mark it with
            fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a prune renames this folder away
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_FLOCK:
                return
            raise
        if _same_file(fd, path):
            _HELD[key] = fd
            return
        os.close(fd)  # we locked the folder a prune just took away: lock the one made again


def try_remove(folder: Path) -> str | None:
    """Remove a graph folder if it is ours and no process has it in use; else why it stays (one line)."""
    from ..store.sets import not_writable, writing

    if not ours(folder):
        return NOT_OURS
    if not os.access(folder.parent, os.W_OK):
        raise not_writable(folder.parent, f"remove the converted graph {folder.name}")
    with writing(folder.parent, f"remove the converted graph {folder.name}"):
        fd = os.open(folder / IN_USE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "in use by a running process (extract, predict, serve...); prune again once it ends"
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
            # Renamed away under the lock: a process waiting for its shared lock then finds the folder gone
            # and makes a new one; no process ever converts into, or loads from, a half-deleted folder.
            doomed = folder.with_name(f".removing-{folder.name}-{os.getpid()}")
            os.replace(folder, doomed)
        finally:
            os.close(fd)
        remove_leftovers(folder.parent)
    return None


def remove_leftovers(engines: Path) -> None:
    """Folders renamed away for removal (by this prune, or one killed half-way): nothing reads them. A link
    goes, not what it points to."""
    import shutil

    for leftover in engines.glob(".removing-*"):
        if leftover.is_symlink():
            leftover.unlink()
        else:
            shutil.rmtree(leftover, ignore_errors=True)


_REMAKE: dict[str, Callable[[], Path]] = {}  # graph file -> its `convert` call, until `load` has read it


def files_of(path: Path) -> list[Path]:
    """The files a graph at `path` is read from: an OpenVINO IR is its .xml and its .bin."""
    path = Path(path)
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def load(path: Path, open_graph: Callable[[Path], object]):
    """`open_graph(path)` (an engine's session), converting again, once, where the graph was removed between
    `convert` and here: by hand, or by a remover that ignores the in-use lock."""
    remake = _REMAKE.pop(str(path), None)
    try:
        if remake is not None and not all(p.is_file() for p in files_of(path)):
            raise FileNotFoundError(path)
        return open_graph(path)
    except Exception:
        if remake is None or all(p.is_file() for p in files_of(path)):
            raise
        again = remake()
        _REMAKE.pop(str(again), None)
        return open_graph(again)


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
    from ..store.sets import touch_used, writing

    folder = graph.folder(cache_dir)
    hold(folder)  # before looking: a prune cannot take the folder from under this process from here on
    touch_used(folder)  # a use: `cache prune` removes least recently used graphs first
    with writing(folder, f"convert {graph.model} for {engine} (a new graph)"):
        path = _convert(engine, model, graph, folder, precision, calibration_images, log)
    _REMAKE[str(path)] = lambda: convert(engine, model, graph, cache_dir, precision, calibration_images, log)
    return path


def _mark(folder: Path, parts: dict) -> None:
    """meta.json and the OWNER marker, each once (an older graph gets its marker on its next use)."""
    for name, text in (("meta.json", json.dumps(parts, indent=1)), (OWNER, "a converted graph of featurecache's\n")):
        if not (folder / name).is_file() and os.access(folder, os.W_OK):
            tmp = _tmp(folder / name)
            tmp.write_text(text)
            os.replace(tmp, folder / name)


def _convert(engine: str, model, graph: Graph, folder: Path, precision: Precision, calibration_images, log) -> Path:
    cache_dir = folder.parent.parent
    parts, taps = graph.parts(), list(graph.taps)
    _mark(folder, parts)
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
    vectors do not depend on the other taps: tests/engines/test_precision.py), or None."""
    name = f"int8-{calibration}.onnx"
    exact = graph.folder(cache_dir) / name
    if exact.is_file():
        hold(exact.parent)  # in use by this process from here on (export, plan): see the module's docstring
        if exact.is_file():  # not pruned before the hold
            return exact
    want = {k: v for k, v in graph.parts().items() if k != "taps"}
    for meta in sorted((Path(cache_dir) / "engines").glob("*/meta.json")):
        try:
            parts = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if {k: v for k, v in parts.items() if k != "taps"} == want and set(graph.taps) <= set(parts.get("taps", [])) \
                and (meta.parent / name).is_file():
            hold(meta.parent)
            if (meta.parent / name).is_file():  # not pruned before the hold
                return meta.parent / name
    return None


def graph(engine: str, model, model_name: str, weights_id: str, size: int, taps: list[str], cache_dir: Path,
          precision: str = "float32", calibration: str = "", calibration_images=None, log=None) -> Path:
    """`convert` with loose arguments, for the benchmark scripts until they move to featurecache.api."""
    return convert(engine, model, Graph(model_name, weights_id, size, tuple(taps)), cache_dir,
                   Precision(precision, calibration), calibration_images, log)
