"""The `featurecache` command line (typer). Each command is a thin layer over the modules it names."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .api import DataOptions, default_cache_dir, default_engine, extract_dataset, extract_views
from .errors import FeatureCacheError
from .extract import FeatureSpec
from .options import (DATA, EXTRACT_RUN, FEATURES, FIT_FEATURES, SWEEP_FEATURES, Augment, BatchSize, CacheDir,
                      DataDir, Engine, Json, MaxTest, MaxTrain, Model, Normalize, Quiet, Seed, Size, TestSize, Tta,
                      takes)
from .settings import RunSettings

# No rich markup: help texts say "[default: ...]" literally, which markup would swallow as a tag.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Frozen CNN codes, memoized in HDF5, with light scikit-learn heads on top. Defaults for "
                       "any option can live in featurecache.toml (`featurecache init`).")
cache_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect and clean the feature cache.")
app.add_typer(cache_app, name="cache")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", help="Also show TensorFlow's, absl's and the "
                                                                  "engines' own log lines.")] = False):
    if verbose:
        from . import quiet

        quiet.uninstall()


def _cache(cache_dir: Optional[Path]) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _emit(obj, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=1) if as_json else text)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


# ---- models and layers -------------------------------------------------------------------------------
@app.command()
def models(as_json: Json = False):
    """The backbones featurecache knows, with their sizes, default tap and available weights."""
    from .backbones import BACKBONES

    rows = []
    for b in BACKBONES.values():
        weights = (["imagenet (Keras download)"] if b.keras_class else []) + \
                  [f"{w.name} (offline: {w.description} Licence: {w.licence})" for w in b.offline] + ["random"]
        rows.append({"name": b.name, "family": b.family, "min_size": b.min_size, "default_size": b.default_size,
                     "default_layer": b.default_layer or "(last layer)", "preprocess": b.preprocess,
                     "weights": weights})
    text = "\n".join(f"{r['name']:<20} {r['family']:<18} min {r['min_size']:>3}  default {r['default_size']:>3}  "
                     f"tap {r['default_layer']:<22} preprocess {r['preprocess']:<6}\n{'':<20} weights: "
                     + "; ".join(r["weights"]) for r in rows)
    _emit(rows, as_json, text)


@app.command()
def layers(model: Model, size: Size = None, cache_dir: CacheDir = None, as_json: Json = False):
    """Every tappable layer of a model with its output shape at an input size."""
    from .backbones import get_backbone
    from .taps import catalogue

    backbone = get_backbone(model)
    size = size or backbone.default_size
    taps = catalogue(backbone, size, _cache(cache_dir))
    default = backbone.default_layer or taps[-1].name
    rows = [{"name": t.name, "shape": list(t.shape), "reduction": t.reduction, "flatten_dims": t.dims("flatten"),
             "pooled_dims": t.dims("avg"), "default": t.name == default} for t in taps]
    text = "\n".join(f"{t.name:<32} {str(t.shape):<16} flatten {t.dims('flatten'):>7}  avg/max {t.channels:>5}"
                     + ("   <- default" if t.name == default else "") for t in taps)
    _emit({"model": model, "size": size, "layers": rows}, as_json, f"{model} at {size}x{size}:\n{text}")


# ---- extraction -------------------------------------------------------------------------------------
@app.command("extract")
@takes(data=DATA, spec=FEATURES, run=EXTRACT_RUN)
def extract_cmd(data: DataOptions, spec: FeatureSpec, run: RunSettings, augment: Augment = None, tta: Tta = False,
                as_json: Json = False):
    """Compute the feature vectors of a dataset once and store them; reruns are cache hits."""
    ds = data.load()
    _, summary = extract_dataset(ds, spec, run.cache_dir, run.batch_size, progress=run.progress, log=_log,
                                 on_error=run.on_error, engine=run.engine, executor=run.executor,
                                 cluster=run.cluster)
    views = extract_views(ds, spec, augment, run, test_too=tta) if augment else []
    out = dict(summary.as_dict(), dataset=ds.name, cache_dir=str(run.cache_dir))
    lines = [f"{'cache hit' if summary.cache_hit else 'extracted'}: {ds.name}, {summary.images} images, "
             f"{spec.model} ({summary.weights}) at {summary.size}px, {summary.seconds:.2f} s"
             + (f", {out['images_per_second']} images/s on {summary.engine}" if summary.computed else "")
             + (", int8" if spec.precision == "int8" else "")]
    for s in summary.sets:
        lines.append(f"  {s['layer']:<24} set {s['id']}  dims {s['dims']:>6}  computed {s['computed']:>6}  "
                     f"reused {s['reused']:>6}")
    for view, v in zip(augment or [], views):
        out.setdefault("views", {})[view] = v.as_dict()
        lines.append(f"  view {view}: {v.images} {'training and test' if tta else 'training'} images, "
                     f"computed {v.computed}, {v.seconds:.2f} s")
    if summary.skipped:
        lines.append(f"skipped {len(summary.skipped)} unreadable image(s), left out of the feature set and of fit:")
        lines += [f"  {s['reason']}" for s in summary.skipped]
    _emit(out, as_json, "\n".join(lines))


@app.command("plan")
@takes(data=DATA, spec=FEATURES, run=EXTRACT_RUN)
def plan_cmd(data: DataOptions, spec: FeatureSpec, run: RunSettings, as_json: Json = False):
    """Before extracting: images to compute after the cache, expected time (short measured warm-up), disk size."""
    from .plan import describe, plan

    ds = data.load()
    out = plan(ds, spec, run.cache_dir, run.engine, run.batch_size, log=_log, executor=run.executor,
               cluster=run.cluster, on_error=run.on_error)
    _emit(dict(out, dataset=ds.name), as_json, describe(out))


# ---- heads ------------------------------------------------------------------------------------------
@app.command()
@takes(data=DATA, spec=FIT_FEATURES, run=EXTRACT_RUN)
def fit(data: DataOptions, spec: FeatureSpec, run: RunSettings,
        head: Annotated[str, typer.Option("--head", help="linsvc | svc | logreg | mlp | ridge | sgd | knn | "
                                                         "rf.")] = "linsvc",
        normalize: Normalize = "auto",
        pca: Annotated[Optional[int], typer.Option("--pca", min=1, help="Reduce to N dimensions first.")] = None,
        C: Annotated[Optional[float], typer.Option("--C", help="Inverse regularisation (linsvc, svc, logreg, ...).")] = None,
        kernel: Annotated[Optional[str], typer.Option("--kernel", help="svc kernel: rbf | linear | poly.")] = None,
        hidden: Annotated[Optional[str], typer.Option("--hidden", help="mlp hidden sizes, e.g. 512,100.")] = None,
        max_iter: Annotated[Optional[int], typer.Option("--max-iter", min=1, help="Iteration cap.")] = None,
        max_depth: Annotated[Optional[int], typer.Option("--max-depth", min=1, help="rf tree depth.")] = None,
        k: Annotated[Optional[int], typer.Option("--k", min=1, help="knn neighbours.")] = None,
        calibrate: Annotated[bool, typer.Option("--calibrate", help="Calibrated probabilities for "
                                                                    "linear heads.")] = False,
        grid: Annotated[Optional[list[str]], typer.Option("--grid", help="Cross-validated search on the train "
                                                                         "split, e.g. C=0.01,0.1,1.")] = None,
        do_extract: Annotated[bool, typer.Option("--extract", help="Extract missing features first "
                                                                   "instead of failing.")] = False,
        notes: Annotated[str, typer.Option("--notes", help="Free text stored with the run.")] = "",
        augment: Augment = None, tta: Tta = False, as_json: Json = False):
    """Fit a head on cached features, evaluate it, save it as a run and add it to the ledger."""
    from .fit import describe, fit_head

    options = {"C": C, "kernel": kernel, "hidden": hidden, "max_iter": max_iter, "max_depth": max_depth,
               "k": k, "calibrate": calibrate or None}
    record = fit_head(data, spec, head, {n: v for n, v in options.items() if v is not None}, normalize, pca,
                      grid or [], run, compute=do_extract, notes=notes, augment=tuple(augment or ()), tta=tta)
    m = record["metrics"]
    if as_json:
        print(json.dumps({k: record[k] for k in ("run_id", "head", "features", "dims", "fit_seconds", "n_train",
                                                  "n_test", "grid", "run_dir")}
                         | {"train_accuracy": m["train_accuracy"], "test_accuracy": m["test_accuracy"]}, indent=1))
        return
    print(describe(record))


@app.command()
def report(fmt: Annotated[str, typer.Option("--format", help="table | markdown | csv.")] = "table",
           cache_dir: CacheDir = None,
           plot: Annotated[Optional[Path], typer.Option("--plot", help="Where to write the PNG "
                                                                       "[default: <cache>/runs/report.png].")] = None):
    """The ledger of runs as a comparison table, and a plot of test accuracy against fit time."""
    from .report import render, plot_runs
    from .runs import read_ledger, runs_dir

    cache = _cache(cache_dir)
    rows = read_ledger(cache)
    if not rows:
        raise FeatureCacheError(f"no runs in {runs_dir(cache)}; fit one with `featurecache fit`")
    print(render(rows, fmt))
    path = plot_runs(rows, plot or runs_dir(cache) / "report.png")
    _log(f"plot: {path}")


@app.command()
def predict(files: Annotated[list[Path], typer.Argument(help="Image files.")],
            run: Annotated[str, typer.Option("--run", help="Run id printed by `featurecache fit`.")],
            fmt: Annotated[str, typer.Option("--format", help="text | json | csv.")] = "text",
            top: Annotated[int, typer.Option("--top", help="Also list the K best classes.")] = 1,
            batch_size: BatchSize = 64, cache_dir: CacheDir = None, quiet: Quiet = True, engine: Engine = None):
    """Label image files with a fitted run (backbone + head), reusing cached features."""
    from .predict import predict_files

    if fmt not in ("text", "json", "csv"):
        raise FeatureCacheError(f"--format {fmt}: use text, json or csv")
    rows = predict_files(files, run, _cache(cache_dir), top=top, batch_size=batch_size, progress=not quiet,
                         log=_log, engine=engine or default_engine())
    if fmt == "json":
        print(json.dumps(rows, indent=1))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "label", "score", "score_kind"])
        for r in rows:
            w.writerow([r["file"], r["label"], f"{r['score']:.6g}", r["score_kind"]])
        print(buf.getvalue(), end="")
    else:
        for r in rows:
            extra = "  " + ", ".join(f"{t['label']} {t['score']:.3f}" for t in r["top"]) if top > 1 else ""
            print(f"{r['file']}\t{r['label']}\t{r['score']:.4f} ({r['score_kind']}){extra}")


@app.command()
def classify(files: Annotated[list[Path], typer.Argument(help="Image files.")],
             top: Annotated[int, typer.Option("--top", help="How many classes.")] = 5,
             model: Model = "efficientnet_lite0"):
    """ImageNet top-k with EfficientNet-Lite0's offline weights: proof that the weights are real."""
    from .classify import classify as run_classify

    if model != "efficientnet_lite0":
        raise FeatureCacheError(f"--model {model}: classify supports efficientnet_lite0 (offline ImageNet head)")
    for path, preds in zip(files, run_classify([str(f) for f in files], top=top)):
        print(path)
        for idx, name, p in preds:
            print(f"  {p:6.3f}  {idx:4d}  {name}")


