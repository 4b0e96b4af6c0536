"""Sweeps: which taps, pooling, input size and head suit a dataset, measured instead of guessed.

For each size, every tap the sweep names is extracted once (one forward pass per stored pooling);
then each combination of taps (`block3_pool+block4_pool`) and pooling (stored, or a view of the stored
map: featurecache/encoding/pooling.py) is gathered from the cache ONCE and every head is fitted on it. With
dozens of configurations, picking the best by test accuracy would leak the test split into the
choice: every configuration is scored on a validation split carved from the training rows (seeded,
stratified), the best on validation is refitted on all training rows, and only that one is
evaluated on the test split, once, and saved as a run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import compose
from ..encoding.pooling import Pooling
from ..data.datasets import DataOptions
from ..backbones import get_backbone
from ..errors import FeatureCacheError
from .fit import fit
from ..data.sampling import train_test_indices
from ..settings import FeatureSpec, HeadSpec, RunSettings
from ..encoding.taps import Tap, catalogue

VALIDATION = 0.2  # of the training rows: the split configurations are compared on


@dataclass(frozen=True)
class SweepSpace:
    """What a sweep compares: taps (`layers`: `all`, or L1,L2,... with `+` joining taps fitted together),
    input sizes (None: the images' own), heads (empty: the HeadSpec's own), poolings (empty: the spec's),
    and the fraction of the training rows held out to compare them on."""
    layers: str = "all"
    sizes: tuple[int | None, ...] = (None,)
    heads: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()
    validation: float = VALIDATION

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(self.sizes) or (None,))
        object.__setattr__(self, "heads", tuple(self.heads))
        object.__setattr__(self, "pools", tuple(Pooling.parse(p).name for p in self.pools))
        if not 0 < self.validation < 1:
            raise FeatureCacheError(f"--validation {self.validation}: give a fraction between 0 and 1")


def stage_outputs(taps: list[Tap]) -> list[str]:
    """The last tap at each spatial resolution: 'all layers' for a model that does not list its stages.

    Flattening every conv of a network is pointless (VGG16's block1_conv1 at 64px is 262,144-d);
    the end of each stage carries that stage's information at the smallest size.
    """
    out = []
    for i, t in enumerate(taps):
        nxt = taps[i + 1] if i + 1 < len(taps) else None
        if len(t.shape) == 3 and (nxt is None or len(nxt.shape) != 3 or nxt.shape[:2] != t.shape[:2]):
            out.append(t.name)
    return out


def tap_sets(layers: str, names_all) -> list[tuple[str, ...]]:
    """`all`, or comma-separated taps and `+`-joined combinations of taps, as tuples of layer names."""
    if layers == "all":
        return [(n,) for n in names_all()]
    combos = [tuple(t.strip() for t in item.split("+") if t.strip()) for item in layers.split(",") if item.strip()]
    if not combos or any(not c for c in combos):
        raise FeatureCacheError("--layers: give `all` or comma-separated layers, `+` joining taps fitted together "
                                "(e.g. block3_pool,block3_pool+block4_pool)")
    return combos


def sweep(data: DataOptions, spec: FeatureSpec, run: RunSettings, head: HeadSpec,
          space: SweepSpace = SweepSpace()) -> dict:
    """Rows (one per size x taps x pooling x head of `space`, scored on validation) and the chosen
    configuration, refitted on all training rows with the same run settings and evaluated once on the
    test split. Every head is fitted as `head` with that head: its options, normalisation and pca, and
    its `augment` views added as training rows (with `tta`, averaged over when scoring)."""
    from ..api import extract_views
    from ..extraction.extract import run_extract

    if head.grid:
        raise FeatureCacheError("sweep compares heads on a validation split; search a head's options with "
                                "`featurecache fit --grid` on the configuration it recommends")
    backbone = get_backbone(spec.model)
    pools = list(space.pools or [Pooling.parse(spec.pool).name])
    candidates = [replace(head, head=name) for name in space.heads or [head.head]]  # each checked here
    augment, tta, validation, layers = head.augment, head.tta, space.validation, space.layers
    cache_dir, log = run.cache_dir, run.say
    ds = data.load()
    rows, skipped = [], []
    for size in space.sizes:
        base = replace(spec, layers=(), size=size)

        def stages():
            probe = size or (max(ds.native_size() or 0, backbone.min_size) if ds.native_size() else
                             backbone.default_size)
            return list(backbone.stages) or stage_outputs(catalogue(backbone, probe, cache_dir))

        combos = tap_sets(layers, stages)
        taps = tuple(dict.fromkeys(t for c in combos for t in c))
        t0 = time.perf_counter()
        for stored in dict.fromkeys(Pooling.parse(p).stored for p in pools):  # one pass per stored pooling
            run_extract([ds.train.images, ds.test.images], replace(base, layers=taps, pool=stored), run,
                        ds.native_size())
            extract_views(ds, replace(base, layers=taps, pool=stored), run, augment, test_too=tta)
        extract_seconds = time.perf_counter() - t0
        for combo in combos:
            for pool in pools:
                try:
                    composed = compose.gather(ds, replace(base, layers=combo, pool=pool), run)
                except FeatureCacheError as e:  # a view a tap cannot give (2x2 windows of a 1x1 map)
                    skipped.append({"layer": "+".join(combo), "pool": pool, "size": size, "reason": str(e)})
                    log(f"  skipped {'+'.join(combo)} {pool}: {e}")
                    continue
                extra = [compose.gather(ds, replace(base, layers=combo, pool=pool, view=v), run, splits=("train",))
                         .x_train for v in augment]
                train, val = train_test_indices(ds.train.labels, data.seed, test_size=validation)
                for candidate in candidates:
                    rows.append(dict(_validate(composed.x_train, extra, composed.blocks, ds.train.labels, train, val,
                                               candidate, data.seed),
                                     layer="+".join(combo), pool=pool, size=composed.res.size,
                                     extract_seconds=round(extract_seconds, 1)))
                    r = rows[-1]
                    log(f"  {r['layer']:<28} {r['pool']:<8} {r['size']:>4}px {r['head']:<7} dims {r['dims']:>6}  "
                        f"validation {r['val_accuracy']:.4f}")
                del composed, extra
    if not rows:
        raise FeatureCacheError("sweep: no configuration could be fitted: " + "; ".join(s["reason"] for s in skipped))
    best = max(rows, key=lambda r: r["val_accuracy"])
    record = fit(data, replace(spec, layers=tuple(best["layer"].split("+")), pool=best["pool"], size=best["size"]),
                 replace(run, progress=False), replace(head, head=best["head"], notes="sweep: chosen on validation"))
    chosen = dict(best, run_id=record["run_id"], test_accuracy=record["metrics"]["test_accuracy"],
                  train_accuracy=record["metrics"]["train_accuracy"], fit_seconds_full=record["fit_seconds"])
    return {"rows": rows, "chosen": chosen, "skipped": skipped, "validation": {"fraction": validation, "n_fit": len(train),
                                                           "n_validation": len(val), "seed": data.seed}}


def _validate(x, extra, blocks, labels, train, val, head: HeadSpec, seed: int) -> dict:
    """Fit on the training rows less the validation split (plus their augmented views' rows), score on
    the validation split (averaged over the views with `head.tta`)."""
    from .. import heads

    widths = tuple(b.dims for b in blocks)
    pipeline = heads.make_pipeline(head.head, heads.with_seed(head.head, head.option_values, seed),
                                   heads.normalization(head.normalize, len(widths)), head.pca, widths)
    x_fit = np.vstack([x[train], *(v[train] for v in extra)]) if extra else x[train]
    t0 = time.perf_counter()
    heads.fit_pipeline(pipeline, x_fit, np.concatenate([labels[train]] * (1 + len(extra))))
    fit_seconds = time.perf_counter() - t0
    scored = [x[val], *(v[val] for v in extra)] if head.tta else [x[val]]
    predicted = heads.averaged(pipeline, scored).top_labels[:, 0]
    return {"head": head.head, "dims": int(x.shape[1]), "fit_seconds": round(fit_seconds, 3),
            "val_accuracy": float(np.mean(predicted == labels[val]))}


def recommend(result: dict) -> str:
    rows, best = result["rows"], result["chosen"]
    deepest = [r for r in rows if r["size"] == best["size"] and r["head"] == best["head"]
               and r["pool"] == best["pool"] and "+" not in r["layer"]]
    note = ""
    if deepest and "+" not in best["layer"] and best["layer"] != deepest[-1]["layer"]:
        gain = best["val_accuracy"] - deepest[-1]["val_accuracy"]
        note = (f"; an earlier tap beats the top one ({deepest[-1]['layer']}) by {gain * 100:.1f} points, "
                "typical of data small or far from ImageNet")
    layer_flags = " ".join(f"--layer {t}" for t in best["layer"].split("+"))
    return (f"recommended: {layer_flags} --pool {best['pool']} --size {best['size']} --head {best['head']} "
            f"(chosen on validation: {best['val_accuracy']:.4f} on {result['validation']['n_validation']} held-out "
            f"training images; test accuracy, measured once: {best['test_accuracy']:.4f}; run {best['run_id']}){note}")


def plot(rows: list[dict], path: Path, title: str, order: list[str] | None = None) -> Path:
    """`order`: the layers by depth, where sizes tried different taps."""
    from .plots import lines_png

    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(f"{r['size']}px {r['pool']} {r['head']}", []).append((r["layer"], r["val_accuracy"]))
    return lines_png(series, path, "layer", "validation accuracy", title, order)
