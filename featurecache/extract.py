"""Extraction: images -> (upsizing, preprocessing) -> backbone taps -> pooled vectors -> store.

Only images missing from a feature set go through the network; all missing taps of one model share
one forward pass; vectors stream to disk part by part, so memory does not grow with the dataset and a
killed run loses at most the part in flight.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import images as imagelib
from .backbones import Backbone, get_backbone, preprocess, preprocess_mode
from .backbones.weights import Weights, resolve_weights
from .errors import FeatureCacheError
from .fingerprint import feature_key, key_id
from .store import FeatureSet, FeatureStore
from .taps import check_layers, check_pool, default_layer, pool_maps

RESIZES = tuple(imagelib.RESIZE_METHODS)


@dataclass(frozen=True)
class FeatureSpec:
    """The options that shape feature vectors (one spec may name several taps)."""
    model: str
    weights: str = "imagenet"
    layers: tuple[str, ...] = ()
    pool: str = "flatten"
    size: int | None = None
    resize: str = "nearest"
    preprocess: str = "auto"
    seed: int = 0  # of random weights


@dataclass
class Resolved:
    """A spec made concrete for one dataset: size, layer names, keys and set ids."""
    backbone: Backbone
    weights: Weights
    size: int
    preprocess_mode: str
    pool: str
    resize: str
    layers: list[str]
    keys: dict[str, dict]
    set_ids: dict[str, str]
    notices: list[str] = field(default_factory=list)


def resolve(spec: FeatureSpec, native_size: int | None, cache_dir: Path) -> Resolved:
    """Everything needed for a cache lookup, without importing TensorFlow."""
    backbone = get_backbone(spec.model)
    check_pool(spec.pool)
    if spec.resize not in RESIZES:
        raise FeatureCacheError(f"--resize {spec.resize}: unknown; use one of {', '.join(RESIZES)}")
    notices = []
    if spec.size is not None:
        size = spec.size
    elif native_size is None:
        size = backbone.default_size
    elif native_size < backbone.min_size:
        size = backbone.min_size
        notices.append(f"images are {native_size}x{native_size}, below {backbone.name}'s minimum; "
                       f"upsizing to {size}x{size} ({spec.resize}); set --size to choose")
    else:
        size = native_size
    backbone.check_size(size)
    mode = preprocess_mode(backbone, spec.preprocess)
    weights = resolve_weights(backbone, spec.weights, spec.seed, cache_dir)
    layers = list(dict.fromkeys(spec.layers)) or [default_layer(backbone, size, cache_dir)]
    keys = {layer: feature_key(backbone.name, weights.id, layer, spec.pool, size, spec.resize, mode)
            for layer in layers}
    return Resolved(backbone, weights, size, mode, spec.pool, spec.resize, layers, keys,
                    {layer: key_id(k) for layer, k in keys.items()}, notices)


class Sources:
    """Several image sources seen as one list, so train and test share one pass."""

    def __init__(self, sources):
        self.sources = list(sources)
        self.ids = [i for s in self.sources for i in s.ids]
        self.where = [(k, j) for k, s in enumerate(self.sources) for j in range(len(s))]

    def load(self, position: int, size: int, resize: str) -> np.ndarray:
        k, j = self.where[position]
        return imagelib.resize(self.sources[k].load(j), size, resize)

    def name(self, position: int) -> str:
        k, j = self.where[position]
        return self.sources[k].name(j)


@dataclass
class Summary:
    model: str
    weights: str
    size: int
    images: int
    computed: int
    seconds: float
    sets: list[dict]
    notices: list[str]

    @property
    def cache_hit(self) -> bool:
        return self.computed == 0

    def as_dict(self) -> dict:
        return {"model": self.model, "weights": self.weights, "size": self.size, "images": self.images,
                "computed": self.computed, "reused": self.images - self.computed,
                "cache_hit": self.cache_hit, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.computed / self.seconds, 1) if self.computed else None,
                "sets": self.sets, "notices": self.notices}


def extract(sources, spec: FeatureSpec, cache_dir: Path, native_size: int | None = None,
            batch_size: int = 64, progress: bool = True, log=None) -> tuple[Resolved, Summary]:
    """Make sure every image of `sources` has a vector in every requested tap's feature set."""
    t0 = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if batch_size < 1:
        raise FeatureCacheError(f"--batch-size {batch_size}: must be at least 1")
    res = resolve(spec, native_size, cache_dir)
    for n in res.notices:
        log(f"notice: {n}")
    store = FeatureStore(cache_dir)
    src = Sources(sources)
    ids = list(dict.fromkeys(src.ids))  # an image that appears twice is computed once
    first = {}
    for pos, i in enumerate(src.ids):
        first.setdefault(i, pos)
    sets = {layer: store.get(res.set_ids[layer]) for layer in res.layers}
    need = {layer: (ids if fs is None else [ids[k] for k in fs.missing(ids)]) for layer, fs in sets.items()}
    computed = 0
    if any(need.values()):
        sets, computed = _compute(res, src, ids, first, sets, need, store, batch_size, progress, log)
    report = []
    for layer in res.layers:
        fs = sets[layer]
        report.append({"layer": layer, "id": fs.id, "key": res.keys[layer], "dims": fs.dims,
                       "stored": len(fs), "computed": len(need[layer]), "reused": len(ids) - len(need[layer])})
    return res, Summary(res.backbone.name, res.weights.label, res.size, len(ids), computed,
                        time.perf_counter() - t0, report, res.notices)