@app.command("sweep")
@takes(data=DATA, spec=SWEEP_FEATURES, run=EXTRACT_RUN)
def sweep_cmd(data: DataOptions, spec: FeatureSpec, run: RunSettings,
              layers: Annotated[str, typer.Option("--layers", help="all (each stage's output), or L1,L2,... with "
                                                                   "`+` joining taps fitted together (L1+L2).")] = "all",
              pools: Annotated[Optional[str], typer.Option("--pools", help="Poolings to compare, e.g. "
                                                                          "flatten,max2x2,avg [default: --pool].")] = None,
              sizes: Annotated[Optional[str], typer.Option("--sizes", help="Input sizes, e.g. 32,64 "
                                                                          "[default: the images' own].")] = None,
              heads: Annotated[str, typer.Option("--heads", help="Heads to fit on each tap, e.g. linsvc,logreg.")] = "linsvc",
              validation: Annotated[float, typer.Option("--validation", min=0.05, max=0.5, help=(
                  "Fraction of the training images held out to compare configurations on; the test split "
                  "scores the chosen one only."))] = 0.2,
              normalize: Normalize = "auto", augment: Augment = None, tta: Tta = False,
              plot: Annotated[Optional[Path], typer.Option("--plot", help="PNG path [default: <cache>/sweep.png].")] = None,
              as_json: Json = False):
    """Compare taps, poolings, sizes and heads on a validation split; refit the best, test it once."""
    from . import sweep as sweeps

    try:
        size_list = [int(s) for s in sizes.split(",")] if sizes else [None]
    except ValueError:
        raise FeatureCacheError(f"--sizes {sizes}: give whole numbers separated by commas, e.g. 32,64") from None
    result = sweeps.sweep(data, spec, layers, size_list, [h.strip() for h in heads.split(",")], run, normalize,
                          pools=[p.strip() for p in pools.split(",")] if pools else None, validation=validation,
                          augment=tuple(augment or ()), tta=tta)
    rows = result["rows"]
    path = sweeps.plot(rows, plot or run.cache_dir / "sweep.png",
                       f"{spec.model} ({spec.weights}) on {data.data}: validation accuracy by layer")
    advice = sweeps.recommend(result)
    if as_json:
        print(json.dumps(dict(result, recommendation=advice, plot=str(path)), indent=1))
        return
    print(f"{'layer':<28} {'pool':<8} {'size':>5} {'head':<8} {'dims':>7} {'fit s':>7} {'valid.':>7}")
    for r in rows:
        print(f"{r['layer']:<28} {r['pool']:<8} {r['size']:>5} {r['head']:<8} {r['dims']:>7} {r['fit_seconds']:>7.2f} "
              f"{r['val_accuracy']:>7.4f}")
    print(advice)
    print(f"plot: {path}")


