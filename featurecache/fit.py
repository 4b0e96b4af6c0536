"""Fitting: cached features (composed per featurecache/compose.py) -> head pipeline -> metrics -> a saved run."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from . import compose
from .datasets import DataOptions
from .errors import FeatureCacheError
from .runs import evaluate, new_run_id, save_run, spec_dict
from .settings import FeatureSpec, RunSettings, default_engine
from .store import FeatureStore

NORMALIZE_AUTO = {1: "l2"}  # one tap: whole-row unit norm; several: each tap first (l2-per-tap), see README


def normalization(normalize: str, taps: int) -> str:
    """`auto` made concrete for a fit of `taps` taps."""
    return NORMALIZE_AUTO.get(taps, "l2-per-tap") if normalize == "auto" else normalize


def fit_head(data: DataOptions, spec: FeatureSpec, head: str, options: dict, normalize: str, pca: int | None,
             grid: list[str], cache_dir: Path | RunSettings, compute: bool = False, batch_size: int = 64,
             progress: bool = True, notes: str = "", log=print, engine: str | None = None,
             on_error: str = "fail", augment: tuple[str, ...] = (), tta: bool = False,
             max_memory: int | None = None) -> dict:
    """Fit `head` on the cached features of `spec` (one or more taps, a stored or derived pooling) for
    `data`; returns the saved run record. `cache_dir`: the cache folder, or the whole RunSettings (then
    batch_size, progress, log, engine and on_error come from it). `augment`: views whose training rows
    are added (featurecache/augment.py); `tta`: test scores averaged over the image and its views.
    `max_memory` (bytes; default 3/4 of this machine's memory): a larger training matrix is streamed
    from the stored parts by a head that learns incrementally, or refused in one line."""
    from . import augment as views_of
    from . import heads, stream

    if tta and not augment:
        raise FeatureCacheError("--tta averages over augmented views: give --augment too (e.g. --augment hflip)")
    ds = data.load()
    run = cache_dir if isinstance(cache_dir, RunSettings) else \
        RunSettings(cache_dir, engine or default_engine(), batch_size, progress, on_error, log)
    cache_dir = run.cache_dir
    splits = ("train", "test") if tta else ("train",)
    first, blocks = compose.plan(ds, spec, run, compute, data)
    plans = {v: compose.plan(ds, replace(spec, view=v), run, compute, data, splits) for v in views_of.check(augment)}
    for v, (_, b) in plans.items():
        if sum(x.dims for x in b) != sum(x.dims for x in blocks):
            raise FeatureCacheError(f"--augment {v}: its rows have {sum(x.dims for x in b)} columns, the images' "
                                    f"{sum(x.dims for x in blocks)}; extract both with the same --pool")
    rows = len(ds.train) * (1 + len(plans)) + len(ds.test) * (1 + (len(plans) if tta else 0))
    need, limit = 4 * rows * sum(b.dims for b in blocks), max_memory or stream.memory_limit()
    if need > limit:
        if not heads.HEADS[head].streams:
            raise FeatureCacheError(stream.too_big(need, limit, rows, sum(b.dims for b in blocks), head))
        composed = compose.Composed(first, blocks, None, None)
        normalize = normalization(normalize, len(blocks))
        pipeline, metrics, seconds, extra = stream.fit_streamed(data, ds, composed, plans, head, options, normalize,
                                                                limit, tta, cache_dir)
        return save_fit(data, ds, spec, composed, pipeline, head, options, normalize, None, metrics, seconds,
                        cache_dir, notes, augment=list(plans), tta=tta, **extra)
    store = FeatureStore(cache_dir)
    composed = compose.Composed(first, blocks, *(compose.read(store, blocks, getattr(ds, s).images.ids)
                                                 for s in ("train", "test")))
    extra = {v: compose.Composed(r, b, *(compose.read(store, b, getattr(ds, s).images.ids) if s in splits else None
                                         for s in ("train", "test"))) for v, (r, b) in plans.items()}
    return fit_composed(data, ds, spec, composed, head, options, normalize, pca, grid, cache_dir, notes, extra, tta)


def fit_composed(data: DataOptions, ds, spec: FeatureSpec, composed: compose.Composed, head: str, options: dict,
                 normalize: str, pca: int | None, grid: list[str], cache_dir: Path, notes: str = "",
                 views: dict | None = None, tta: bool = False) -> dict:
    """Fit, evaluate and save one head on matrices already gathered (a sweep gathers once for many heads).
    `views`: {view: Composed} of augmented training rows (and test rows for `tta`)."""
    import numpy as np

    from . import heads

    normalize = normalization(normalize, len(composed.blocks))
    blocks = tuple(b.dims for b in composed.blocks)
    pipeline = heads.make_pipeline(head, heads.with_seed(head, options, data.seed), normalize, pca, blocks)
    search = heads.parse_grid(grid, pipeline, head=head) if grid else None
    views = views or {}
    x_fit = np.vstack([composed.x_train, *(v.x_train for v in views.values())]) if views else composed.x_train
    y_fit = np.concatenate([ds.train.labels] * (1 + len(views)))
    t0 = time.perf_counter()
    table = None
    if search:
        pipeline, table = heads.grid_search(pipeline, search, x_fit, y_fit, seed=data.seed, head=head)
    else:
        heads.fit_pipeline(pipeline, x_fit, y_fit)
    fit_seconds = time.perf_counter() - t0
    pred_test = heads.averaged(pipeline, [composed.x_test, *(v.x_test for v in views.values())]).top_labels[:, 0] \
        if tta else None
    metrics = evaluate(pipeline, composed.x_train, ds.train.labels, composed.x_test, ds.test.labels, ds.class_names,
                       pred_test)
    return save_fit(data, ds, spec, composed, pipeline, head, options, normalize, pca, metrics, fit_seconds, cache_dir,
                    notes, grid=[{"params": p, "mean": m, "std": s} for p, m, s in table] if table else None,
                    augment=list(views), tta=tta, n_train=len(y_fit))


def save_fit(data: DataOptions, ds, spec: FeatureSpec, composed: compose.Composed, pipeline, head: str, options: dict,
             normalize: str, pca: int | None, metrics: dict, fit_seconds: float, cache_dir: Path, notes: str,
             **extra) -> dict:
    """The run record of a fitted pipeline, saved with it (runs/<id>/) and added to the ledger."""
    from . import heads
    from .settings import calibrated

    spec = calibrated(spec, ds.train.images.ids)  # int8 runs record their sample, so predict finds the graph

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
        "head": head, "head_options": options, "normalize": normalize, "pca": pca,
        "head_params": {k: repr(v) for k, v in pipeline.get_params(deep=True).items()
                        if k.startswith("head__")},
        "library": heads.HEADS[head].library, "grid": None, "augment": [], "tta": False,
        "n_train_images": len(ds.train), "fit_seconds": round(fit_seconds, 3), "notes": notes, "metrics": metrics,
    } | extra
    run_id = new_run_id(head)
    folder = save_run(cache_dir, run_id, pipeline, record)
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
