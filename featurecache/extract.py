"""Extraction: images -> (upsizing, preprocessing) -> backbone taps -> pooled vectors -> store.

Only images missing from a feature set go through the network; all missing taps of one model share
one forward pass; vectors stream to disk part by part, so memory does not grow with the dataset and a
killed run loses at most the part in flight.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import images as imagelib
from .backbones import Backbone, get_backbone, preprocess, preprocess_mode
from .backbones.weights import Weights, resolve_weights
from .engines import choose, precision_key
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
    precision: str = "float32"  # or int8: a different feature set
    calibration: str = ""  # int8 only: id of the training-image sample it was calibrated on (`calibrated`)


def calibrated(spec: FeatureSpec, train_ids: list[str]) -> FeatureSpec:
    """`spec` with its int8 calibration sample named (drawn from `train_ids`); float32 specs unchanged."""
    from .engines import check_precision

    if check_precision(spec.precision) != "int8" or spec.calibration:
        return spec
    from dataclasses import replace

    from .engines.int8 import calibration_sample

    if not train_ids:
        raise FeatureCacheError("--precision int8: no training images to calibrate on; use --precision float32")
    return replace(spec, calibration=calibration_sample(train_ids)[1])


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
    precision: str = "float32"
    calibration: str = ""


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
    if spec.precision == "int8" and not spec.calibration:
        raise FeatureCacheError("--precision int8: no calibration sample named; pass the spec through "
                                "featurecache.extract.calibrated(spec, train_ids) first")
    precision = precision_key(spec.precision, spec.calibration)
    keys = {layer: feature_key(backbone.name, weights.id, layer, spec.pool, size, spec.resize, mode,
                               precision=precision) for layer in layers}
    return Resolved(backbone, weights, size, mode, spec.pool, spec.resize, layers, keys,
                    {layer: key_id(k) for layer, k in keys.items()}, notices, spec.precision, spec.calibration)


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

    def checkable(self, position: int) -> bool:
        return hasattr(self.sources[self.where[position][0]], "check")  # arrays cannot be unreadable

    def check(self, position: int) -> str | None:
        """Why the image does not decode, or None when it does."""
        k, j = self.where[position]
        try:
            self.sources[k].check(j)
        except FeatureCacheError as e:
            return str(e)
        return None


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
    skipped: list[dict] = field(default_factory=list)  # {"id", "name", "reason"} of images left out
    engine: str | None = None  # what ran the network (None: nothing to compute)
    precision: str = "float32"

    @property
    def cache_hit(self) -> bool:
        return self.computed == 0

    def as_dict(self) -> dict:
        return {"model": self.model, "weights": self.weights, "size": self.size, "images": self.images,
                "computed": self.computed, "reused": self.images - self.computed,
                "cache_hit": self.cache_hit, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.computed / self.seconds, 1) if self.computed else None,
                "sets": self.sets, "notices": self.notices, "skipped": self.skipped, "engine": self.engine,
                "precision": self.precision}


ON_ERROR = ("fail", "skip")


@dataclass
class Pending:
    """What a run would compute: unique ids, first position of each, open sets, missing ids per tap."""
    src: Sources
    ids: list[str]
    first: dict[str, int]
    sets: dict
    need: dict[str, list[str]]
    bad: dict[str, str]  # ids a set already left out as unreadable (not in `need`)

    @property
    def todo(self) -> list[str]:
        return list(dict.fromkeys(i for n in self.need.values() for i in n))


def pending(sources, res: Resolved, store: FeatureStore) -> Pending:
    """Look up every tap's feature set: which images still need the network (reads only)."""
    src = Sources(sources)
    ids = list(dict.fromkeys(src.ids))  # an image that appears twice is computed once
    first = {}
    for pos, i in enumerate(src.ids):
        first.setdefault(i, pos)
    sets = {layer: store.get(res.set_ids[layer]) for layer in res.layers}
    need = {layer: (ids if fs is None else [ids[k] for k in fs.missing(ids)]) for layer, fs in sets.items()}
    bad = _known_bad(sets, need)
    return Pending(src, ids, first, sets, need, bad)


