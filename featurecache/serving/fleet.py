"""Several fitted runs behind one server, with no HTTP in it (featurecache/serving/server.py puts it behind HTTP).

`featurecache serve --run A --run B` (or `--all-runs`) loads every run's head, but one encoder and one
read-only view of the stored vectors per *feature set*: runs fitted on the same set (say a linsvc and
a logreg on the same codes) differ only in their heads, so they share the network, its warm-up, its
memory and the cache index. New images from requests to any of those runs go through one micro-batch
queue per set, so one forward pass serves them all, then each run's head labels its own rows.

The first run given is the default; `?run=ID` picks another, and an unknown id is a 404 that names
the ones served. `/embed` uses a run's set, or `?set=ID`, one of the served sets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import FeatureCacheError
from ..runs.predict import label_rows
from ..runs.record import load, runs_dir
from .service import ServeOptions, Service, log as server_log
from ..store.sets import FeatureStore


# What a run.json that parses but lacks a key, or holds one of the wrong type, raises while it is read:
# with --all-runs that run is reported in one line and left out, the others are served.
DAMAGED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def damage(run_id: str, e: Exception) -> FeatureCacheError:
    """One line for a run whose record is damaged (naming the key, for a missing one)."""
    what = f"key {e} missing" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
    return FeatureCacheError(f"run {run_id}: damaged run.json ({what}); fit the run again or remove its folder")


class NotServed(LookupError):
    """A run or feature set a request named that this server does not serve (HTTP 404)."""


def all_run_ids(cache_dir: Path) -> list[str]:
    """Every saved run, newest first (so `--all-runs` serves the latest fit by default)."""
    found = []
    for path in runs_dir(cache_dir).glob("*/run.json"):
        try:
            created = load(cache_dir, path.parent.name).created
        except (OSError, FeatureCacheError, *DAMAGED):
            created = ""  # `load` names the damage again when the run is served
        found.append((created, path.parent.name))
    if not found:
        raise FeatureCacheError(f"--all-runs: no runs in {runs_dir(cache_dir)}; fit one with `featurecache fit`")
    return [run_id for _, run_id in sorted(found, reverse=True)]


class Fleet:
    """The served runs (ordered; the first is the default) and their feature sets."""

    def __init__(self, opts: ServeOptions, run_ids: list[str], skip_broken: bool = False, log=server_log):
        self.opts = opts
        self.runs: dict[str, Service] = {}
        self.sets: dict[str, Service] = {}  # set id -> the service whose encoder that set's runs share
        cache = Path(opts.cache_dir)
        for run_id in dict.fromkeys(run_ids):
            try:
                try:
                    load(cache, run_id)  # the record alone first, so its damage is not mistaken for another fault
                except DAMAGED as e:
                    raise damage(run_id, e) from e
                svc = Service(dataclasses.replace(opts, run_id=run_id), share=self.sets.values())
                self.runs[run_id] = svc
                self.sets.setdefault(svc.stored.set_id, svc)
            except FeatureCacheError as e:
                if not skip_broken:
                    raise
                log(f"warning: --all-runs: leaving run {run_id} out ({e})")
        if not self.runs:
            raise FeatureCacheError(f"--all-runs: none of the runs in {runs_dir(cache)} could be loaded")
        self.default = next(iter(self.runs))

    # ---- names a request gives ---------------------------------------------------------------------
    def run(self, run_id: str | None) -> Service:
        if run_id is None or run_id == "":
            return self.runs[self.default]
        if run_id not in self.runs:
            raise NotServed(f"run {run_id!r} is not served here; known runs: {', '.join(self.runs)}")
        return self.runs[run_id]

    def set_for(self, run_id: str | None, set_id: str | None) -> Service:
        """The service whose encoder and stored vectors make `set_id` (default: the run's own set)."""
        if not set_id:
            return self.sets[self.run(run_id).stored.set_id]
        hits = [s for s in self.sets if s == set_id] or [s for s in self.sets if s.startswith(set_id)]
        if len(hits) != 1:
            served = "; ".join(f"{s} (runs {', '.join(self.runs_on(s))})" for s in self.sets)
            raise NotServed(f"feature set {set_id!r} is not served here (`GET /sets` lists the stored ones); "
                            f"served sets: {served}")
        if run_id and self.run(run_id).stored.set_id != hits[0]:
            raise NotServed(f"run {run_id} does not have feature set {hits[0]}; its set is "
                            f"{self.run(run_id).stored.set_id}")
        return self.sets[hits[0]]

    def runs_on(self, set_id: str) -> list[str]:
        return [r for r, svc in self.runs.items() if svc.stored.set_id == set_id]

    # ---- the forward pass shared by a set's runs -------------------------------------------------
    def batch_fn(self, set_id: str):
        """items (service or None, name, pixels, top) -> one forward pass for all of them, then each
        run's head on its own rows; an item without a service (an /embed) gets its vector back."""
        encoder = self.sets[set_id]

        def run_batch(items: list) -> list:
            vectors = encoder.compute(np.stack([item[2] for item in items]))
            out: list = list(vectors)
            heads: dict[str, list[int]] = {}
            for k, (svc, *_rest) in enumerate(items):
                if svc is not None:
                    heads.setdefault(svc.opts.run_id, []).append(k)
            for run_id, ks in heads.items():
                svc, tops = self.runs[run_id], [items[k][3] for k in ks]
                rows = label_rows([items[k][1] for k in ks], svc.pipeline, vectors[ks], list(svc.run.class_names),
                                  max(tops))
                for k, row, top in zip(ks, rows, tops):
                    row["top"] = row["top"][:top]
                    out[k] = row
            return out

        return run_batch

    # ---- listings ----------------------------------------------------------------------------------
    def run_list(self) -> list[dict]:
        return [{"run": r, "default": r == self.default, "method": svc.run.describe(), "features": svc.run.features,
                 "head": svc.run.head, "test_accuracy": svc.run.metrics.get("test_accuracy"),
                 "set": svc.stored.set_id} for r, svc in self.runs.items()]

    def stored_sets(self) -> list[dict]:
        """Every feature set in the cache, and whether (and by which runs) this server embeds with it."""
        out = []
        for fs in FeatureStore(Path(self.opts.cache_dir)).all():
            try:
                key, dims = fs.key, fs.dims
            except FeatureCacheError:
                continue  # damaged metadata: `featurecache cache verify` is where that is reported
            served = fs.id in self.sets
            out.append({"set": fs.id, "served": served, "runs": self.runs_on(fs.id), "dims": dims,
                        "images": len(self.sets[fs.id].stored) if served else None,
                        "key": {k: v for k, v in key.items() if k != "libraries"}})
        listed = {s["set"] for s in out}
        for set_id, svc in self.sets.items():  # rows composed at fit time (several taps, a pooling view)
            if set_id not in listed:
                out.append({"set": set_id, "served": True, "runs": self.runs_on(set_id),
                            "dims": svc.run.dims, "images": len(svc.stored), "key": None,
                            "composed_of": [b.set_id for b in svc.run.blocks]})
        return out
