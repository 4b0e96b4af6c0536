"""The `featurecache` command line (typer): the pipeline's commands, and the entry point. Each command is
a thin layer over the modules it names; the cache, project-file, export and serve commands are in
featurecache/cli/admin.py, the shared apps and helpers in featurecache/cli/common.py."""

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

from ..api import DataOptions, default_engine, extract_dataset, extract_views
from .common import app, cache_dir_of, emit, say
from ..errors import FeatureCacheError
from ..extraction.extract import FeatureSpec
from .options import (CLASSIFY_RUN, DATA, EXTRACT_RUN, FEATURES, FIT_FEATURES, HEAD, SWEEP, SWEEP_FEATURES,
                      SWEEP_HEAD, Augment, BatchSize, CacheDir, ClassifyFiles, ClassifyModel, ClassifyTop,
                      DoExtract, Engine, Json, Model, Quiet, Size, SweepPlot, Tta, takes)
from ..settings import HeadSpec, RunSettings
from ..runs.sweep import SweepSpace


# ---- models and layers -------------------------------------------------------------------------------
@app.command()
def models(as_json: Json = False):
    """The backbones featurecache knows, with their sizes, default tap and available weights."""
    from ..backbones import BACKBONES

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
    emit(rows, as_json, text)


@app.command()
def layers(model: Model, size: Size = None, cache_dir: CacheDir = None, as_json: Json = False):
    """Every tappable layer of a model with its output shape at an input size."""
    from ..backbones import get_backbone
    from ..encoding.taps import catalogue

    backbone = get_backbone(model)
    size = size or backbone.default_size
    taps = catalogue(backbone, size, cache_dir_of(cache_dir))
    default = backbone.default_layer or taps[-1].name
    rows = [{"name": t.name, "shape": list(t.shape), "reduction": t.reduction, "flatten_dims": t.dims("flatten"),
             "pooled_dims": t.dims("avg"), "default": t.name == default} for t in taps]
    text = "\n".join(f"{t.name:<32} {str(t.shape):<16} flatten {t.dims('flatten'):>7}  avg/max {t.channels:>5}"
                     + ("   <- default" if t.name == default else "") for t in taps)
    emit({"model": model, "size": size, "layers": rows}, as_json, f"{model} at {size}x{size}:\n{text}")


# ---- extraction -------------------------------------------------------------------------------------
@app.command("extract")
@takes(data=DATA, spec=FEATURES, run=EXTRACT_RUN)
def extract_cmd(data: DataOptions, spec: FeatureSpec, run: RunSettings, augment: Augment = None, tta: Tta = False,
                as_json: Json = False):
    """Compute the feature vectors of a dataset once and store them; reruns are cache hits."""
    ds = data.load()
    _, summary = extract_dataset(ds, spec, run)
    views = extract_views(ds, spec, run, augment, test_too=tta) if augment else []
    out = dict(summary.as_dict(), dataset=ds.name, cache_dir=str(run.cache_dir))
    lines = [f"{'cache hit' if summary.cache_hit else 'extracted'}: {ds.name}, {summary.images} images, "
             f"{spec.model} ({summary.weights}) at {summary.size}px, {summary.seconds:.2f} s"
             + (f", {out['images_per_second']} images/s on {summary.engine}" if summary.computed else "")
             + (f", {spec.precision}" if spec.precision != "float32" else "")]
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
    emit(out, as_json, "\n".join(lines))


@app.command("plan")
@takes(data=DATA, spec=FEATURES, run=EXTRACT_RUN)
def plan_cmd(data: DataOptions, spec: FeatureSpec, run: RunSettings, as_json: Json = False):
    """Before extracting: images to compute after the cache, expected time (short measured warm-up), disk size."""
    from ..extraction.plan import describe, run_plan

    ds = data.load()
    out = run_plan(ds, spec, run)
    emit(dict(out, dataset=ds.name), as_json, describe(out))


# ---- heads ------------------------------------------------------------------------------------------
@app.command()
@takes(data=DATA, spec=FIT_FEATURES, run=EXTRACT_RUN, head=HEAD)
def fit(data: DataOptions, spec: FeatureSpec, run: RunSettings, head: HeadSpec, do_extract: DoExtract = False,
        as_json: Json = False):
    """Fit a head on cached features, evaluate it, save it as a run and add it to the ledger."""
    from ..runs.fit import describe, fit as fit_run

    record = fit_run(data, spec, run, head, extract=do_extract)
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
    from ..runs.report import render, plot_runs
    from ..runs.record import ledger_runs, runs_dir

    cache = cache_dir_of(cache_dir)
    rows = ledger_runs(cache)
    if not rows:
        raise FeatureCacheError(f"no runs in {runs_dir(cache)}; fit one with `featurecache fit`")
    print(render(rows, fmt))
    path = plot_runs(rows, plot or runs_dir(cache) / "report.png")
    say(f"plot: {path}")