# ---- cache ------------------------------------------------------------------------------------------
@cache_app.command("ls")
def cache_ls(cache_dir: CacheDir = None, as_json: Json = False,
             graphs_only: Annotated[bool, typer.Option("--graphs", help="With --json: list the converted engine "
                                                                        "graphs instead of the feature sets.")] = False):
    """Feature sets with their key parts, image count and size on disk; converted graphs with their last use."""
    from .store import FeatureStore

    rows = []
    for fs in FeatureStore(_cache(cache_dir)).all():
        k = fs.key
        rows.append({"id": fs.id, "model": k["model"], "weights": k["weights"], "layer": k["layer"],
                     "pool": k["pool"], "size": k["size"], "resize": k["resize"], "preprocess": k["preprocess"],
                     "dims": fs.dims, "images": len(fs), "parts": len(fs.part_files()), "bytes": fs.disk_bytes(),
                     "key": k})
    text = "\n".join(f"{r['id']}  {r['model']:<18} {r['layer']:<22} {r['pool']:<7} {r['size']:>4}px "
                     f"{r['resize']:<8} {r['preprocess']:<7} {r['weights']:<28} dims {r['dims']:>6} "
                     f"images {r['images']:>7}  {r['bytes'] / 1e6:8.1f} MB" for r in rows) or "(no feature sets)"
    from .prune import graphs

    converted = [e.as_dict() for e in graphs(_cache(cache_dir))]
    text += "\nconverted graphs (`cache prune` removes the least recently used):\n" + ("\n".join(
        f"{g['id']}  {g['bytes'] / 1e6:8.1f} MB  last used {_when(g['last_used'])}"
        for g in converted) or "(none)")
    _emit(converted if graphs_only else rows, as_json, text)


