"""Fit-time composition: the matrix a head sees, made from stored feature sets without the network.

A fit names one or more taps (`--layer A --layer B`, concatenated in that order) and a pooling that is
either stored (`flatten`, `avg`, `max`) or a view of a stored flattened map (`max2x2`, `avg2x2`,
`gridN`, and `avg`/`max` too: featurecache/encoding/pooling.py). For each tap, `gather` reads, in this order of
preference: a set stored with that pooling; the tap's stored flattened map, pooled here; or (with
`compute`) what extraction stores for it. Every choice is recorded in the run as a `Block`, and
`rows()` turns the encoder's vectors of new images into a run's rows with the same blocks, so fit,
predict and serve cannot disagree about what a row is.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..store import upgrades
from ..errors import FeatureCacheError
from ..encoding.pooling import STORED, Pooling
from ..settings import FeatureSpec, RunSettings, calibrated, resolve
from ..store.sets import FeatureStore


@dataclass(frozen=True)
class Block:
    """One tap's columns in a fit: which set was read and how its rows became these columns."""
    layer: str
    pool: str  # the pooling the fit asked for
    stored: str  # the pooling of the set read (equal to `pool`, or "flatten" for a view)
    set_id: str
    shape: tuple  # the tap's output for one image at this size, e.g. (8, 8, 256)
    dims: int
    source: str = "stored"  # stored | derived (a view of the stored flattened map) | extracted

    def as_dict(self) -> dict:
        return dict(asdict(self), shape=list(self.shape))

    @classmethod
    def from_dict(cls, d: dict) -> Block:
        return cls(**dict(d, shape=tuple(d["shape"])))

    def rows(self, stored_rows: np.ndarray) -> np.ndarray:
        return stored_rows if self.stored == self.pool else Pooling.parse(self.pool).rows(stored_rows, self.shape)


@dataclass
class Composed:
    res: object  # settings.Resolved of the fit's spec (the asked-for pooling's keys where stored)
    blocks: list[Block]
    x_train: np.ndarray
    x_test: np.ndarray

    @property
    def layers(self) -> list[str]:
        return [b.layer for b in self.blocks]

    def describe(self) -> str:
        pools = {b.pool for b in self.blocks}
        return (f"{self.res.backbone.name}/{'+'.join(self.layers)}/{'+'.join(sorted(pools))} {self.res.size}px")


def rows(blocks: list[Block], stored: dict[str, np.ndarray]) -> np.ndarray:
    """A run's rows from each block's stored-pooling vectors ({layer: (n, stored dims)}), in block order."""
    parts = [b.rows(np.asarray(stored[b.layer], np.float32)) for b in blocks]
    return parts[0] if len(parts) == 1 else np.hstack(parts)


def stored_spec(spec: FeatureSpec, pool: str) -> FeatureSpec:
    return replace(spec, pool=pool)


def _shapes(res, cache_dir: Path) -> dict[str, tuple]:
    from ..encoding.taps import catalogue

    return {t.name: tuple(t.shape) for t in catalogue(res.backbone, res.size, cache_dir)}


def _complete(fs, ids: list[str]) -> bool:
    if fs is None:
        return False
    skipped = fs.skipped()
    return not fs.missing([i for i in ids if i not in skipped])


def gather(ds, spec: FeatureSpec, run: RunSettings, compute: bool = False, data=None,
           splits: tuple[str, ...] = ("train", "test")) -> Composed:
    """The train and test matrices of `spec`'s taps and pooling for dataset `ds`, from the cache
    (`splits`: only those; an augmented view (`spec.view`) is gathered for the training images alone).

    Images a set left out as unreadable are dropped from `ds` itself (labels stay aligned); sets that
    left out different images cannot share a row and are refused, naming both.
    """
    first, blocks = plan(ds, spec, run, compute, data, splits)
    store = FeatureStore(run.cache_dir)
    out = {split: read(store, blocks, getattr(ds, split).images.ids) for split in splits}
    return Composed(first, blocks, out.get("train"), out.get("test"))


def read(store: FeatureStore, blocks: list[Block], ids: list[str]) -> np.ndarray:
    """The composed rows of `ids` (every block's set must hold them)."""
    parts = [b.rows(store.get(b.set_id).gather(ids)) for b in blocks]
    return parts[0] if len(parts) == 1 else np.hstack(parts)


