"""Prediction: image files -> (cached or fresh) features -> a saved run's head -> labels and scores.

New files go through `extract` (hence the run's encoder) and are stored, so predicting them again, or
serving them, is a cache hit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.datasets import FileImages
from ..errors import FeatureCacheError
from .record import Run, load_head
from ..settings import RunSettings


def features_for_files(paths: list[Path], run: Run, settings: RunSettings, view: str = "") -> np.ndarray:
    """The run's rows for `paths` (or for their `view`); new images are computed and stored too."""
    for p in paths:
        if not Path(p).is_file():
            raise FeatureCacheError(f"{p}: no such file")
    return run.rows(FileImages([Path(p) for p in paths]), settings, view)


def label_rows(names: list[str], pipeline, x, class_names: list[str], top: int) -> list[dict]:
    """`x`: the rows, or a list of the rows of several views (--tta runs), whose scores are averaged."""
    from ..heads import averaged

    s = averaged(pipeline, x if isinstance(x, list) else [x])
    rows = []
    for name, row in zip(names, s.values):
        order = np.argsort(-row)[:max(top, 1)]
        rows.append({"file": name, "label": class_names[s.classes[order[0]]], "score": float(row[order[0]]),
                     "score_kind": s.kind,
                     "top": [{"label": class_names[s.classes[j]], "score": float(row[j])} for j in order]})
    return rows


def predict_files(paths: list[Path], run_id: str, settings: RunSettings, top: int = 1) -> list[dict]:
    """One row per file: its label, score, score kind and top classes, and the run that gave them (its id
    and `Run.describe()`, so saved predictions say which of two similar runs made them)."""
    run, pipeline = load_head(settings.cache_dir, run_id)
    xs = [features_for_files(paths, run, settings, view) for view in run.views]
    made_by = {"run": run.id, "method": run.describe()}
    return [dict(row, **made_by) for row in label_rows([str(p) for p in paths], pipeline, xs, list(run.class_names),
                                                        top)]
