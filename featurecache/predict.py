"""Prediction: image files -> (cached or fresh) features -> a saved run's head -> labels and scores.

New files go through `extract` (hence the run's encoder) and are stored, so predicting them again, or
serving them, is a cache hit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .compose import Block, rows
from .datasets import FileImages
from .errors import FeatureCacheError
from .extract import run_extract
from .runs import load_head
from .settings import FeatureSpec, RunSettings
from .store import FeatureStore


def run_spec(record: dict) -> FeatureSpec:
    """The run's feature options, with the size and layers it actually used pinned."""
    spec = dict(record["spec"], size=record["size"], layers=tuple(record.get("layers") or [record["layer"]]))
    return FeatureSpec(**spec)


def run_blocks(record: dict) -> list[Block]:
    """How the run's rows are made from stored vectors; runs saved before fit-time composition had one
    tap read as stored."""
    if record.get("blocks"):
        return [Block.from_dict(b) for b in record["blocks"]]
    pool = record["spec"]["pool"]
    return [Block(record["layer"], pool, pool, record["feature_set"], (), record["dims"])]


def stored_specs(record: dict, view: str = "") -> dict[str, FeatureSpec]:
    """Stored pooling -> the spec that extracts (or finds) the run's taps stored that way (of a view)."""
    spec, blocks = run_spec(record), run_blocks(record)
    return {pool: replace(spec, pool=pool, layers=tuple(b.layer for b in blocks if b.stored == pool), view=view)
            for pool in dict.fromkeys(b.stored for b in blocks)}


def run_views(record: dict) -> list[str]:
    """The views a run's test images are scored on: the images, and their augmented views with --tta."""
    return ["", *record.get("augment", [])] if record.get("tta") else [""]


def features_for_files(paths: list[Path], record: dict, cache_dir: Path, batch_size: int = 64,
                       progress: bool = False, log=None, engine: str = "auto", view: str = "") -> np.ndarray:
    """The run's rows for `paths` (or for their `view`); new images are computed and stored too."""
    for p in paths:
        if not Path(p).is_file():
            raise FeatureCacheError(f"{p}: no such file")
    files = FileImages([Path(p) for p in paths])
    run = RunSettings(cache_dir, engine, batch_size, progress, log=log)
    stored = {}
    for spec in stored_specs(record, view).values():
        res, _ = run_extract([files], spec, run)
        stored.update({layer: FeatureStore(cache_dir).get(res.set_ids[layer]).gather(files.ids)
                       for layer in spec.layers})
    return rows(run_blocks(record), stored)


def label_rows(names: list[str], pipeline, x, class_names: list[str], top: int) -> list[dict]:
    """`x`: the rows, or a list of the rows of several views (--tta runs), whose scores are averaged."""
    from .heads import averaged

    s = averaged(pipeline, x if isinstance(x, list) else [x])
    rows = []
    for name, row in zip(names, s.values):
        order = np.argsort(-row)[:max(top, 1)]
        rows.append({"file": name, "label": class_names[s.classes[order[0]]], "score": float(row[order[0]]),
                     "score_kind": s.kind,
                     "top": [{"label": class_names[s.classes[j]], "score": float(row[j])} for j in order]})
    return rows


def predict_files(paths: list[Path], run_id: str, cache_dir: Path, top: int = 1, batch_size: int = 64,
                  progress: bool = False, log=None, engine: str = "auto") -> list[dict]:
    record, pipeline = load_head(cache_dir, run_id)
    xs = [features_for_files(paths, record, cache_dir, batch_size, progress, log, engine, view)
          for view in run_views(record)]
    return label_rows([str(p) for p in paths], pipeline, xs, record["class_names"], top)