@cache_app.command("rm")
def cache_rm(set_ids: Annotated[list[str], typer.Argument(help="Feature-set ids (a unique prefix is enough).")],
             cache_dir: CacheDir = None):
    """Remove feature sets."""
    from .store import FeatureStore

    store = FeatureStore(_cache(cache_dir))
    for sid in set_ids:
        fs = store.find(sid)
        store.remove(fs.id)
        print(f"removed {fs.id}")


@cache_app.command("prune")
def cache_prune(cache_dir: CacheDir = None,
                max_size: Annotated[Optional[str], typer.Option("--max-size", help="Keep at most this much, least "
                                                                               "recently used first out (e.g. 5GB).")] = None,
                older_than: Annotated[Optional[str], typer.Option("--older-than", help="Remove what was not used "
                                                                                      "for this long (e.g. 30d).")] = None,
                features: Annotated[bool, typer.Option("--features", help="Also feature sets (hours of work each), "
                                                                          "never one being written.")] = False,
                dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
                as_json: Json = False):
    """Remove least recently used converted graphs (and, with --features, feature sets) from the cache."""
    from .prune import parse_age, parse_size, prune

    out = prune(_cache(cache_dir), parse_size(max_size) if max_size else None,
                parse_age(older_than) if older_than else None, features, dry_run)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {e['kind']:<8} {e['id']}  {e['bytes'] / 1e6:8.1f} MB  last used {_when(e['last_used'])}"
             for e in out["removed"]]
    lines += [f"skipped  {e['kind']:<8} {e['id']}: {e['reason']}" for e in out["skipped"]]
    lines.append(f"{verb} {out['freed_bytes'] / 1e6:.1f} MB; {out['kept_bytes'] / 1e6:.1f} MB kept")
    _emit(out, as_json, "\n".join(lines))


