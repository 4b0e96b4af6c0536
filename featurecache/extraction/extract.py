"""Extraction: images -> encoder (featurecache.encoding.encoder) -> vectors per tap -> feature store.

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
from functools import partial
from pathlib import Path

import numpy as np

from ..encoding import encoder as encoderlib
from ..engines import choose
from ..errors import FeatureCacheError
from ..settings import FeatureSpec, Resolved, RunSettings, calibrated, calibration_sample, resolve
from ..store.sets import FeatureStore
from ..encoding.taps import check_layers


def source_item(source, index: int):
    """What the encoder reads for one image of a source: a file's path (so the encoder decodes it, and
    can check it cheaply first), else the source's own loader, called only when the batch is decoded."""
    paths = getattr(source, "paths", None)
    return paths[index] if paths is not None else partial(source.load, index)


def first_positions(ids) -> dict[str, int]:
    """{image id: its first position in `ids`}: an image listed twice (one content, one id) is read from there."""
    first: dict[str, int] = {}
    for pos, i in enumerate(ids):
        first.setdefault(i, pos)
    return first


class Sources:
    """Several image sources seen as one list, so train and test share one pass."""

    def __init__(self, sources):
        self.sources = list(sources)
        self.ids = [i for s in self.sources for i in s.ids]
        self.where = [(k, j) for k, s in enumerate(self.sources) for j in range(len(s))]

    def item(self, position: int):
        k, j = self.where[position]
        return source_item(self.sources[k], j)

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
    first = first_positions(src.ids)
    sets = {layer: store.get(res.set_ids[layer]) for layer in res.layers}
    need = {layer: (ids if fs is None else [ids[k] for k in fs.missing(ids)]) for layer, fs in sets.items()}
    bad = _known_bad(sets, need)
    return Pending(src, ids, first, sets, need, bad)


def run_extract(sources, spec: FeatureSpec, run: RunSettings, native_size: int | None = None
                ) -> tuple[Resolved, Summary]:
    """Make sure every image of `sources` has a vector in every requested tap's feature set.

    Unreadable images: with on_error="fail" every image to compute is decoded first, and any
    failure stops the run before the model is built; with "skip" they are left out, remembered in
    the set (never retried: a fixed file has new bytes, hence a new id) and listed in the summary.
    `run.engine` only decides what runs the network; int8 specs are calibrated on a sample of the
    first source (the training images).
    """
    t0 = time.perf_counter()
    sources = list(sources)
    spec = calibrated(spec, sources[0].ids if sources else [])
    choose(run.engine, spec.precision)  # a bad --engine fails before any work, cache hit or not
    res = resolve(spec, native_size, run.cache_dir)
    for n in res.notices:
        run.say(f"notice: {n}")
    store = FeatureStore(run.cache_dir)
    res = check_upgrades(res, sources, store, run)
    p = pending(sources, res, store)
    src, ids, first, sets, need, bad = p.src, p.ids, p.first, p.sets, p.need, p.bad
    todo = p.todo
    if todo and run.executor == "ray":
        from .cluster import ClusterSettings, check

        check(run.cluster or ClusterSettings())  # Ray installed, the address answering: before any work
    if todo and run.on_error == "fail":
        _fail_on_unreadable(src, [first[i] for i in todo], run.progress)
    computed, used = 0, None
    if todo:
        sets, computed, found, used = _compute(res, p, store, run)
        bad.update(found)
        need = {layer: [i for i in n if i not in found] for layer, n in need.items()}
    report = []
    for layer in res.layers:
        fs = sets[layer]
        report.append({"layer": layer, "id": fs.id, "key": res.keys[layer], "dims": fs.dims,
                       "stored": len(fs), "computed": len(need[layer]), "reused": len(ids) - len(need[layer])})
    skipped = [{"id": i, "name": src.name(first[i]), "reason": r} for i, r in bad.items() if i in first]
    return res, Summary(res.backbone.name, res.weights.label, res.size, len(ids), computed,
                        time.perf_counter() - t0, report, list(res.notices), skipped, used, res.precision.name)


def check_upgrades(res: Resolved, sources, store: FeatureStore, run: RunSettings) -> Resolved:
    """`res`, once its sets made with other library versions than the running ones (adopted by `resolve`)
    are checked on a sample of these images (featurecache/store/upgrades.py); a stale one that the user
    (--recompute-stale) or its small size lets go is dropped (a new value), so it is computed afresh."""
    from ..store import upgrades

    src = first = None
    for layer in upgrades.outdated(res):
        fs = store.get(res.set_ids[layer])
        if fs is None:
            continue
        if src is None:
            src = Sources(sources)
            first = first_positions(src.ids)

        def encode(ids, layer=layer):
            enc = encoderlib.Encoder(res, store.cache_dir, res.precision.reference_engine, "skip", [layer], log=run.say,
                                     calibration=lambda: calibration_items(res, src)).load()
            out = enc.encode([src.item(first[i]) for i in ids], [src.name(first[i]) for i in ids], ids)
            return {i: out.vectors[layer][k] for k, i in enumerate(out.keys)}

        if upgrades.check(fs, set(first), encode, run.say, run.recompute_stale):
            res = upgrades.drop(res, layer)
    return res


