"""Sweeps: which layer and input size suit a dataset, measured instead of guessed.

For each size, every requested tap is extracted in one forward pass; then each head is fitted on each
tap (every fit is an ordinary run in the ledger). The result is a table, a plot of test accuracy by
layer (one line per size and head) and a recommendation.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .api import DataOptions, extract_dataset
from .backbones import get_backbone
from .errors import FeatureCacheError
from .extract import FeatureSpec
from .fit import fit_head
from .taps import Tap, catalogue


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


def sweep(data: DataOptions, spec: FeatureSpec, layers: str, sizes: list[int | None], heads: list[str],
          cache_dir: Path, normalize: str = "l2", batch_size: int = 64, progress: bool = True,
          log=print, engine: str | None = None, on_error: str = "fail") -> list[dict]:
    """`spec` holds every feature option but the taps and the size, which the sweep varies."""
    backbone = get_backbone(spec.model)
    ds = data.load()
    rows = []
    for size in sizes:
        base = replace(spec, layers=(), size=size)
        if layers == "all":
            probe = size or (max(ds.native_size() or 0, backbone.min_size) if ds.native_size() else
                             backbone.default_size)
            names = list(backbone.stages) or stage_outputs(catalogue(backbone, probe, cache_dir))
        else:
            names = [n.strip() for n in layers.split(",") if n.strip()]
        if not names:
            raise FeatureCacheError("--layers: give `all` or a comma-separated list of layer names")
        res, summary = extract_dataset(ds, replace(base, layers=tuple(names)), cache_dir, batch_size, progress, log,
                                       on_error, engine)
        extract_seconds = summary.seconds
        for name in names:
            for head in heads:
                record = fit_head(data, replace(base, layers=(name,)), head, {}, normalize, None, [], cache_dir,
                                  progress=False, notes="sweep", log=log, engine=engine)
                rows.append({"layer": name, "size": res.size, "head": head, "dims": record["dims"],
                             "extract_seconds": round(extract_seconds, 1), "fit_seconds": record["fit_seconds"],
                             "train_accuracy": record["metrics"]["train_accuracy"],
                             "test_accuracy": record["metrics"]["test_accuracy"], "run_id": record["run_id"]})
                log(f"  {name:<24} {res.size:>4}px {head:<7} dims {record['dims']:>6}  "
                    f"test {record['metrics']['test_accuracy']:.4f}")
    return rows


def recommend(rows: list[dict]) -> str:
    best = max(rows, key=lambda r: r["test_accuracy"])
    top_layer = [r for r in rows if r["size"] == best["size"] and r["head"] == best["head"]][-1]
    note = ""
    if best["layer"] != top_layer["layer"]:
        gain = best["test_accuracy"] - top_layer["test_accuracy"]
        note = (f"; an earlier tap beats the top one ({top_layer['layer']}) by {gain * 100:.1f} points, "
                "typical of data small or far from ImageNet")
    return (f"recommended: --layer {best['layer']} --size {best['size']} --head {best['head']} "
            f"(test accuracy {best['test_accuracy']:.4f}, chosen on the test split: confirm with --grid){note}")


def plot(rows: list[dict], path: Path, title: str, order: list[str] | None = None) -> Path:
    """`order`: the layers by depth, where sizes tried different taps."""
    from .plots import lines_png

    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(f"{r['size']}px {r['head']}", []).append((r["layer"], r["test_accuracy"]))
    return lines_png(series, path, "layer", "test accuracy", title, order)