VerifyData = Annotated[Optional[str], typer.Option("--data", help="Also recompute a few stored rows from this "
                                                                  "dataset's images (same form as extract's).")]
Sample = Annotated[int, typer.Option("--sample", help="Rows to recompute per set with --data.")]


def _verify_args(set_ids, cache_dir, data, data_dir, test_size, seed, max_train, max_test):
    from .store import FeatureStore

    store = FeatureStore(_cache(cache_dir))
    sets = [store.find(s) for s in set_ids] if set_ids else store.all()
    ds = DataOptions(data, data_dir, test_size, seed, max_train, max_test).load() if data else None
    return sets, ds


@cache_app.command("verify")
def cache_verify(set_ids: Annotated[Optional[list[str]], typer.Argument(help="Sets to check (default all).")] = None,
                 cache_dir: CacheDir = None, data: VerifyData = None, sample: Sample = 8, data_dir: DataDir = None,
                 test_size: TestSize = 0.25, seed: Seed = 0, max_train: MaxTrain = None, max_test: MaxTest = None):
    """Check feature sets: files readable, right configuration, shapes; with --data, recomputed rows match."""
    from .verify import verify

    sets, ds = _verify_args(set_ids, cache_dir, data, data_dir, test_size, seed, max_train, max_test)
    reports = [verify(fs, ds, sample, _cache(cache_dir)) for fs in sets]
    for r in reports:
        print(r.line())
    bad = [r.set_id for r in reports if not r.ok]
    if bad:
        raise FeatureCacheError(f"{len(bad)} feature set(s) damaged; `featurecache cache repair {bad[0]}` moves "
                                "damaged parts aside (the next extract recomputes their rows), `cache rm` removes a set")


@cache_app.command("repair")
def cache_repair(set_ids: Annotated[list[str], typer.Argument(help="Sets to repair.")], cache_dir: CacheDir = None,
                 data: VerifyData = None, sample: Sample = 8, data_dir: DataDir = None, test_size: TestSize = 0.25,
                 seed: Seed = 0, max_train: MaxTrain = None, max_test: MaxTest = None):
    """Move a set's damaged parts aside (into damaged/) so the next extract recomputes only their rows."""
    from .verify import repair

    sets, ds = _verify_args(set_ids, cache_dir, data, data_dir, test_size, seed, max_train, max_test)
    for fs in sets:
        print(repair(fs, ds, sample, _cache(cache_dir), log=_log).line())


# ---- project file ---------------------------------------------------------------------------------
@app.command()
@takes(data=DATA, spec=FEATURES, run=EXTRACT_RUN)
def init(ctx: typer.Context, data: DataOptions, spec: FeatureSpec, run: RunSettings,
         augment: Augment = None, tta: Tta = False,
         force: Annotated[bool, typer.Option("--force", help="Replace an existing featurecache.toml.")] = False):
    """Write featurecache.toml here: the options given become every command's defaults in this folder."""
    from . import config
    from .datasets import BUILTINS

    path = Path.cwd() / config.FILENAME
    if path.exists() and not force:
        raise FeatureCacheError(f"{path} exists; edit it, or replace it with `featurecache init --force ...`")
    if data.data not in BUILTINS and not Path(data.data).expanduser().exists():
        raise FeatureCacheError(f"--data {data.data}: no such path or dataset; give a folder of class subfolders, "
                                f"an .npz, or one of: {', '.join(BUILTINS)}")
    given = {config.key_of(p): ctx.params[p.name] for p in ctx.command.params
             if config.key_of(p) and ctx.get_parameter_source(p.name).name == "COMMANDLINE"}
    given = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items()}
    text = ("# featurecache project file: defaults for every command run in this folder or below it.\n"
            "# Any option works as a key (without its dashes); a [fit] or [serve] table sets one command's.\n"
            + config.render(given))
    from .store import write_atomic

    write_atomic(path, text)
    print(f"wrote {path}:\n" + config.render(given), end="")