def _known_bad(sets, need) -> dict[str, str]:
    """Images a set already left out as unreadable: taken out of `need`, never retried."""
    bad = {}
    for layer, fs in sets.items():
        skipped = fs.skipped() if fs is not None else {}
        if skipped:
            bad.update((i, skipped[i]) for i in need[layer] if i in skipped)
            need[layer] = [i for i in need[layer] if i not in skipped]
    return bad


def _fail_on_unreadable(src: Sources, positions: list[int], progress: bool) -> None:
    """Check every image file to compute before any heavy work; one line naming the bad ones."""
    items = {p: src.item(p) for p in positions}
    positions = [p for p in positions if encoderlib.checkable(items[p])]
    if not positions:
        return
    bar = _progress(len(positions), "checking images", progress and len(positions) >= 1000)
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # Pillow decodes without the GIL
        errors = []
        for err in pool.map(lambda p: encoderlib.check(items[p], src.name(p)), positions):
            errors.append(err)
            bar.update(1)
    bar.close()
    bad = [e for e in errors if e]
    if bad:
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise FeatureCacheError(f"{len(bad)} unreadable image(s), nothing extracted: {' | '.join(bad[:5])}{more}; "
                                "fix or remove them, or pass --on-error skip to leave them out")


def _compute(res: Resolved, p: Pending, store: FeatureStore, run: RunSettings):
    """Run the network over what is missing; returns (sets, images computed, {id: why} left out, engine)."""
    from contextlib import ExitStack

    from ..backbones.build import build_model
    from ..encoding.taps import known, remember, taps_of

    src, ids, first, sets, need, log = p.src, p.ids, p.first, p.sets, p.need, run.say
    model, all_taps = None, known(res.backbone, res.size, store.cache_dir)
    if all_taps is None:  # first sight of this network at this size: the real build tells the taps
        model = build_model(res.backbone, res.weights, res.size)
        all_taps = taps_of(model, res.size)
        remember(res.backbone, res.size, store.cache_dir, all_taps)  # free now; spares `layers` a build
    # else the encoder builds the network only if its graph must be converted (engines.graphs.built)
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
        from ..engines.choice import MEASURE_FROM

        enc = encoderlib.Encoder(res, store.cache_dir, run.engine, run.on_error, [t.name for t in taps], model=model,
                                 calibration=lambda: calibration_items(res, src), log=log,
                                 measure=len(todo_ids) >= MEASURE_FROM).load()
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

        def remember_bad():
            for t in taps:
                sets[t.name].record_skipped({i: r for i, r in bad.items() if i in wanted[t.name]})

        bar = _progress(len(todo_ids), f"{res.backbone.name} {res.size}px -> {','.join(t.name for t in taps)}",
                        run.progress)
        done = 0
        try:
            with _StopRequest() as stop:
                for encoded in _batches(enc, src, positions, run):
                    bad.update(encoded.skipped)
                    for t in taps:
                        keep = [k for k, i in enumerate(encoded.keys) if i in wanted[t.name]]
                        if keep:
                            buffers[t.name][0].append(([encoded.keys[k] for k in keep], encoded.vectors[t.name][keep]))
                    done += len(encoded.keys)
                    bar.update(len(encoded.keys) + len(encoded.skipped))
                    flush()
                    if stop.requested:  # after the batch in flight, which is now buffered
                        raise KeyboardInterrupt
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
        return sets, len(todo_ids) - len(bad), bad, enc.engine


def _batches(enc, src: Sources, positions: list[int], run: RunSettings):
    """`Encoded` batches of the images at `positions`, from the run's executor: this process (the
    encoder's own stream, decoding ahead) or a Ray cluster (featurecache/extraction/cluster.py). An executor
    is a function of (encoder, sources, positions, RunSettings) yielding `Encoded`."""
    if run.executor == "ray":
        from .cluster import encode_batches

        return encode_batches(enc, src, positions, run)
    chunks = (positions[k:k + run.batch_size] for k in range(0, len(positions), run.batch_size))
    return enc.stream(([src.item(q) for q in c], [src.name(q) for q in c], [src.ids[q] for q in c]) for c in chunks)


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


def calibration_items(res: Resolved, src: Sources) -> list:
    """The int8 calibration sample (`calibrated` names it) as encoder items, from the training images."""
    train = src.sources[0]
    chosen, sample = calibration_sample(train.ids)
    if sample != res.precision.calibration:  # e.g. `predict` on new files: the training images are not at hand
        raise FeatureCacheError(f"--precision int8: the graph calibrated on sample {res.precision.calibration} is not "
                                "in the "
                                "cache; run `featurecache extract --precision int8` on the training data again")
    where = first_positions(train.ids)
    return [source_item(train, where[i]) for i in chosen]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)
