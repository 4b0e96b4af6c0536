"""Fits larger than memory: the training matrix streamed from the stored parts, chunk by chunk.

A head that learns incrementally (declared `streams=True` in heads/registry.py: `sgd`) sees the
training rows in seeded, shuffled chunks, each read from the store and composed (featurecache/runs/compose.py)
on its own, for `max_iter` passes; the test rows are scored chunk by chunk too. Memory then holds one
chunk at a time, sized from `--max-memory`, whatever the number of images. Other heads need the whole
matrix at once; for them `too_big` says how large it is and what would make it fit.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import numpy as np

from . import compose
from ..errors import FeatureCacheError
from ..store.sets import FeatureStore

if TYPE_CHECKING:
    from ..data.datasets import DataOptions
    from ..settings import HeadSpec, RunSettings

MEMORY_SHARE = 0.75  # of this machine's memory, the default --max-memory
CHUNK_SHARE = 8  # a chunk takes at most 1/8 of --max-memory (the chunk, its normalised copy, the head's work)
EPOCHS = 5  # passes over the training rows when --max-iter is not given
TRAIN_SAMPLE = 10_000  # training rows scored for the train accuracy


def memory_limit() -> int:
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * MEMORY_SHARE)


def too_big(need: int, limit: int, rows: int, dims: int, head: str) -> str:
    from ..heads import HEADS

    streaming = ", ".join(n for n, h in HEADS.items() if h.streams)
    return (f"--head {head}: the matrix is {_size(need)} ({rows:,} rows x {dims:,} float32), over --max-memory "
            f"{_size(limit)}; shrink it (--pca N, a pooling view such as --pool max2x2, --max-train N) or "
            f"use a head that streams it from the cache (--head {streaming})")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def fit_streamed(data: DataOptions, rows, run: RunSettings, head: HeadSpec) -> tuple:
    """Fit `head` (a settings.HeadSpec, its normalisation concrete) with partial_fit over chunks of the
    stored rows of `rows` (fit.Rows: the images' blocks and the augmented views'), read from the run's
    cache: (pipeline, metrics, fit seconds, what the run records of the streaming)."""
    from .. import heads
    from .record import evaluate

    ds, composed, options = rows.ds, rows.composed, head.option_values
    normalize, tta, limit = head.normalize, head.tta, head.max_memory or memory_limit()
    blocks = composed.blocks
    dims = sum(b.dims for b in blocks)
    if normalize == "standard":
        raise FeatureCacheError("--normalize standard needs the whole matrix; a streamed fit takes l2, l2-per-tap "
                                "or none")
    chunk = max(256, limit // CHUNK_SHARE // (4 * dims))
    pipeline = heads.make_pipeline(head.head, heads.with_seed(head.head, options, data.seed), normalize, None,
                                   tuple(b.dims for b in blocks))
    norm, model = pipeline.named_steps["normalize"], pipeline.named_steps["head"]
    store = FeatureStore(run.cache_dir)
    train_ids, labels = ds.train.images.ids, np.asarray(ds.train.labels)
    sources = [blocks, *(v.blocks for v in rows.views.values())]
    classes = np.arange(len(ds.class_names))
    epochs = int(options.get("max_iter") or EPOCHS)
    rng = np.random.default_rng(data.seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for source in sources:
            order = rng.permutation(len(train_ids))
            for lo in range(0, len(order), chunk):
                pick = np.sort(order[lo:lo + chunk])  # sorted: rows of a part are read together
                x = compose.read(store, source, [train_ids[i] for i in pick])
                if norm != "passthrough":
                    x = norm.fit_transform(x)
                model.partial_fit(x, labels[pick], classes=classes)
    fit_seconds = time.perf_counter() - t0
    sample = np.sort(rng.choice(len(train_ids), min(TRAIN_SAMPLE, len(train_ids)), replace=False))
    test_ids = ds.test.images.ids
    views = sources if tta else [blocks]

    def predict(ids, sources):  # chunk by chunk, so scoring stays inside the bound too
        return np.concatenate([heads.averaged(pipeline, [compose.read(store, v, ids[lo:lo + chunk])
                                                         for v in sources]).top_labels[:, 0]
                               for lo in range(0, len(ids), chunk)])

    metrics = evaluate(pipeline, None, labels[sample], None, ds.test.labels, ds.class_names,
                       predict(test_ids, views), predict([train_ids[i] for i in sample], [blocks]))
    return pipeline, metrics, fit_seconds, {"n_train": len(train_ids) * len(sources), "streamed": {
        "chunk_rows": int(chunk), "epochs": epochs, "max_memory": int(limit)}}