def _compute(res: Resolved, src: Sources, ids, first, sets, need, store, batch_size, progress, log):
    from contextlib import ExitStack

    from .backbones.build import build_model
    from .taps import remember, taps_of

    model = build_model(res.backbone, res.weights, res.size)
    all_taps = taps_of(model, res.size)
    remember(res.backbone, res.size, store.cache_dir, all_taps)  # free now; spares `layers` a build
    taps = check_layers(res.backbone, [l for l in res.layers if need[l]], all_taps)
    with ExitStack() as stack:
        # Lock in id order so two processes wanting overlapping sets cannot deadlock.
        for tap in sorted(taps, key=lambda t: res.set_ids[t.name]):
            fs = store.open(res.set_ids[tap.name], res.keys[tap.name], tap.dims(res.pool))
            sets[tap.name] = stack.enter_context(fs.lock(notify=log))
        # Another process may have stored some while we waited for the locks.
        for tap in taps:
            fs = sets[tap.name]
            need[tap.name] = [ids[k] for k in fs.missing(ids)]
        taps = [t for t in taps if need[t.name]]
        if not taps:
            log("notice: another process computed these features meanwhile; nothing left to do")
            return sets, 0
        todo_ids = list(dict.fromkeys(i for t in taps for i in need[t.name]))
        wanted = {t.name: set(need[t.name]) for t in taps}
        forward = _forward_fn(model, [t.name for t in taps])
        positions = [first[i] for i in todo_ids]
        buffers = {t.name: ([], []) for t in taps}

        def flush(force=False):
            for t in taps:
                bid, bvec = buffers[t.name]
                if bid and (force or len(bid) >= sets[t.name].rows_per_part()):
                    sets[t.name].append(bid, np.concatenate(bvec))
                    buffers[t.name] = ([], [])

        def prepare(chunk):
            batch = np.stack([src.load(p, res.size, res.resize) for p in chunk])
            return preprocess(batch, res.preprocess_mode)

        bar = _progress(len(todo_ids), f"{res.backbone.name} {res.size}px -> {','.join(t.name for t in taps)}",
                        progress)
        chunks = [positions[k:k + batch_size] for k in range(0, len(positions), batch_size)]
        done = 0
        try:
            with ThreadPoolExecutor(1) as pool:  # decode the next batch while the network runs
                pending = pool.submit(prepare, chunks[0])
                for c, chunk in enumerate(chunks):
                    x = pending.result()
                    if c + 1 < len(chunks):
                        pending = pool.submit(prepare, chunks[c + 1])
                    outs = forward(x)
                    chunk_ids = [src.ids[p] for p in chunk]
                    for t, maps in zip(taps, outs):
                        vec = pool_maps(np.asarray(maps), res.pool)
                        keep = [k for k, i in enumerate(chunk_ids) if i in wanted[t.name]]
                        buffers[t.name][0].extend(chunk_ids[k] for k in keep)
                        buffers[t.name][1].append(vec[keep])
                    done += len(chunk)
                    bar.update(len(chunk))
                    flush()
        except KeyboardInterrupt:
            flush(force=True)  # keep every finished batch; the rerun starts after them
            bar.close()
            raise FeatureCacheError(f"interrupted after {done} of {len(todo_ids)} images; they are stored, "
                                    "rerun the same command to continue") from None
        flush(force=True)
        bar.close()
        return sets, len(todo_ids)


def _forward_fn(model, names: list[str]):
    """A compiled `model(x, training=False)` returning the named taps' outputs as a list."""
    import keras
    import tensorflow as tf

    multi = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    call = tf.function(lambda x: multi(x, training=False), reduce_retracing=True)

    def forward(x):
        out = call(tf.convert_to_tensor(x))
        return out if isinstance(out, (list, tuple)) else [out]

    return forward


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)
