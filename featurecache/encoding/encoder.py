"""The encoder: images in, one vector array per tap out. The only place where the chain

    decode -> resize -> stack -> preprocess -> forward (engine) -> pool

is composed, with its rules for odd images and the --on-error policy. extract, plan, predict, serve,
verify and int8 calibration all run images through an `Encoder`, so they cannot drift apart
(tests/encoding/test_chains.py holds them to the same vectors).

An encoder is built once from resolved feature settings, the engine option and the cache folder
(where converted graphs live). `Encoder.description` is a small frozen value of plain fields that
pickles; `EncoderDescription.build()` makes the same encoder in another process (a cluster worker),
giving the same vectors.

Items are image files (str or path), encoded bytes, uint8 arrays (HxW, HxWx1, HxWx3, HxWx4), or a
zero-argument callable returning one of those (a dataset source's `load`, run only when needed).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..data import augment
from . import images as imagelib
from ..errors import FeatureCacheError
from .pooling import Pooling
from .preprocessing import preprocess
from ..settings import ON_ERROR, FeatureSpec, Resolved, resolve


@dataclass(frozen=True)
class EncoderDescription:
    """Everything needed to rebuild an encoder elsewhere: plain fields only, so it pickles."""
    spec: FeatureSpec  # size, taps (`layers`) and int8 calibration pinned
    cache_dir: str
    engine: str = "auto"
    on_error: str = "fail"
    max_pixels: int = imagelib.MAX_PIXELS

    def build(self, log=None) -> Encoder:
        res = resolve(self.spec, None, Path(self.cache_dir))
        return Encoder(res, self.cache_dir, self.engine, self.on_error, taps=self.spec.layers,
                       max_pixels=self.max_pixels, log=log)


@dataclass
class Batch:
    """One batch of items after decoding: those that decoded, resized, and why the others did not."""
    keys: list  # the caller's key (an image id, a position) of each decoded item, in order
    pixels: np.ndarray | None  # uint8 (n, size, size, 3); None when nothing decoded
    skipped: dict = field(default_factory=dict)  # key -> why it was left out (on_error="skip")

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Encoded:
    keys: list  # of the items encoded, in order
    vectors: dict[str, np.ndarray]  # tap -> (len(keys), dims) float32
    skipped: dict  # key -> why (on_error="skip")


def checkable(item) -> bool:
    """Whether `check` can tell cheaply that an item will not decode (files and bytes; arrays always do)."""
    return isinstance(item, (str, os.PathLike, bytes))


def check(item, name: str | None = None, max_pixels: int = imagelib.MAX_PIXELS) -> str | None:
    """Why `item` will not decode, or None: at about half the cost of decoding (JPEGs at draft scale)."""
    try:
        if isinstance(item, (str, os.PathLike)):
            imagelib.check_file(Path(item))
        elif isinstance(item, bytes):
            imagelib.open_image(item, name or "image", max_pixels, draft=True)
    except FeatureCacheError as e:
        return str(e)
    return None


def decode(item, name: str | None, size: int, resize: str, max_pixels: int = imagelib.MAX_PIXELS) -> np.ndarray:
    """One item as uint8 (size, size, 3): every image reaches a backbone through here."""
    if callable(item) and not isinstance(item, np.ndarray):
        item = item()
    target = size if resize == "auto" else None  # JPEG draft decoding is part of `auto` only (it moves pixels)
    if isinstance(item, (str, os.PathLike)):
        rgb = imagelib.load_file(Path(item), max_pixels=max_pixels, target=target)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        rgb = imagelib.decode_bytes(bytes(item), name or "image", max_pixels, target=target)
    elif isinstance(item, np.ndarray):
        rgb = imagelib.array_to_rgb(item, name or "array")
    else:
        raise FeatureCacheError(f"{name or 'image'}: {type(item).__name__} is not an image; pass a path, "
                                "encoded bytes or a uint8 array")
    return imagelib.resize(rgb, size, resize)


class Encoder:
    """Images -> {tap: vectors} for one resolved feature setting, on one engine.

    res: settings.Resolved; cache_dir: where converted graphs are cached; engine: auto | tensorflow |
    onnxruntime | openvino; on_error: fail (an unreadable image raises) | skip (left out, reported);
    taps: the layers to return (default: all of res.layers); model: a Keras model already built from
    `res` (spares a second build); calibration: () -> items of the int8 calibration sample, used
    only when the int8 graph is not cached yet; measure: `auto` may time the installed engines on
    this graph when this machine has no remembered choice (a large extraction, `plan`: engines/choice.py).
    The network is built on first use (`load()`), so an encoder is cheap to make and to describe.
    """

    def __init__(self, res: Resolved, cache_dir, engine: str = "auto", on_error: str = "fail", taps=None, *,
                 max_pixels: int = imagelib.MAX_PIXELS, model=None,
                 calibration: Callable[[], list[Any]] | None = None, log=None, measure: bool = False):
        if on_error not in ON_ERROR:
            raise FeatureCacheError(f"--on-error {on_error}: use fail or skip")
        self.res, self.cache_dir, self.option, self.on_error = res, Path(cache_dir), engine, on_error
        self.taps = tuple(dict.fromkeys(taps or res.layers))
        self.max_pixels, self.log, self.measure = max_pixels, log, measure
        self._model, self._calibration, self._forward = model, calibration, None
        self._pool = None  # (pid, decoding threads, their number), made on first use
        self.passes = self.encoded = 0  # forward passes run and images through them (a server's batching)

    # ---- description -------------------------------------------------------------------------------
    @property
    def description(self) -> EncoderDescription:
        if self.res.spec is None:  # a Resolved made by hand, not by settings.resolve
            raise FeatureCacheError("this encoder's settings were not resolved by featurecache.settings.resolve; "
                                    "it cannot be described")
        # An absolute cache folder: a process started elsewhere (a worker's cwd) finds the same graphs.
        # Once built, the engine auto chose: a worker runs the same one without measuring again.
        engine = self._forward.engine if self._forward is not None else self.option
        return EncoderDescription(replace(self.res.spec, layers=self.taps, size=self.res.size),
                                  str(self.cache_dir.absolute()), engine, self.on_error, self.max_pixels)

    @property
    def size(self) -> int:
        return self.res.size

    @property
    def engine(self) -> str:
        """The engine that runs the network (auto resolved); builds the network if not built yet."""
        return self.load()._forward.engine

    # ---- the network --------------------------------------------------------------------------------
    def load(self) -> Encoder:
        """Make the forward pass on the engine (once), building the network only where it is needed."""
        if self._forward is None:
            from ..backbones.build import build_model
            from ..engines import make_forward
            from ..engines.graphs import Graph

            res = self.res

            def model():  # built only if a graph must be converted or TensorFlow runs it (engines.graphs.built)
                if self._model is None:
                    self._model = build_model(res.backbone, res.weights, res.size)
                return self._model

            graph = Graph(res.backbone.name, res.weights.id, res.size, self.taps)
            images = (lambda: self._calibration_batch()) if self._calibration else None
            self._forward = make_forward(self.option, model, graph, self.cache_dir, res.precision,
                                         images, self.log, self.measure)
            self._model = None  # the forward pass holds what it needs
        return self

    def _calibration_batch(self) -> np.ndarray:
        """The int8 calibration sample, preprocessed; unreadable images are left out."""
        items = self._calibration()
        pixels = [p for p in (self._try_decode(item) for item in items) if p is not None]
        return preprocess(np.stack(pixels), self.res.preprocess_mode)

    def _try_decode(self, item):
        try:
            return self.decode(item)
        except FeatureCacheError:
            return None

    # ---- images -------------------------------------------------------------------------------------
    def decode(self, item, name: str | None = None) -> np.ndarray:
        """One item as the network's uint8 input (size, size, 3); raises FeatureCacheError naming it."""
        rgb = decode(item, name, self.res.size, self.res.resize, self.max_pixels)
        return augment.apply(rgb, self.res.spec.view) if self.res.spec is not None else rgb

    def _decoders(self) -> ThreadPoolExecutor:
        """Threads that decode a batch's items side by side (Pillow's decoders and resizers release the
        GIL): one per core, made on first use, and again in a forked child (threads do not survive fork)."""
        if self._pool is None or self._pool[0] != os.getpid():
            from ..engines import threads

            n = threads()
            self._pool = (os.getpid(), ThreadPoolExecutor(n, thread_name_prefix="featurecache-decode"), n)
        return self._pool[1]

    def prepare(self, items, names=None, keys=None) -> Batch:
        """Decode and resize a batch (no network), its items spread over one thread per core and written
        straight into the batch array: under on_error="fail" the first unreadable item (in order) raises,
        under "skip" it is left out and listed. Safe to run in a thread beside `run`."""
        keys = list(range(len(items))) if keys is None else list(keys)
        n, size = len(items), self.res.size
        pixels = np.empty((n, size, size, 3), np.uint8)
        errors: list = [None] * n

        def decode_slice(ks: range) -> None:
            for k in ks:
                try:
                    pixels[k] = self.decode(items[k], names[k] if names is not None else None)
                except FeatureCacheError as e:
                    errors[k] = e

        pool = self._decoders()
        step = -(-n // self._pool[2]) if n else 1  # contiguous slices: one hand-off per thread, not per image
        list(pool.map(decode_slice, [range(k, min(k + step, n)) for k in range(0, n, step)]))
        bad = [k for k in range(n) if errors[k] is not None]
        if bad and self.on_error == "fail":
            raise errors[bad[0]]
        skipped = {keys[k]: str(errors[k]) for k in bad}
        if bad:
            good = [k for k in range(n) if errors[k] is None]
            return Batch([keys[k] for k in good], pixels[good] if good else None, skipped)
        return Batch(keys, pixels if n else None, skipped)

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        """The network and pooling over a prepared batch: {tap: (len(batch), dims) float32}."""
        if batch.pixels is None:
            return {}
        return self.encode_pixels(batch.pixels)

    def encode_pixels(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (N, size, size, 3), already decoded and resized -> {tap: (N, dims) float32}."""
        outs = self.load()._forward(preprocess(np.asarray(pixels), self.res.preprocess_mode))
        self.passes, self.encoded = self.passes + 1, self.encoded + len(pixels)
        pooling = Pooling.parse(self.res.pool)
        return {t: pooling.maps(np.asarray(maps)) for t, maps in zip(self.taps, outs)}

    def encode(self, items, names=None, keys=None) -> Encoded:
        """Items -> vectors per tap, with the on-error policy applied."""
        batch = self.prepare(items, names, keys)
        return Encoded(batch.keys, self.run(batch), batch.skipped)

    def stream(self, chunks: Iterable[tuple]) -> Iterator[Encoded]:
        """Encode chunk after chunk ((items, names, keys) each), decoding the next (on `prepare`'s
        threads) while the network runs on this one (Pillow and the engines release the GIL): the local
        executor. A failure to decode surfaces when its chunk is due, after every chunk before it was yielded.
        The decode of chunk k+1 and the forward of chunk k share the cores, so a photo folder runs near
        1 / (1/forward rate + 1/decode rate) (scripts/bench_extract.py --photos)."""
        chunks = iter(chunks)
        with ThreadPoolExecutor(1) as pool:
            ahead = next(chunks, None)
            pending = pool.submit(self.prepare, *ahead) if ahead is not None else None
            while pending is not None:
                batch = pending.result()
                ahead = next(chunks, None)
                pending = pool.submit(self.prepare, *ahead) if ahead is not None else None
                yield Encoded(batch.keys, self.run(batch), batch.skipped)

    def __call__(self, items) -> dict[str, np.ndarray]:
        return self.encode(items).vectors


def measure_rate(encode, positions: list, batch: int, probe: int, t0: float) -> tuple[float, float, int]:
    """(setup seconds since `t0`, images/s, images timed) of `encode(chunk)` over `positions`: one batch
    first (model build, graph compilation, allocation: not steady state), then up to `probe` images timed
    in batches. plan's local warm-up and the Ray estimate both measure this way."""
    encode(positions[:batch])
    setup = time.perf_counter() - t0
    timed = positions[batch:batch + max(probe, batch)] or positions[:batch]
    t1 = time.perf_counter()
    for k in range(0, len(timed), batch):
        encode(timed[k:k + batch])
    return setup, len(timed) / (time.perf_counter() - t1), len(timed)