def extract(sources, spec: FeatureSpec, cache_dir: Path, native_size: int | None = None,
            batch_size: int = 64, progress: bool = True, log=None,
            on_error: str = "fail", engine: str = "auto") -> tuple[Resolved, Summary]:
    """Make sure every image of `sources` has a vector in every requested tap's feature set.

    Unreadable images: with on_error="fail" every image to compute is decoded first, and any
    failure stops the run before the model is built; with "skip" they are left out, remembered in
    the set (never retried: a fixed file has new bytes, hence a new id) and listed in the summary.
    `engine` (auto | tensorflow | onnxruntime | openvino) only decides what runs the network; int8
    specs are calibrated on a sample of the first source (the training images).
    """
    t0 = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if batch_size < 1:
        raise FeatureCacheError(f"--batch-size {batch_size}: must be at least 1")
    if on_error not in ON_ERROR:
        raise FeatureCacheError(f"--on-error {on_error}: use fail or skip")
    sources = list(sources)
    spec = calibrated(spec, sources[0].ids if sources else [])
    choose(engine, spec.precision)  # a bad --engine fails before any work, cache hit or not
    res = resolve(spec, native_size, cache_dir)
    for n in res.notices:
        log(f"notice: {n}")
    store = FeatureStore(cache_dir)
    p = pending(sources, res, store)
    src, ids, first, sets, need, bad = p.src, p.ids, p.first, p.sets, p.need, p.bad
    todo = p.todo
    if todo and on_error == "fail":
        _fail_on_unreadable(src, [first[i] for i in todo], progress, log)
    computed, used = 0, None
    if todo:
        sets, computed, found, used = _compute(res, src, ids, first, sets, need, store, batch_size, progress, log,
                                               on_error, engine)
        bad.update(found)
        need = {layer: [i for i in n if i not in found] for layer, n in need.items()}
    report = []
    for layer in res.layers:
        fs = sets[layer]
        report.append({"layer": layer, "id": fs.id, "key": res.keys[layer], "dims": fs.dims,
                       "stored": len(fs), "computed": len(need[layer]), "reused": len(ids) - len(need[layer])})
    skipped = [{"id": i, "name": src.name(first[i]), "reason": r} for i, r in bad.items() if i in first]
    return res, Summary(res.backbone.name, res.weights.label, res.size, len(ids), computed,
                        time.perf_counter() - t0, report, res.notices, skipped, used, res.precision)


def _known_bad(sets, need) -> dict[str, str]:
    """Images a set already left out as unreadable: taken out of `need`, never retried."""
    bad = {}
    for layer, fs in sets.items():
        skipped = fs.skipped() if fs is not None else {}
        if skipped:
            bad.update((i, skipped[i]) for i in need[layer] if i in skipped)
            need[layer] = [i for i in need[layer] if i not in skipped]
    return bad


def _fail_on_unreadable(src: Sources, positions: list[int], progress: bool, log) -> None:
    """Decode every image file to compute before any heavy work; one line naming the bad ones."""
    positions = [p for p in positions if src.checkable(p)]
    if not positions:
        return
    bar = _progress(len(positions), "checking images", progress and len(positions) >= 1000)
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # Pillow decodes without the GIL
        errors = []
        for err in pool.map(src.check, positions):
            errors.append(err)
            bar.update(1)
    bar.close()
    bad = [e for e in errors if e]
    if bad:
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise FeatureCacheError(f"{len(bad)} unreadable image(s), nothing extracted: {' | '.join(bad[:5])}{more}; "
                                "fix or remove them, or pass --on-error skip to leave them out")