@app.command()
def predict(files: Annotated[list[Path], typer.Argument(help="Image files.")],
            run: Annotated[str, typer.Option("--run", help="Run id printed by `featurecache fit`.")],
            fmt: Annotated[str, typer.Option("--format", help="text | json | csv.")] = "text",
            top: Annotated[int, typer.Option("--top", help="Also list the K best classes.")] = 1,
            batch_size: BatchSize = 64, cache_dir: CacheDir = None, quiet: Quiet = True, engine: Engine = None):
    """Label image files with a fitted run (backbone + head), reusing cached features."""
    from ..runs.predict import predict_files

    if fmt not in ("text", "json", "csv"):
        raise FeatureCacheError(f"--format {fmt}: use text, json or csv")
    settings = RunSettings(cache_dir_of(cache_dir), engine or default_engine(), batch_size, not quiet, log=say)
    rows = predict_files(files, run, settings, top=top)
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
@takes(run=CLASSIFY_RUN)
def classify(files: ClassifyFiles, run: RunSettings, top: ClassifyTop = 5, model: ClassifyModel = "efficientnet_lite0"):
    """ImageNet top-k from EfficientNet-Lite0's classifier tap (offline weights: proof that they are real), through
    the encoder as any extraction: same decoding, any --engine, --on-error."""
    from ..classify import classify as run_classify

    for path, preds in zip(files, run_classify([str(f) for f in files], top, run, model)):
        print(path)
        for idx, name, p in preds:
            print(f"  {p:6.3f}  {idx:4d}  {name}")
        if not preds:
            print("  skipped (unreadable: see the message above)")


@app.command("sweep")
@takes(data=DATA, spec=SWEEP_FEATURES, run=EXTRACT_RUN, head=SWEEP_HEAD, space=SWEEP)
def sweep_cmd(data: DataOptions, spec: FeatureSpec, run: RunSettings, head: HeadSpec, space: SweepSpace,
              plot: SweepPlot = None, as_json: Json = False):
    """Compare taps, poolings, sizes and heads on a validation split; refit the best, test it once."""
    from ..runs import sweep as sweeps

    result = sweeps.sweep(data, spec, run, head, space)
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


# ---- quickstart ----------------------------------------------------------------------------------
@app.command()
def quickstart(cache_dir: CacheDir = None, quiet: Quiet = False):
    """Extract real CNN codes of scikit-learn's digits offline, fit a linear SVM, print the results."""
    from ..runs.fit import fit as fit_run

    cache = cache_dir_of(cache_dir)
    opts = DataOptions("digits")
    spec = FeatureSpec("vgg16", "hed-bsds", ("block3_pool",), "flatten", 32)
    ds = opts.load()
    t0 = time.perf_counter()
    _, summary = extract_dataset(ds, spec, RunSettings(cache, progress=not quiet, log=say))
    record = fit_run(opts, spec, RunSettings(cache, progress=False, log=say),
                     HeadSpec("linsvc", normalize="l2", notes="quickstart"))
    m = record["metrics"]
    print(f"featurecache quickstart: digits ({len(ds.train)} train / {len(ds.test)} test images, 8x8 upsized "
          f"to {summary.size}x{summary.size})\n"
          f"  features: vgg16 (hed-bsds, offline) {spec.layers[0]}, {summary.sets[0]['dims']} dims, "
          f"{'cache hit' if summary.cache_hit else f'extracted {summary.computed} images'} in {summary.seconds:.1f} s\n"
          f"  head: linsvc, fitted in {record['fit_seconds']:.2f} s\n"
          f"  train accuracy {m['train_accuracy']:.4f}, test accuracy {m['test_accuracy']:.4f}\n"
          f"  run {record['run_id']} saved in {record['run_dir']}\n"
          f"  cache: {cache.resolve()} (run again: a cache hit)  total {time.perf_counter() - t0:.1f} s")


# The cache, project-file, export and serve commands register themselves after the pipeline's (help order).
from . import admin  # noqa: E402,F401  (registers the cache, project-file, export and serve commands)


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
        # --config decides the defaults of every option, so it is read before click parses the line.
        args, named = _config_flag(args)
        command = typer.main.get_command(app)
        choice, defaults = config.setup(command, named)
        if next((a for a in args if not a.startswith("-")), None) != "serve":  # serve says them after its first line
            for line in choice.notices:
                print(line, file=sys.stderr)
        # Outside standalone mode click returns a command's `typer.Exit(code)` instead of exiting with it.
        status = command.main(args=args, prog_name="featurecache", standalone_mode=False, default_map=defaults,
                              obj=choice)
        if isinstance(status, int) and status:
            sys.exit(status)
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


def _config_flag(args: list[str]) -> tuple[list[str], str | None]:
    """`--config FILE` (or `--config=FILE`), accepted anywhere on the line as --verbose is, and the rest."""
    rest, named = [], None
    it = iter(args)
    for a in it:
        if a == "--config" or a.startswith("--config="):
            named = a.partition("=")[2] if "=" in a else next(it, None)
            if not named:
                raise FeatureCacheError("--config needs a FILE: `featurecache --config path/to/featurecache.toml ...`")
        else:
            rest.append(a)
    return rest, named


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
