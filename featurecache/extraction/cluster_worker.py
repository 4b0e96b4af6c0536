"""The worker side of `--executor ray` (featurecache/extraction/cluster.py is the driver's): what a read task
carries and reads on the driver's node, and the encoder actor that turns those rows into vectors.

Rows travel as Arrow columns: `key` (image id), `name` (for error messages), `data` (a file's bytes, or
raw uint8 pixels) and `shape` ("" for file bytes, "HxWxC" for pixels). An actor answers one row per row:
its vectors per tap (`v0`, `v1`, ...) or, under --on-error skip, the reason it was left out (`reason`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..encoding.encoder import Encoded, Encoder
from ..errors import FeatureCacheError


def make_carry(source, indices: list[int], keys: list[str], pixels=None) -> dict:
    """What one read task carries, small whatever the dataset's size: its files' paths, or `pixels` (the
    source's array, or the source itself, by object-store reference) and the indices it slices."""
    paths = getattr(source, "paths", None)
    return {"keys": keys, "names": [source.name(j) for j in indices], "indices": indices, "pixels": pixels,
            "files": [str(paths[j]) for j in indices] if paths is not None else None}


def _read(carry: dict) -> dict[str, list]:
    """A read task's block, on the driver's node: each image as its file's bytes (shape "") or its raw
    uint8 pixels (shape "HxWxC"), never as a path a worker could not open."""
    from ..encoding import images as imagelib

    if carry["files"] is not None:
        data = []
        for path in carry["files"]:
            try:
                data.append(imagelib.read_file(Path(path)))
            except (OSError, FeatureCacheError):
                data.append(b"")  # the worker's decode names it, under the run's --on-error
        return {"key": carry["keys"], "name": carry["names"], "data": data, "shape": [""] * len(data)}
    pixels = carry["pixels"]
    if not isinstance(pixels, np.ndarray):
        import ray

        pixels = ray.get(pixels) if isinstance(pixels, ray.ObjectRef) else pixels  # zero-copy on this node
    images = [np.ascontiguousarray(pixels[j] if isinstance(pixels, np.ndarray) else pixels.load(j), dtype=np.uint8)
              for j in carry["indices"]]
    return {"key": carry["keys"], "name": carry["names"], "data": [a.tobytes() for a in images],
            "shape": ["x".join(map(str, a.shape)) for a in images]}


def read_rows(source, indices: list[int], keys: list[str]) -> dict[str, list]:
    """A block read by the driver itself (plan's probe, Ray Client)."""
    return _read(make_carry(source, indices, keys, getattr(source, "array", source)))


def _item(data: bytes, shape: str):
    return np.frombuffer(data, np.uint8).reshape([int(s) for s in shape.split("x")]) if shape else bytes(data)


def make_datasource(carries: list[dict]):
    """A Ray Datasource with one read task per carried chunk."""
    import pyarrow as pa
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Images(Datasource):
        @property
        def supports_distributed_reads(self) -> bool:
            return False  # Ray then runs every read task on the driver's node: the files are there

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(lambda c=c: [pa.table(_read(c))], BlockMetadata(num_rows=len(c["keys"]), size_bytes=None,
                                                                               exec_stats=None, input_files=None))
                    for c in carries]

    return Images()


class EncodeActor:
    """One encoder per actor process, built once: rows of images in, one row out per row in (its
    vectors, or the reason it was left out under --on-error skip)."""

    def __init__(self, description, graph_files: dict | None, threads: int):
        _limit_threads(threads)
        scratch = Path(tempfile.gettempdir()) / f"featurecache-ray-{os.getuid()}"  # node-local, never shared
        if graph_files is not None:
            import ray  # Ray Data hands constructor arguments over as they are: a reference, fetched here

            _unpack(ray.get(graph_files) if isinstance(graph_files, ray.ObjectRef) else graph_files, scratch)
        self.encoder: Encoder = replace(description, cache_dir=str(scratch)).build().load()
        self.taps = self.encoder.taps

    def __call__(self, batch: dict) -> dict:
        keys, names = [str(k) for k in batch["key"]], [str(n) for n in batch["name"]]
        items = [_item(d, s) for d, s in zip(batch["data"], batch["shape"])]
        out: Encoded = self.encoder.encode(items, names, keys)
        where = {k: r for r, k in enumerate(out.keys)}
        rows = {"key": np.array(keys), "reason": np.array([out.skipped.get(k, "") for k in keys])}
        for t, tap in enumerate(self.taps):
            vec = out.vectors.get(tap)
            dims = vec.shape[1] if vec is not None else 0
            full = np.zeros((len(keys), dims), np.float32)
            if vec is not None:
                done = [r for r, k in enumerate(keys) if k in where]
                full[done] = vec[[where[keys[r]] for r in done]]
            rows[f"v{t}"] = full
        return rows


def _limit_threads(n: int) -> None:
    """An actor runs its engine on `n` threads (the CPUs it reserved), not on every core of its node:
    the engines read FEATURECACHE_THREADS (engines.runtimes.threads), TensorFlow's kernels OMP's."""
    os.environ["FEATURECACHE_THREADS"] = str(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def graph_files(encoder: Encoder) -> dict[str, bytes] | None:
    """The converted graph the driver's encoder runs ({path under the cache: bytes}), for the actors;
    None for TensorFlow, which runs the Keras model itself."""
    if encoder.engine == "tensorflow":
        return None
    from ..engines.graphs import Graph

    res = encoder.res
    folder = Graph(res.backbone.name, res.weights.id, res.size, tuple(encoder.taps)).folder(encoder.cache_dir)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            files[str(path.relative_to(encoder.cache_dir))] = path.read_bytes()
    return files


def _unpack(files: dict[str, bytes], scratch: Path) -> None:
    """Write the shipped graph under the actor's scratch folder (atomically: actors of one node share it)."""
    for rel, data in files.items():
        path = scratch / rel
        if path.is_file() and path.stat().st_size == len(data):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