def _compute(res: Resolved, src: Sources, ids, first, sets, need, store, batch_size, progress, log, on_error,
             engine="auto"):
    """Run the network over what is missing; returns (sets, images computed, {id: why} left out, engine)."""
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
            fs = store.open(res.set_ids[tap.name], res.keys[tap.name], tap.dims(res.pool), _provenance(res))
            sets[tap.name] = stack.enter_context(fs.lock(notify=log))
        # Another process may have stored some while we waited for the locks.
        for tap in taps:
            fs = sets[tap.name]
            need[tap.name] = [ids[k] for k in fs.missing(ids)]
        taps = [t for t in taps if need[t.name]]
        if not taps:
            log("notice: another process computed these features meanwhile; nothing left to do")
            return sets, 0, {}, None
        todo_ids = list(dict.fromkeys(i for t in taps for i in need[t.name]))
        wanted = {t.name: set(need[t.name]) for t in taps}
        used, forward = forward_fn(model, [t.name for t in taps], engine=engine, res=res, cache_dir=store.cache_dir,
                                   calibration_images=lambda: calibration_images(res, src), log=log)
        positions = [first[i] for i in todo_ids]
        # Per tap: [(ids, vectors) of each batch], and when the part being filled was started.
        buffers = {t.name: ([], time.monotonic()) for t in taps}
        bad: dict[str, str] = {}

        def flush(force=False):
            for t in taps:
                batches, since = buffers[t.name]
                rows = sum(len(b[0]) for b in batches)
                if rows and (force or sets[t.name].part_due(rows, time.monotonic() - since)):
                    sets[t.name].append([i for b in batches for i in b[0]], np.concatenate([b[1] for b in batches]))
                    buffers[t.name] = ([], time.monotonic())

        def prepare(chunk):
            """(positions that decoded, their preprocessed batch); a failure either stops or is skipped."""
            ok, imgs = [], []
            for p in chunk:
                try:
                    imgs.append(src.load(p, res.size, res.resize))
                    ok.append(p)
                except FeatureCacheError as e:
                    if on_error == "fail":
                        raise
                    bad[src.ids[p]] = str(e)
            return ok, (preprocess(np.stack(imgs), res.preprocess_mode) if imgs else None)

        def remember_bad():
            for t in taps:
                sets[t.name].record_skipped({i: r for i, r in bad.items() if i in wanted[t.name]})

        bar = _progress(len(todo_ids), f"{res.backbone.name} {res.size}px -> {','.join(t.name for t in taps)}",
                        progress)
        chunks = [positions[k:k + batch_size] for k in range(0, len(positions), batch_size)]
        done = 0
        try:
            with _StopRequest() as stop, ThreadPoolExecutor(1) as pool:  # decode the next batch while the network runs
                pending = pool.submit(prepare, chunks[0])
                for c, chunk in enumerate(chunks):
                    if stop.requested:
                        raise KeyboardInterrupt
                    chunk, x = pending.result()
                    if c + 1 < len(chunks):
                        pending = pool.submit(prepare, chunks[c + 1])
                    if not chunk:
                        continue
                    outs = forward(x)
                    chunk_ids = [src.ids[p] for p in chunk]
                    for t, maps in zip(taps, outs):
                        vec = pool_maps(np.asarray(maps), res.pool)
                        keep = [k for k, i in enumerate(chunk_ids) if i in wanted[t.name]]
                        buffers[t.name][0].append(([chunk_ids[k] for k in keep], vec[keep]))  # ids and rows at once
                    done += len(chunk)
                    bar.update(len(chunk))
                    flush()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (after the batch in flight), or a second one
            flush(force=True)  # keep every finished batch; the rerun starts after them
            remember_bad()
            bar.close()
            raise FeatureCacheError(f"interrupted after {done} of {len(todo_ids)} images; they are stored, "
                                    "rerun the same command to continue") from None
        except BaseException:
            flush(force=True)  # any other failure (an image that stopped decoding, ...) keeps finished work too
            raise
        flush(force=True)
        remember_bad()
        bar.close()
        return sets, len(todo_ids) - len(bad), bad, used


class _StopRequest:
    """While the network runs, Ctrl-C or SIGTERM (a scheduler's stop, `kill`) asks to stop after the
    batch in flight, so no signal lands half-way through buffering or writing a part; a second one
    stops at once. Either way finished batches are saved. SIGKILL loses at most the part being filled."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _provenance(res: Resolved) -> dict:
    """Where the weights came from, kept in meta.json so `cache verify --data` can rebuild the model."""
    w = res.weights
    return {"source": {"weights": w.label, "weights_path": str(w.path) if w.path else None, "seed": w.seed}}


def calibration_images(res: Resolved, src: Sources) -> np.ndarray:
    """The preprocessed int8 calibration sample (`calibrated` names it); unreadable images are left out."""
    from .engines.int8 import calibration_sample

    train = src.sources[0]
    chosen, sample = calibration_sample(train.ids)
    if sample != res.calibration:  # e.g. `predict` on new files: the training images are not at hand
        raise FeatureCacheError(f"--precision int8: the graph calibrated on sample {res.calibration} is not in the "
                                "cache; run `featurecache extract --precision int8` on the training data again")
    where = {i: j for j, i in enumerate(train.ids)}
    imgs = []
    for i in chosen:
        try:
            imgs.append(imagelib.resize(train.load(where[i]), res.size, res.resize))
        except FeatureCacheError:
            continue
    return preprocess(np.stack(imgs), res.preprocess_mode)


def forward_fn(model, names: list[str], engine: str | None = None, res: Resolved | None = None,
               cache_dir: Path | None = None, calibration_images=None, log=None):
    """A compiled `model(x, training=False)` returning the named taps' outputs as a list.

    With `engine` (auto | tensorflow | onnxruntime | openvino) and the resolved spec: the pair
    (engine used, forward) from featurecache.engines, which runs the same taps on that engine.
    """
    if engine is not None:
        from .engines import make_forward

        return make_forward(engine, model, res.backbone, res.weights, res.size, names, cache_dir, res.precision,
                            res.calibration, calibration_images, log)
    import keras
    import tensorflow as tf

    multi = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    @tf.function(reduce_retracing=True, autograph=False)
    def call(x):
        return multi(x, training=False)


    def forward(x):
        out = call(tf.convert_to_tensor(x))
        return out if isinstance(out, (list, tuple)) else [out]

    return forward


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)