@app.command("config", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def config_cmd(ctx: typer.Context,
               command: Annotated[Optional[list[str]], typer.Argument(
                   help="A command (fit, cache verify) and, if you like, its flags: shows what that call would "
                        "use.")] = None,
               as_json: Json = False):
    """The option values in force here and where each comes from: flag, environment, file or default."""
    from . import config

    root = ctx.find_root()
    words = list(command or []) + list(ctx.args)
    rows = config.in_force(root, words)
    found = config.find()
    if as_json:
        print(json.dumps({"file": str(found) if found else None, "values": rows}, indent=1))
        return
    print(f"project file: {found}" if found else
          f"project file: none in {Path.cwd()} or above (`featurecache init --data D` writes one)")
    for key, row in rows.items():
        print(f"  {key:<14} = {json.dumps(row['value']):<28} {row['source']}")


# ---- quickstart ----------------------------------------------------------------------------------
@app.command()
def quickstart(cache_dir: CacheDir = None, quiet: Quiet = False):
    """Extract real CNN codes of scikit-learn's digits offline, fit a linear SVM, print the results."""
    from .fit import fit_head

    cache = _cache(cache_dir)
    opts = DataOptions("digits")
    spec = FeatureSpec("vgg16", "hed-bsds", ("block3_pool",), "flatten", 32)
    ds = opts.load()
    t0 = time.perf_counter()
    _, summary = extract_dataset(ds, spec, cache, progress=not quiet, log=_log)
    record = fit_head(opts, spec, "linsvc", {}, "l2", None, [], cache, progress=False, log=_log,
                      notes="quickstart")
    m = record["metrics"]
    print(f"featurecache quickstart: digits ({len(ds.train)} train / {len(ds.test)} test images, 8x8 upsized "
          f"to {summary.size}x{summary.size})\n"
          f"  features: vgg16 (hed-bsds, offline) {spec.layers[0]}, {summary.sets[0]['dims']} dims, "
          f"{'cache hit' if summary.cache_hit else f'extracted {summary.computed} images'} in {summary.seconds:.1f} s\n"
          f"  head: linsvc, fitted in {record['fit_seconds']:.2f} s\n"
          f"  train accuracy {m['train_accuracy']:.4f}, test accuracy {m['test_accuracy']:.4f}\n"
          f"  run {record['run_id']} saved in {record['run_dir']}\n"
          f"  cache: {cache.resolve()} (run again: a cache hit)  total {time.perf_counter() - t0:.1f} s")


# ---- export (featurecache/export.py, docs/EXPORT.md) -------------------------------------------------
@app.command("export")
def export_cmd(run: Annotated[Optional[str], typer.Option("--run", help="Run id printed by `featurecache fit`.")] = None,
               fmt: Annotated[str, typer.Option("--format", help="onnx.")] = "onnx",
               precision: Annotated[str, typer.Option("--precision", help="float32 (int8: not yet, "
                                                                          "see docs/EXPORT.md).")] = "float32",
               output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File to write "
                                                                                   "(default: ./RUN_ID.onnx).")] = None,
               force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
               check: Annotated[Optional[Path], typer.Option("--check", help="Run an exported file with plain ONNX "
                                                                             "Runtime on the run's test images and "
                                                                             "compare with `featurecache predict`.")] = None,
               data: Annotated[Optional[str], typer.Option("--data", help="With --check: the data to take the test "
                                                                          "split of (default: the run's own).")] = None,
               data_dir: DataDir = None, cache_dir: CacheDir = None, engine: Engine = None, as_json: Json = False):
    """A fitted run as one ONNX file (uint8 images in; scores and label out), or --check such a file."""
    from . import export as fc_export

    if check is not None:
        if run is not None:
            raise FeatureCacheError("--check reads the run id from the file's metadata; drop --run")
        r = fc_export.check(check, _cache(cache_dir), data, data_dir, engine or default_engine(), log=_log)
        _emit(r, as_json, fc_export.describe_check(r))
        if r["agree"] != r["images"]:
            raise typer.Exit(1)
        return
    if data is not None:
        raise FeatureCacheError("--data goes with --check; export takes everything from the run")
    if run is None:
        raise FeatureCacheError("give --run ID to export, or --check FILE to check an exported file")
    r = fc_export.export_run(run, _cache(cache_dir), output, fmt, precision, force, log=_log)
    _emit(r, as_json, f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB): {r['features']} -> {r['head']}, uint8 "
                      f"{r['input_size']}x{r['input_size']} RGB in, {r['score_kind']} scores and label out; "
                      f"head within {r['head_max_difference']:.2g} of the pickled one; {r['seconds']:.1f} s")


