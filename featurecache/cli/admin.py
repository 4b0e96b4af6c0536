"""`featurecache` commands around the pipeline: the cache (ls, rm, prune, verify, repair), the project
file (init, config), export and serve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..api import DataOptions, default_engine
from .common import app, cache_app, cache_dir_of, emit, say, when
from ..errors import FeatureCacheError
from ..extraction.extract import FeatureSpec
from .options import (CACHE, CHECK_DATA, DATA, EXTRACT_RUN, FEATURES, AllRuns, Augment, CacheDir, ConfigWords,
                      DataDir, DryRun, Engine, ExportCheck, ExportCheckData, ExportForce, ExportFormat,
                      ExportPrecision, ExportRun, GraphsOnly, Host, InitForce, Json, MaxBatch, MaxBodyMb,
                      MaxPixels, MaxSize, MaxWaitMs, NoAuth, OlderThan, Output, Port, PruneFeatures, Sample,
                      ServeRuns, ServeWorkers, SetIds, SetsToCheck, SetsToRepair, Token, Tta, takes)
from .options import MaxRequestPixels, ServeDocs
from .options import TokenFile
from ..settings import RunSettings


# ---- cache ------------------------------------------------------------------------------------------
@cache_app.command("ls")
def cache_ls(cache_dir: CacheDir = None, as_json: Json = False, graphs_only: GraphsOnly = False):
    """Feature sets with their key parts, image count and size on disk; converted graphs with their last use."""
    from ..store.sets import FeatureStore

    rows = []
    for fs in FeatureStore(cache_dir_of(cache_dir)).all():
        k = fs.key
        rows.append({"id": fs.id, "model": k["model"], "weights": k["weights"], "layer": k["layer"],
                     "pool": k["pool"], "size": k["size"], "resize": k["resize"], "preprocess": k["preprocess"],
                     "dims": fs.dims, "images": len(fs), "parts": len(fs.part_files()), "bytes": fs.disk_bytes(),
                     "key": k})
    text = "\n".join(f"{r['id']}  {r['model']:<18} {r['layer']:<22} {r['pool']:<7} {r['size']:>4}px "
                     f"{r['resize']:<8} {r['preprocess']:<7} {r['weights']:<28} dims {r['dims']:>6} "
                     f"images {r['images']:>7}  {r['bytes'] / 1e6:8.1f} MB" for r in rows) or "(no feature sets)"
    from ..store.prune import graphs

    converted = [e.as_dict() for e in graphs(cache_dir_of(cache_dir))]
    text += "\nconverted graphs (`cache prune` removes the least recently used):\n" + ("\n".join(
        f"{g['id']}  {g['bytes'] / 1e6:8.1f} MB  last used {when(g['last_used'])}"
        for g in converted) or "(none)")
    emit(converted if graphs_only else rows, as_json, text)


@cache_app.command("rm")
def cache_rm(set_ids: SetIds, cache_dir: CacheDir = None):
    """Remove feature sets."""
    from ..store.sets import FeatureStore

    store = FeatureStore(cache_dir_of(cache_dir))
    for sid in set_ids:
        fs = store.find(sid)
        print(store.remove(fs.id))  # "removed ID", or what a linked set's removal left in place


@cache_app.command("prune")
def cache_prune(cache_dir: CacheDir = None, max_size: MaxSize = None, older_than: OlderThan = None,
                features: PruneFeatures = False, dry_run: DryRun = False, as_json: Json = False):
    """Remove least recently used converted graphs (and, with --features, feature sets) from the cache."""
    from ..store.prune import parse_age, parse_size, prune

    out = prune(cache_dir_of(cache_dir), parse_size(max_size) if max_size else None,
                parse_age(older_than) if older_than else None, features, dry_run)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {e['kind']:<8} {e['id']}  {e['bytes'] / 1e6:8.1f} MB  last used {when(e['last_used'])}"
             for e in out["removed"]]
    lines += [f"skipped  {e['kind']:<8} {e['id']}: {e['reason']}" for e in out["skipped"]]
    lines.append(f"{verb} {out['freed_bytes'] / 1e6:.1f} MB; {out['kept_bytes'] / 1e6:.1f} MB kept")
    emit(out, as_json, "\n".join(lines))


def _sets(set_ids: list[str] | None, run: RunSettings) -> list:
    from ..store.sets import FeatureStore

    store = FeatureStore(run.cache_dir)
    return [store.find(s) for s in set_ids] if set_ids else store.all()


@cache_app.command("verify")
@takes(data=CHECK_DATA, run=CACHE)
def cache_verify(data: Optional[DataOptions], run: RunSettings, set_ids: SetsToCheck = None, sample: Sample = 8):
    """Check feature sets: files readable, right configuration, shapes; with --data, recomputed rows match."""
    from ..extraction.verify import verify

    ds = data.load() if data else None
    reports = [verify(fs, ds, run, sample) for fs in _sets(set_ids, run)]
    for r in reports:
        print(r.line())
    bad = [r.set_id for r in reports if not r.ok]
    if bad:
        raise FeatureCacheError(f"{len(bad)} feature set(s) damaged; `featurecache cache repair {bad[0]}` moves "
                                "damaged parts aside (the next extract recomputes their rows), `cache rm` removes a set")


@cache_app.command("repair")
@takes(data=CHECK_DATA, run=CACHE)
def cache_repair(data: Optional[DataOptions], run: RunSettings, set_ids: SetsToRepair, sample: Sample = 8):
    """Move a set's damaged parts aside (into damaged/) so the next extract recomputes only their rows."""
    from ..extraction.verify import repair

    ds = data.load() if data else None
    for fs in _sets(set_ids, run):
        print(repair(fs, ds, run, sample).line())