def plan(ds, spec: FeatureSpec, run: RunSettings, compute: bool = False, data=None,
         splits: tuple[str, ...] = ("train", "test")):
    """(resolved spec, blocks): which stored set each tap is read from and how, extracting what is
    missing when `compute`; reads no vectors (see `gather`, `read`)."""
    pooling = Pooling.parse(spec.pool)
    pool = pooling.name
    spec = calibrated(spec, ds.train.images.ids)
    store = FeatureStore(run.cache_dir)
    native = ds.native_size()
    candidates = ([pool] if not pooling.is_view else []) + (["flatten"] if pool != "flatten" else [])
    resolved = {c: resolve(stored_spec(spec, c), native, run.cache_dir) for c in candidates}
    first = resolved[candidates[0]]
    if any(upgrades.outdated(r) for r in resolved.values()):  # sets made with other library versions
        from ..extraction.extract import check_upgrades

        resolved = {c: check_upgrades(r, [getattr(ds, split).images for split in splits], store, run)
                    for c, r in resolved.items()}
        first = resolved[candidates[0]]
    ids = [i for split in splits for i in getattr(ds, split).images.ids]
    chosen: dict[str, tuple[str, str]] = {}  # layer -> (stored pooling, source)
    for layer in first.layers:
        for c in candidates:
            if _complete(store.get(resolved[c].set_ids[layer]), ids):
                chosen[layer] = (c, "stored" if c == pool else "derived")
                break
    lacking = [layer for layer in first.layers if layer not in chosen]
    if lacking:
        extract_pool = pooling.stored
        if not compute:
            raise FeatureCacheError(_missing_message(spec, extract_pool, lacking, first, data, ds, run,
                                                     resolved, store, ids))
        from ..extraction.extract import run_extract

        run_extract([getattr(ds, split).images for split in splits],
                    replace(stored_spec(spec, extract_pool), layers=tuple(lacking)), run, native)
        chosen.update({layer: (extract_pool, "extracted") for layer in lacking})
    shapes = _shapes(first, run.cache_dir)
    blocks = []
    for layer in first.layers:
        stored, source = chosen[layer]
        blocks.append(Block(layer, pool, stored, resolved[stored].set_ids[layer], shapes[layer],
                            pooling.dims(shapes[layer]), source))
    _drop_skipped(ds, [store.get(b.set_id) for b in blocks], run)
    return first, blocks


def _drop_skipped(ds, sets, run: RunSettings) -> None:
    skipped = [fs.skipped() for fs in sets]
    for fs, s in zip(sets[1:], skipped[1:]):
        if set(s) != set(skipped[0]):
            raise FeatureCacheError(f"feature sets {sets[0].id} and {fs.id} left out different unreadable images "
                                    f"({len(skipped[0])} and {len(s)}); taps fitted together need the same images: "
                                    "extract them in one command")
    dropped = ds.drop(skipped[0]) if skipped[0] else []
    if dropped:
        run.say(f"notice: left out {len(dropped)} unreadable image(s) that extraction skipped: "
                + ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else ""))


def _missing_message(spec, extract_pool, lacking, res, data, ds, run, resolved, store, ids) -> str:
    from ..settings import default_cache_dir, spec_args

    cmd = shlex.join(["featurecache", "extract", *(data.args() if data else ["--data", ds.name]),
                      *spec_args(replace(spec, pool=extract_pool, layers=tuple(lacking))),
                      *(["--augment", spec.view] if spec.view else []),
                      *(["--cache-dir", str(run.cache_dir)] if run.cache_dir != default_cache_dir() else [])])
    if spec.pool != extract_pool:  # a view: say what the stored sets of that tap allow
        others = [p for p in STORED if p != "flatten" and
                  _complete(store.get(resolve(stored_spec(spec, p), ds.native_size(), run.cache_dir)
                                      .set_ids[lacking[0]]), ids)]
        if others:
            return (f"--pool {spec.pool} is a view of the flattened map, but {lacking[0]} is stored only "
                    f"{others[0]}-pooled (which allows --pool {others[0]}); store the map (--pool flatten, "
                    f"extract's default) with `{cmd}`, or add --extract")
    first = store.get(resolved[extract_pool].set_ids[lacking[0]]) if extract_pool in resolved else None
    missing = len(ids) if first is None else len(first.missing(ids))
    return (f"no cached features for {missing} of {len(ids)} images ({spec.model}/{'+'.join(lacking)} at "
            f"{res.size}px); run `{cmd}` or add --extract")
