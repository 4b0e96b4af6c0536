"""Fitting: cached features (composed per featurecache/runs/compose.py) -> head pipeline -> metrics -> a saved run.

One entry point, `fit(data, FeatureSpec, RunSettings, HeadSpec)`. The training rows are read from the
cache (with `extract`, what is missing is extracted first, with the run's settings); a training matrix
larger than the head's `max_memory` is streamed from the stored parts by a head that learns
incrementally (featurecache/runs/stream.py), or refused in one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from . import compose
from ..data.datasets import DataOptions, Dataset
from ..errors import FeatureCacheError
from .record import evaluate, new_run_id, save_run, spec_dict
from ..settings import FeatureSpec, HeadSpec, RunSettings
from ..store.sets import FeatureStore


@dataclass(frozen=True)
class Rows:
    """What a fit reads: the dataset (its unreadable images dropped), the spec, the images' composed rows
    and each augmented view's ({view: Composed}). Matrices are None where they are not read: a view's
    test rows without `tta`, and every matrix of a streamed fit, which reads them chunk by chunk."""
    ds: Dataset
    spec: FeatureSpec
    composed: compose.Composed
    views: dict


def fit(data: DataOptions, spec: FeatureSpec, run: RunSettings, head: HeadSpec, extract: bool = False) -> dict:
    """Fit `head` on the cached features of `spec` (one or more taps, a stored or derived pooling) for
    `data`; returns the saved run record. `extract`: extract missing sets first instead of failing.
    The head's `augment` views add training rows (featurecache/data/augment.py); with `tta` the test scores
    are averaged over the image and its views."""
    from .. import heads
    from . import stream

    ds = data.load()
    splits = ("train", "test") if head.tta else ("train",)
    first, blocks = compose.plan(ds, spec, run, extract, data)
    plans = {v: compose.plan(ds, replace(spec, view=v), run, extract, data, splits) for v in head.augment}
    dims = sum(b.dims for b in blocks)
    for v, (_, b) in plans.items():
        if sum(x.dims for x in b) != dims:
            raise FeatureCacheError(f"--augment {v}: its rows have {sum(x.dims for x in b)} columns, the images' "
                                    f"{dims}; extract both with the same --pool")
    n = len(ds.train) * (1 + len(plans)) + len(ds.test) * (1 + (len(plans) if head.tta else 0))
    need, limit = 4 * n * dims, head.max_memory or stream.memory_limit()
    if need > limit:
        if not heads.HEADS[head.head].streams:
            raise FeatureCacheError(stream.too_big(need, limit, n, dims, head.head))
        rows = Rows(ds, spec, compose.Composed(first, blocks, None, None),
                    {v: compose.Composed(r, b, None, None) for v, (r, b) in plans.items()})
        # a streamed fit takes no PCA (it would need the whole matrix): the run records none
        head = replace(head, normalize=heads.normalization(head.normalize, len(blocks)), pca=None)
        pipeline, metrics, seconds, extra = stream.fit_streamed(data, rows, run, head)
        return _save(data, rows, run, head, pipeline, metrics, seconds, **extra)
    store = FeatureStore(run.cache_dir)

    def read(res, b, wanted):
        return compose.Composed(res, b, *(compose.read(store, b, getattr(ds, s).images.ids) if s in wanted else None
                                          for s in ("train", "test")))

    rows = Rows(ds, spec, read(first, blocks, ("train", "test")), {v: read(r, b, splits) for v, (r, b) in plans.items()})
    return _fit_in_memory(data, rows, run, head)


def _fit_in_memory(data: DataOptions, rows: Rows, run: RunSettings, head: HeadSpec) -> dict:
    """Fit, evaluate and save the head on matrices already read (with its grid search, when it has one)."""
    import numpy as np

    from .. import heads

    ds, composed, views = rows.ds, rows.composed, rows.views
    head = replace(head, normalize=heads.normalization(head.normalize, len(composed.blocks)))
    blocks = tuple(b.dims for b in composed.blocks)
    pipeline = heads.make_pipeline(head.head, heads.with_seed(head.head, head.option_values, data.seed),
                                   head.normalize, head.pca, blocks)
    search = heads.parse_grid(list(head.grid), pipeline, head=head.head) if head.grid else None
    x_fit = np.vstack([composed.x_train, *(v.x_train for v in views.values())]) if views else composed.x_train
    y_fit = np.concatenate([ds.train.labels] * (1 + len(views)))
    t0 = time.perf_counter()
    table = None
    if search:
        pipeline, table = heads.grid_search(pipeline, search, x_fit, y_fit, seed=data.seed, head=head.head)
    else:
        heads.fit_pipeline(pipeline, x_fit, y_fit)
    fit_seconds = time.perf_counter() - t0
    pred_test = heads.averaged(pipeline, [composed.x_test, *(v.x_test for v in views.values())]).top_labels[:, 0] \
        if head.tta else None
    metrics = evaluate(pipeline, composed.x_train, ds.train.labels, composed.x_test, ds.test.labels, ds.class_names,
                       pred_test)
    return _save(data, rows, run, head, pipeline, metrics, fit_seconds,
                 grid=[{"params": p, "mean": m, "std": s} for p, m, s in table] if table else None,
                 n_train=len(y_fit))


def _save(data: DataOptions, rows: Rows, run: RunSettings, head: HeadSpec, pipeline, metrics: dict,
          fit_seconds: float, **extra) -> dict:
    """The run record of a fitted pipeline, saved with it (runs/<id>/) and added to the ledger."""
    from .. import heads
    from ..settings import calibrated

    ds, composed = rows.ds, rows.composed
    spec = calibrated(rows.spec, ds.train.images.ids)  # int8 runs record their sample, so predict finds the graph

    res, first = composed.res, composed.blocks[0]
    record = {
        "data": ds.name, "data_options": vars(data), "dataset_fingerprint": ds.fingerprint(),
        "n_train": len(ds.train), "n_test": len(ds.test), "class_names": list(ds.class_names),
        # the resize the sets were keyed by (`auto` made concrete where the images' size decides it)
        "spec": spec_dict(replace(spec, resize=res.resize)), "model": res.backbone.name, "weights": res.weights.label,
        "layer": first.layer, "layers": composed.layers, "size": res.size,
        "feature_set": first.set_id, "feature_sets": [b.set_id for b in composed.blocks],
        "feature_key": res.keys[first.layer], "blocks": [b.as_dict() for b in composed.blocks],
        "features": composed.describe(), "dims": sum(b.dims for b in composed.blocks),
        "head": head.head, "head_options": head.option_values, "normalize": head.normalize, "pca": head.pca,
        "head_params": {k: repr(v) for k, v in pipeline.get_params(deep=True).items()
                        if k.startswith("head__")},
        "library": heads.HEADS[head.head].library, "grid": None, "augment": list(rows.views), "tta": head.tta,
        "n_train_images": len(ds.train), "fit_seconds": round(fit_seconds, 3), "notes": head.notes,
        "metrics": metrics,
        # how the run went (none of these changes a vector): what a sweep's refit was given, for one
        "run_settings": {"engine": run.engine, "batch_size": run.batch_size, "on_error": run.on_error,
                         "executor": run.executor, "recompute_stale": run.recompute_stale},
    } | extra
    run_id = new_run_id(head.head)
    folder = save_run(run.cache_dir, run_id, pipeline, record)
    record.update(run_id=run_id, run_dir=str(folder))
    return record


def describe(record: dict) -> str:
    m = record["metrics"]
    names = record["class_names"]
    width = max(8, max(len(n) for n in names) + 1)
    lines = [f"run {record['run_id']}: {record['head']} on {record['features']} ({record['dims']} dims), "
             f"{record['n_train']} train / {record['n_test']} test",
             f"  fit {record['fit_seconds']:.2f} s   train accuracy {m['train_accuracy']:.4f}   "
             f"test accuracy {m['test_accuracy']:.4f}"]
    if record.get("grid"):
        lines.append("  grid (mean CV accuracy on the train split):")
        lines += [f"    {g['params']}  {g['mean']:.4f} ± {g['std']:.4f}" for g in record["grid"]]
    lines.append(f"  {'class':<{width}} precision recall     f1  support")
    for n in names:
        c = m["per_class"][n]
        lines.append(f"  {n:<{width}} {c['precision']:9.3f} {c['recall']:6.3f} {c['f1-score']:6.3f} {c['support']:8.0f}")
    lines.append("  confusion matrix (rows true, columns predicted):")
    lines += ["    " + " ".join(f"{v:5d}" for v in row) for row in m["confusion_matrix"]]
    lines.append(f"  saved: {record['run_dir']} (confusion.png, head.joblib, run.json)")
    return "\n".join(lines)