# ---- serving --------------------------------------------------------------------------------------
@app.command()
def serve(run: Annotated[Optional[list[str]], typer.Option(
              "--run", help="Run id printed by `featurecache fit`; repeat to serve several (the first is the "
                            "default, `?run=ID` picks another).")] = None,
          all_runs: Annotated[bool, typer.Option("--all-runs", help="Serve every run in the cache, newest "
                                                                    "first.")] = False,
          host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback (0.0.0.0 "
                                                           "exposes it to the network) needs --token.")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port")] = 8000,
          token: Annotated[Optional[str], typer.Option(
              "--token", envvar="FEATURECACHE_TOKEN", show_default=False,
              help="Clients must send `Authorization: Bearer TOKEN` (all but /health and the page).")] = None,
          no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve off loopback without a token "
                                                                  "(anyone who reaches the port may use it).")] = False,
          workers: Annotated[int, typer.Option("--workers", help="Processes, each with its own model "
                                                                 "(1 batches best on few cores).")] = 1,
          max_batch: Annotated[int, typer.Option("--max-batch", help="Images per forward pass.")] = 32,
          max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="Longest wait for a batch to "
                                                                          "fill.")] = 2.0,
          max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Request size limit.")] = 20.0,
          max_pixels: Annotated[int, typer.Option("--max-pixels", help="Largest image, in pixels.")] = 4096 * 4096,
          cache_dir: CacheDir = None, engine: Engine = None):
    """Serve fitted runs over HTTP: a page at /, POST /predict and /embed, GET /health, /info, /runs, /sets
    (OpenAPI at /docs)."""
    from .auth import token_for
    from .serve import ServeOptions, serve as run_server

    token = token_for(host, token, no_auth, log=_log)  # refuses an exposed, open server before loading
    if bool(run) == all_runs:
        raise FeatureCacheError("give --run ID (repeatable) or --all-runs" if not run else
                                "--run and --all-runs contradict each other; give one of them")
    opts = ServeOptions(run[0] if run else "", str(_cache(cache_dir)), max_batch, max_wait_ms,
                        int(max_body_mb * (1 << 20)), max_pixels, engine or default_engine())
    run_server(opts, host, port, workers, runs=run, all_runs=all_runs, token=token)


def main() -> None:
    """Entry point: user errors become one line and exit status 2, never a traceback.

    Typer vendors its own copy of click in recent releases, so click's exceptions are recognised by what
    they offer (an exit code and a formatted message), not by class: the same code serves both.
    """
    from . import config, quiet

    args = sys.argv[1:]
    if "--verbose" in args:  # accepted anywhere on the line, not only before the command
        args = [a for a in args if a != "--verbose"]
        os.environ["FEATURECACHE_DEBUG"] = "1"
    quiet.install()
    try:
        command = typer.main.get_command(app)
        found = config.find()
        defaults = config.default_map(command, config.load(found, command)) if found else None
        command.main(args=args, prog_name="featurecache", standalone_mode=False, default_map=defaults)
    except FeatureCacheError as e:
        _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        _fail("error: interrupted; finished work is stored, rerun the same command to continue", 130)
    except (typer.Exit, typer.Abort) as e:
        sys.exit(getattr(e, "exit_code", 1))
    except Exception as e:
        if not (hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)):
            raise
        if not e.format_message().strip():  # no arguments at all: click has printed the help already
            sys.exit(e.exit_code)
        _fail(_usage_line(e), e.exit_code)


def _usage_line(e) -> str:
    """click's usage error as one line: what was wrong, then where to read the command's usage."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "featurecache"
    if "Missing option" in message and "'--data'" in message:
        message += " Give --data, or set it once with `featurecache init --data D`."
    return f"error: {message} (usage: `{path} --help`)"


def _fail(line: str, status: int) -> None:
    print(line, file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    main()
