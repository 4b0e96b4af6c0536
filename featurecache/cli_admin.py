"""`featurecache` commands around the pipeline: the cache (ls, rm, prune, verify, repair), the project
file (init, config), export and serve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .api import DataOptions, default_engine
from .cli_common import app, cache_app, cache_dir_of, emit, say, when
from .errors import FeatureCacheError
from .extract import FeatureSpec
from .options import (DATA, EXTRACT_RUN, FEATURES, Augment, CacheDir, DataDir, Engine, Json, MaxTest, MaxTrain, Seed,
                      TestSize, Tta, takes)
from .settings import RunSettings


# ---- cache ------------------------------------------------------------------------------------------
@cache_app.command("ls")
def cache_ls(cache_dir: CacheDir = None, as_json: Json = False,
             graphs_only: Annotated[bool, typer.Option("--graphs", help="With --json: list the converted engine "
                                                                        "graphs instead of the feature sets.")] = False):
    """Feature sets with their key parts, image count and size on disk; converted graphs with their last use."""
    from .store import FeatureStore

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
    from .prune import graphs

    converted = [e.as_dict() for e in graphs(cache_dir_of(cache_dir))]
    text += "\nconverted graphs (`cache prune` removes the least recently used):\n" + ("\n".join(
        f"{g['id']}  {g['bytes'] / 1e6:8.1f} MB  last used {when(g['last_used'])}"
        for g in converted) or "(none)")
    emit(converted if graphs_only else rows, as_json, text)


@cache_app.command("rm")
def cache_rm(set_ids: Annotated[list[str], typer.Argument(help="Feature-set ids (a unique prefix is enough).")],
             cache_dir: CacheDir = None):
    """Remove feature sets."""
    from .store import FeatureStore

    store = FeatureStore(cache_dir_of(cache_dir))
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

    out = prune(cache_dir_of(cache_dir), parse_size(max_size) if max_size else None,
                parse_age(older_than) if older_than else None, features, dry_run)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {e['kind']:<8} {e['id']}  {e['bytes'] / 1e6:8.1f} MB  last used {when(e['last_used'])}"
             for e in out["removed"]]
    lines += [f"skipped  {e['kind']:<8} {e['id']}: {e['reason']}" for e in out["skipped"]]
    lines.append(f"{verb} {out['freed_bytes'] / 1e6:.1f} MB; {out['kept_bytes'] / 1e6:.1f} MB kept")
    emit(out, as_json, "\n".join(lines))


VerifyData = Annotated[Optional[str], typer.Option("--data", help="Also recompute a few stored rows from this "
                                                                  "dataset's images (same form as extract's).")]
Sample = Annotated[int, typer.Option("--sample", help="Rows to recompute per set with --data.")]


def _verify_args(set_ids, cache_dir, data, data_dir, test_size, seed, max_train, max_test):
    from .store import FeatureStore

    store = FeatureStore(cache_dir_of(cache_dir))
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
    reports = [verify(fs, ds, sample, cache_dir_of(cache_dir)) for fs in sets]
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
        print(repair(fs, ds, sample, cache_dir_of(cache_dir), log=say).line())


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


# ---- export (featurecache/export.py, docs/EXPORT.md) -------------------------------------------------
@app.command("export")
def export_cmd(run: Annotated[Optional[str], typer.Option("--run", help="Run id printed by `featurecache fit`.")] = None,
               fmt: Annotated[str, typer.Option("--format", help="onnx.")] = "onnx",
               precision: Annotated[Optional[str], typer.Option(
                   "--precision", help="float32 or int8; the run's own (a file feeds its head the vectors it was "
                                       "fitted on).")] = None,
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
        r = fc_export.check(check, cache_dir_of(cache_dir), data, data_dir, engine or default_engine(), log=say)
        emit(r, as_json, fc_export.describe_check(r))
        if r["agree"] != r["images"]:
            raise typer.Exit(1)
        return
    if data is not None:
        raise FeatureCacheError("--data goes with --check; export takes everything from the run")
    if run is None:
        raise FeatureCacheError("give --run ID to export, or --check FILE to check an exported file")
    r = fc_export.export_run(run, cache_dir_of(cache_dir), output, fmt, precision, force, log=say)
    emit(r, as_json, f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB): {r['features']} -> {r['head']}, uint8 "
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

    token = token_for(host, token, no_auth, log=say)  # refuses an exposed, open server before loading
    if bool(run) == all_runs:
        raise FeatureCacheError("give --run ID (repeatable) or --all-runs" if not run else
                                "--run and --all-runs contradict each other; give one of them")
    opts = ServeOptions(run[0] if run else "", str(cache_dir_of(cache_dir)), max_batch, max_wait_ms,
                        int(max_body_mb * (1 << 20)), max_pixels, engine or default_engine())
    run_server(opts, host, port, workers, runs=run, all_runs=all_runs, token=token)
