"""A fitted run loaded once for serving, with no HTTP in it: the run's encoder and head, and the
vectors its feature set already holds. featurecache/serving/server.py puts it behind HTTP.

Images already in the run's feature set (same content hash as the cache uses) are answered from the
stored vectors without the network. The service only reads the store, never writes it: an upload
cannot grow the cache or take a feature set's lock away from `extract`. Part files are immutable, so
they stay open; the set's folder is re-listed at most every REFRESH_S seconds to pick up parts that
`extract` or `predict` add meanwhile.

Decoding is the costly, unbounded part of a request (a 16 KB PNG may declare 4096x4096 pixels: ~0.2 s
of CPU and ~120 MB to decode), so:
- each request has a budget of decoded pixels, `max_request_pixels`, summed over the distinct images it
  needs decoded, read from the files' headers before any pixel is decoded (over it: OverBudget, a 413);
- identical uploads (same content hash) are decoded once and computed once; the others reuse the row;
- at most DECODE_SLOTS full-size decodes run at a time across all requests (one per core: more would
  only share the cores and hold more memory at once), the rest wait their turn;
- a decode keeps the full-size pixels only until they are resized, and after a request that decoded
  much, the C heap's free memory is handed back to the system (glibc keeps it otherwise: RSS stayed
  at 2.25 GB after a burst, docs/RELIABILITY.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import io
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..encoding import images as imagelib
from ..errors import FeatureCacheError
from ..runs.predict import label_rows
from ..runs.record import Run, load_head
from ..store.sets import EMPTY_READER, FeatureStore

REFRESH_S = 2.0
DECODE_SLOTS = os.cpu_count() or 1  # full-size decodes in flight at once, all requests and runs together
TRIM_AFTER_PIXELS = 4 << 20  # a request that decoded this many pixels hands free heap memory back
_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)


class InFlight:
    """Full-size decodes running now, and the most seen at once (/info shows it: the bound, observed)."""

    def __init__(self):
        self._lock, self.now, self.peak = threading.Lock(), 0, 0

    def __enter__(self):
        _decode_slots.acquire()  # work beyond the cores waits here, holding no pixels yet
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *_exc):
        with self._lock:
            self.now -= 1
        _decode_slots.release()


DECODING = InFlight()


@dataclass(frozen=True)
class ServeOptions:
    run_id: str
    cache_dir: str
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_body: int = 20 << 20
    max_pixels: int = 4096 * 4096
    engine: str = "auto"  # what runs the backbone: auto | tensorflow | onnxruntime | openvino
    max_request_pixels: int = 64 << 20  # decoded pixels per request: four of the largest images
    docs: bool = False  # /docs and /redoc (their pages load scripts from a CDN)

    def check(self) -> None:
        for name in ("max_batch", "max_body", "max_pixels", "max_request_pixels"):
            if getattr(self, name) < 1:
                raise FeatureCacheError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.max_wait_ms < 0:
            raise FeatureCacheError(f"--max-wait-ms {self.max_wait_ms}: must not be negative")


class OverBudget(FeatureCacheError):
    """A request whose images would decode to more pixels than `max_request_pixels` (HTTP 413)."""


def http_status(e: FeatureCacheError) -> int:
    """How a refused request is answered: 413 over the decode budget, 422 for an image that will not do."""
    return 413 if isinstance(e, OverBudget) else 422


def declared_pixels(data: bytes) -> int:
    """Width x height from the image's header, without decoding it; 0 where the header does not read
    (decoding then fails with the reason, naming the image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size[0] * img.size[1]
    except Exception:  # noqa: BLE001  (any damage is reported by the decode itself)
        return 0


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere (musl, macOS: nothing to call)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_trim = _malloc_trim()


def give_memory_back() -> None:
    """Return the C heap's free pages to the system: glibc keeps freed decode buffers in its arenas
    (one per thread), so without this a burst of big decodes leaves the RSS high for good."""
    if _trim is not None:
        _trim(0)


def log(msg: str) -> None:
    """Where the server's own lines go (stderr, flushed: a supervisor's log shows them as they come)."""
    print(msg, file=sys.stderr, flush=True)


class StoredVectors:
    """Read-only view of the run's feature set: the vectors of images already in the cache."""

    def __init__(self, store: FeatureStore, set_id: str):
        self._store, self.set_id = store, set_id
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._reader = self._read()

    def __len__(self) -> int:
        return len(self._reader)

    def _listing(self) -> tuple[str, ...]:
        fs = self._store.get(self.set_id)
        return fs.part_names() if fs else ()

    def _read(self):
        fs = self._store.get(self.set_id)
        return fs.reader() if fs is not None else EMPTY_READER

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < REFRESH_S or not self._lock.acquire(blocking=False):
            return
        try:
            self._checked = now
            if self._listing() != self._reader.names:
                self._reader = self._read()  # old handles close when the last reader drops them
        except (FeatureCacheError, OSError) as e:
            log(f"warning: feature set {self.set_id} not re-read ({e}); serving the previous index")
        finally:
            self._lock.release()

    def lookup(self, ids: list[str]) -> dict[int, np.ndarray]:
        """{position in ids: stored vector} for the ids the set holds."""
        self._maybe_refresh()
        return self._reader.lookup(ids)


def composed_id(blocks) -> str:
    """How a composed run's rows are named: its sets' ids, each with the view taken of it."""
    return "+".join(b.set_id + ("" if b.stored == b.pool else f":{b.pool}") for b in blocks)


class ComposedVectors:
    """The stored rows of a run fitted on several taps or on a fit-time pooling (featurecache/runs/compose.py):
    an image is a hit when every tap's set holds it, and its row is composed as the fit composed it."""

    def __init__(self, store: FeatureStore, run: Run):
        self.run = run
        self.parts = {b.layer: StoredVectors(store, b.set_id) for b in run.blocks}
        self.set_id = composed_id(run.blocks)

    def __len__(self) -> int:
        return min(len(p) for p in self.parts.values())

    def lookup(self, ids: list[str]) -> dict[int, np.ndarray]:
        found = {layer: p.lookup(ids) for layer, p in self.parts.items()}
        hits = sorted(set.intersection(*(set(f) for f in found.values())))
        if not hits:
            return {}
        composed = self.run.compose({layer: np.stack([f[k] for k in hits]) for layer, f in found.items()})
        return dict(zip(hits, composed))


@dataclass
class Looked:
    """One request's images: content-hash ids, the run's stored rows of those the cache holds, decoded
    pixels of the others (which `Service.compute` turns into rows, batched with other requests'), once
    per distinct image: `same` maps a repeat's position to the position decoded for it."""
    names: list[str]
    ids: list[str]
    stored: dict[int, np.ndarray]
    pixels: dict[int, np.ndarray]
    same: dict[int, int] = dataclasses.field(default_factory=dict)


@dataclass
class Prepared:
    """One request's images: ids, labelled rows of those the cache holds, decoded pixels of the others
    (`same`: as in Looked)."""
    names: list[str]
    ids: list[str]
    rows: dict[int, dict]
    pixels: dict[int, np.ndarray]
    same: dict[int, int] = dataclasses.field(default_factory=dict)
    hits: frozenset = dataclasses.field(init=False)  # positions answered from the store

    def __post_init__(self):
        self.hits = frozenset(self.rows)

    def fill(self, computed: dict[int, dict]) -> None:
        """Add the rows computed for `pixels`, and each repeat's copy of its original's row."""
        self.rows.update(computed)
        for k, first in self.same.items():
            self.rows[k] = dict(self.rows[first], file=self.names[k])

    def cached(self, k: int) -> bool:
        return k in self.hits


class Service:
    """A run's backbone, head and feature set, loaded once."""

    def __init__(self, opts: ServeOptions, share: Iterable[Service] = ()):
        """`share`: services already loaded; one on this run's feature set lends it its encoder and
        stored vectors (runs that differ only in their heads build the network and read the set once)."""
        from ..encoding.encoder import Encoder
        from ..engines import choose
        from ..settings import resolve

        opts.check()
        self.opts = opts
        self.decoded = self.repeats = 0  # images decoded; uploads answered by an identical one's decode
        self._count = threading.Lock()
        cache = Path(opts.cache_dir)
        run, self.pipeline = load_head(cache, opts.run_id)
        # The dataset by its name, never the server's path to it: /info, /runs and the OpenAPI text show
        # `data`, and a client has no business learning the server's folders.
        self.run = dataclasses.replace(run, data=Path(run.data).name if run.data else run.data)
        if self.run.tta:
            raise FeatureCacheError(f"run {opts.run_id} averages test-time views (--tta), which serve does not "
                                    "compute; serve a run fitted without --tta (its --augment rows are fine)")
        blocks = self.run.blocks
        specs = self.run.stored_specs()
        if len(specs) > 1:
            raise FeatureCacheError(f"run {opts.run_id}: its taps are stored with different poolings "
                                    f"({', '.join(specs)}); serve takes runs whose taps share one stored pooling")
        self.layers = self.run.layers
        self.layer = self.layers[0]
        self.res = resolve(next(iter(specs.values())), None, cache)
        plain = len(blocks) == 1 and blocks[0].stored == blocks[0].pool
        sid = self.res.set_ids[self.layer] if plain else composed_id(blocks)
        same = [s for s in share if s.stored.set_id == sid]
        if same:
            self.encoder, self.engine, self.stored = same[0].encoder, same[0].engine, same[0].stored
            log(f"run {opts.run_id}: {self.run.head} head on the encoder and feature set {self.stored.set_id} "
                f"of run {same[0].opts.run_id} (loaded once)")
            return
        choose(opts.engine, self.res.precision.name)  # a bad --engine fails before the model is built
        t0 = time.perf_counter()
        self.encoder = Encoder(self.res, cache, opts.engine, "fail", self.layers, max_pixels=opts.max_pixels,
                               log=log)
        self.engine = self.encoder.engine  # builds the network
        blank = np.zeros((opts.max_batch, self.res.size, self.res.size, 3), np.uint8)
        self.compute(blank[:1])  # two batch sizes: tf.function then settles on one trace for any size
        self.compute(blank)
        self.stored = (StoredVectors(FeatureStore(cache), sid) if plain
                       else ComposedVectors(FeatureStore(cache), self.run))
        log(f"run {opts.run_id}: {self.run.describe()} loaded on {self.engine} and warmed up in "
            f"{time.perf_counter() - t0:.1f} s; {len(self.stored)} images in feature set {self.stored.set_id}")

    def compute(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, size, size, 3) -> (N, D) rows, exactly as extraction makes them (same encoder, the
        run's blocks)."""
        return self.run.compose(self.encoder.encode_pixels(pixels))

    def look_up(self, named: list[tuple[str, bytes]]) -> Looked:
        """The run's rows of a request's images where the cache holds them (by content hash, as the cache
        ids images); the others decoded for `compute` (a bad one fails the request). /predict and /embed
        both start here."""
        ids = [imagelib.content_hash(data) for _, data in named]
        stored = self.stored.lookup(ids)
        first: dict[str, int] = {}  # id -> the position decoded for it
        same = {}
        for k, i in enumerate(ids):
            if k not in stored:
                same[k] = first.setdefault(i, k)
        same = {k: f for k, f in same.items() if k != f}
        declared = {k: declared_pixels(named[k][1]) for k in sorted(set(first.values()))}
        # An image over --max-pixels is refused by its own, more telling message, from its header (no pixel
        # decoded), before the request's budget is counted over the others.
        fits = [k for k, n in declared.items() if n <= self.opts.max_pixels]
        todo = [k for k in declared if k not in fits] + fits
        sizes = [declared[k] for k in fits]
        pixels = {}
        for j, k in enumerate(todo):
            if j == len(todo) - len(fits):
                self._check_budget(sizes)
            with DECODING:
                pixels[k] = self.decode(*named[k])  # resized inside: the full-size pixels are dropped there
        with self._count:
            self.decoded += len(todo)
            self.repeats += len(same)
        if sum(sizes) >= TRIM_AFTER_PIXELS:
            give_memory_back()
        return Looked([n for n, _ in named], ids, stored, pixels, same)

    def _check_budget(self, sizes: list[int]) -> None:
        total, budget = sum(sizes), self.opts.max_request_pixels
        if total > budget:
            raise OverBudget(f"the request's {len(sizes)} new images would decode to {total:,} pixels, over the "
                             f"budget of {budget:,} per request; send fewer or smaller images, or start the "
                             f"server with a larger --max-request-pixels")

    def prepare(self, named: list[tuple[str, bytes]], top: int) -> Prepared:
        """`look_up`, with the stored rows labelled."""
        found = self.look_up(named)
        hits = sorted(found.stored)
        rows = dict(zip(hits, self._label([found.names[k] for k in hits], [found.stored[k] for k in hits], top)))
        return Prepared(found.names, found.ids, rows, found.pixels, found.same)

    def decode(self, name: str, data: bytes) -> np.ndarray:
        return self.encoder.decode(data, name)  # the pixel limit (opts.max_pixels) applies before decoding

    def label_batch(self, items: list[tuple[str, np.ndarray, int]]) -> list[dict]:
        """(name, pixels, top) of new images from several requests -> one forward pass, one head call."""
        names, pixels, tops = zip(*items)
        rows = self._label(list(names), self.compute(np.stack(pixels)), max(tops))
        for row, top in zip(rows, tops):
            row["top"] = row["top"][:top]
        return rows

    def _label(self, names: list[str], vectors, top: int) -> list[dict]:
        if not names:
            return []
        return label_rows(names, self.pipeline, np.asarray(vectors), list(self.run.class_names), top)

    def info(self) -> dict:
        r, res = self.run, self.res
        info = {"run": r.id, "method": r.describe(), "backbone": res.backbone.name, "weights": res.weights.label,
                "engine": self.engine, "precision": res.precision.name,
                "layer": self.layer, "pooling": res.pool, "size": res.size, "resize": res.resize,
                "preprocess": res.preprocess_mode, "head": r.head, "head_options": r.head_options,
                "normalize": r.normalize, "pca": r.pca, "augment": list(r.augment), "n_train": r.n_train,
                "class_names": list(r.class_names),
                "feature_set": {"id": self.stored.set_id, "key": res.keys[self.layer],
                                "stored_images": len(self.stored)},
                "metrics": r.metrics, "data": r.data, "created": r.created,
                "limits": {k: v for k, v in dataclasses.asdict(self.opts).items() if k.startswith("max_")},
                "encoder": {"engine": self.engine, "forward_passes": self.encoder.passes,
                            "images_encoded": self.encoder.encoded},
                "decoding": {"images_decoded": self.decoded, "repeats_reused": self.repeats,
                             "in_flight_limit": DECODE_SLOTS, "in_flight_peak": DECODING.peak}}
        if self.stored.set_id != r.feature_set:
            info["notice"] = (f"the run was fitted on feature set {r.feature_set}; these library versions "
                              f"key it as {self.stored.set_id}, so its training images are not cache hits")
        return info