# ---- project file ---------------------------------------------------------------------------------
@app.command()
@takes(data=DATA, spec=FEATURES, run=EXTRACT_RUN)
def init(ctx: typer.Context, data: DataOptions, spec: FeatureSpec, run: RunSettings,
         augment: Augment = None, tta: Tta = False, force: InitForce = False):
    """Write featurecache.toml here: the options given become every command's defaults in this folder."""
    from . import config
    from ..data.datasets import BUILTINS

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
    from ..store.sets import write_atomic

    write_atomic(path, text)
    print(f"wrote {path}:\n" + config.render(given), end="")


@app.command("config", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def config_cmd(ctx: typer.Context, command: ConfigWords = None, as_json: Json = False):
    """The option values in force here and where each comes from: flag, environment, file or default."""
    from . import config

    root = ctx.find_root()
    words = list(command or []) + list(ctx.args)
    rows = config.in_force(root, words)
    choice = config.choice_of(ctx)
    if as_json:
        print(json.dumps({"file": str(choice.path) if choice.path else None, "named": choice.named, "values": rows},
                         indent=1))
        return
    print(choice.describe())
    for key, row in rows.items():
        print(f"  {key:<14} = {json.dumps(row['value']):<28} {row['source']}")


# ---- export (featurecache/export/exporter.py, docs/EXPORT.md) -------------------------------------------------
@app.command("export")
def export_cmd(run: ExportRun = None, fmt: ExportFormat = "onnx", precision: ExportPrecision = None,
               output: Output = None, force: ExportForce = False, check: ExportCheck = None,
               data: ExportCheckData = None, data_dir: DataDir = None, cache_dir: CacheDir = None,
               engine: Engine = None, as_json: Json = False):
    """A fitted run as one ONNX file (uint8 images in; scores and label out), or --check such a file."""
    from ..export import exporter as fc_export

    settings = RunSettings(cache_dir_of(cache_dir), engine or default_engine(), log=say)
    if check is not None:
        if run is not None:
            raise FeatureCacheError("--check reads the run id from the file's metadata; drop --run")
        r = fc_export.check(check, settings, data, data_dir)
        emit(r, as_json, fc_export.describe_check(r))
        if r["agree"] != r["images"]:
            raise typer.Exit(1)
        return
    if data is not None:
        raise FeatureCacheError("--data goes with --check; export takes everything from the run")
    if run is None:
        raise FeatureCacheError("give --run ID to export, or --check FILE to check an exported file")
    r = fc_export.export_run(fc_export.ExportRequest(run, output, fmt, precision, force), settings)
    emit(r, as_json, f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB): {r['features']} -> {r['head']}, uint8 "
                      f"{r['input_size']}x{r['input_size']} RGB in, {r['score_kind']} scores and label out; "
                      f"head within {r['head_max_difference']:.2g} of the pickled one; {r['seconds']:.1f} s")


# ---- serving --------------------------------------------------------------------------------------
@app.command()
def serve(ctx: typer.Context,
          run: ServeRuns = None, all_runs: AllRuns = False, host: Host = "127.0.0.1", port: Port = 8000,
          token: Token = None, token_file: TokenFile = None,
          no_auth: NoAuth = False, workers: ServeWorkers = 1, max_batch: MaxBatch = 32,
          max_wait_ms: MaxWaitMs = 2.0, max_body_mb: MaxBodyMb = 20.0, max_pixels: MaxPixels = 4096 * 4096,
          cache_dir: CacheDir = None, engine: Engine = None, max_request_pixels: MaxRequestPixels = 64 << 20,
          docs: ServeDocs = False):
    """Serve fitted runs over HTTP: a page at /, POST /predict and /embed, GET /health, /info, /runs, /sets
    (OpenAPI at /openapi.json; /docs with --docs)."""
    from . import config
    from ..serving.auth import token_for
    from ..serving.server import ServeOptions, serve as run_server

    # First, which project file set this server's defaults (or none), then what was left out of it.
    choice = config.choice_of(ctx)
    for line in (choice.describe(), *choice.notices):
        say(line)
    token = token_for(host, token, no_auth, log=say, token_file=token_file)  # refuses an exposed, open server
    if bool(run) == all_runs:
        raise FeatureCacheError("give --run ID (repeatable) or --all-runs" if not run else
                                "--run and --all-runs contradict each other; give one of them")
    opts = ServeOptions(run[0] if run else "", str(cache_dir_of(cache_dir)), max_batch, max_wait_ms,
                        int(max_body_mb * (1 << 20)), max_pixels, engine or default_engine(),
                        max_request_pixels=max_request_pixels, docs=docs)
    run_server(opts, host, port, workers, runs=run, all_runs=all_runs, token=token)
