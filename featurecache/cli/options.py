"""Command-line options, declared once, and the value objects they fill.

Every option a command takes is declared here, with its constraint (a `Literal` becomes a checked
choice, so a bad value is click's one-line usage error rather than a check of ours). Commands do not
list the feature, data and run options one by one: `takes(data=DATA, spec=FEATURES, run=RUN)` adds a
group's options to a command's signature and hands the command one value object per group. So
`extract`, `fit`, `plan` and `sweep` accept the same `--resize`, `--preprocess`, `--precision` and
`--engine`, and `featurecache.toml` (featurecache/cli/config.py) can set any of them for every command.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer

from ..encoding import pooling, preprocessing
from .. import settings
from ..engines import ENGINE_CHOICES
from ..heads import options as head_options, registry as head_registry

# The choice lists are declared beside the code that acts on them; the options take them from there.
POOLS = pooling.STORED
RESIZES = settings.RESIZES
PREPROCESSES = preprocessing.OPTIONS
ENGINES = ENGINE_CHOICES
PRECISIONS = settings.PRECISIONS
ON_ERRORS = settings.ON_ERROR
NORMALIZES = head_registry.NORMALIZES
EXECUTORS = settings.EXECUTORS

Data = Annotated[str, typer.Option("--data", help="Folder of class subfolders (or train/ and test/), an .npz, "
                                                  "or digits | fashion-mnist | mnist | cifar10.")]
DataDir = Annotated[Optional[str], typer.Option("--data-dir", help="Folder holding a built-in dataset's files.")]
TestSize = Annotated[float, typer.Option("--test-size", help="Test fraction when a dataset has no split.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the split, random weights and heads.")]
MaxTrain = Annotated[Optional[int], typer.Option("--max-train", min=1, help="Use a stratified subset of N train "
                                                                            "images.")]
MaxTest = Annotated[Optional[int], typer.Option("--max-test", min=1, help="Use a stratified subset of N test images.")]
Model = Annotated[str, typer.Option("--model", help="Backbone; see `featurecache models`.")]
Weights = Annotated[str, typer.Option("--weights", help="imagenet | random | an offline name (hed-bsds) | PATH.")]
Layers = Annotated[Optional[list[str]], typer.Option("--layer", help="Layer tap (repeatable); default: the "
                                                                    "model's last conv/pool output.")]
Pool = Annotated[Literal[POOLS], typer.Option("--pool", help=f"How a tap's map becomes a vector: "
                                                            f"{pooling.STORED_HELP}.")]
Size = Annotated[Optional[int], typer.Option("--size", min=1, help="Input side in pixels (default: the images' "
                                                                   "own, raised to the model's minimum).")]
Resize = Annotated[Literal[RESIZES], typer.Option(
    "--resize", help="How images reach --size: auto (nearest when upsizing, antialiased bilinear when downsizing) "
                     "| nearest | bilinear.")]
Preprocess = Annotated[Literal[PREPROCESSES], typer.Option("--preprocess", help="auto (the model's own) | "
                                                                                     "scale01 (x/255).")]
Precision = Annotated[Literal[PRECISIONS], typer.Option(
    "--precision", help="bf16: bfloat16 arithmetic on OpenVINO, on CPUs with AVX512_BF16 or AMX; int8: post-training "
                        "quantisation calibrated on your training images (each a separate feature set).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass (does not change "
                                                                    "vectors).")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", envvar="FEATURECACHE_DIR",
                                                  help="Cache folder [default: ./cache, or next to "
                                                       "featurecache.toml].")]
Engine = Annotated[Optional[Literal[ENGINES]], typer.Option(
    "--engine", envvar="FEATURECACHE_ENGINE", help="What runs the network; same vectors, same cache "
                                                   "[default: auto, the fastest installed].")]
OnError = Annotated[Literal[ON_ERRORS], typer.Option(
    "--on-error", help="Unreadable images: fail (checks every image before any network work) | skip (leave "
                       "them out, list them).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
RecomputeStale = Annotated[bool, typer.Option(
    "--recompute-stale", help="A feature set found stale under new TensorFlow, Keras or Pillow versions (its "
                              "sample rows no longer match): recompute it (sets under 10,000 rows always are).")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary.")]
Executor = Annotated[Literal[EXECUTORS], typer.Option(
    "--executor", help="Where images are encoded: local (this process) | ray (a Ray cluster: --ray-address, or "
                       "a local one for the run); same vectors, same cache.")]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray-address", help="--executor ray: the cluster to join (HOST:PORT, ray://HOST:PORT or auto) "
                          "[default: $RAY_ADDRESS, else a local Ray started and stopped for the run].")]
Workers = Annotated[Optional[int], typer.Option("--workers", min=1, help="--executor ray: encoder actors "
                                                                        "[default: fill the cluster].")]
ThreadsPerWorker = Annotated[int, typer.Option("--threads-per-worker", min=1, help="--executor ray: CPUs (and "
                                                                                  "engine threads) per actor.")]
Normalize = Annotated[Literal[NORMALIZES], typer.Option(
    "--normalize", help="Row scaling before the head; auto: l2 for one tap, l2-per-tap (each tap to unit norm, "
                        "then the row) for several.")]


def _views(values):
    from ..data.augment import check

    return list(check(values or []))


Augment = Annotated[Optional[list[str]], typer.Option(
    "--augment", callback=_views, help="Augmented views (repeatable; hflip): extract stores the training images' "
                                       "vectors of each view; fit adds them as training rows.")]
Tta = Annotated[bool, typer.Option("--tta", help="With --augment: the test images' views too (extract), and test "
                                                 "scores averaged over each image and its views (fit).")]


def _fit_pool(value: str) -> str:
    return pooling.Pooling.parse(value).name


FitPool = Annotated[str, typer.Option("--pool", callback=_fit_pool, help=f"{pooling.HELP}.")]


# ---- fit, sweep and quickstart: the head side -------------------------------------------------------
# The heads, their options and the normalisations are declared in featurecache/heads (registry.py,
# options.py); the flags below are made from those declarations, so a head or an option added there is
# a choice here, in --help and in featurecache.toml with nothing else to change.
HeadName = Annotated[Literal[tuple(head_registry.HEADS)], typer.Option(
    "--head", help="The classifier fitted on the features: " + " | ".join(head_registry.HEADS) + ".")]


def _head_flag(option: head_options.Option):
    """(annotation, default) of fit's flag for one option of the heads, its help naming the heads that take it."""
    text = f"{option.help[0].upper()}{option.help[1:]} ({', '.join(head_registry.heads_with(option.name))})."
    if option.kind is bool:
        return Annotated[bool, typer.Option(head_options.option_flag(option.name), help=text)], False
    bounds = {"min": 1} if option.convert is head_options.positive_int else {}
    return Annotated[Optional[option.kind], typer.Option(head_options.option_flag(option.name), help=text,
                                                         **bounds)], None


# Every option of the heads is a flag of fit, but seed: a head's seed is --seed, the split's and random
# weights' too (heads.with_seed gives it to the heads that take one).
HEAD_FLAGS = {name: _head_flag(o) for name, o in head_options.OPTIONS.items() if name != "seed"}
Pca = Annotated[Optional[int], typer.Option("--pca", min=1, help="Reduce to N dimensions first.")]
Grid = Annotated[Optional[list[str]], typer.Option("--grid", help="Cross-validated search on the train split, e.g. "
                                                                  "C=0.01,0.1,1 (repeatable).")]
DoExtract = Annotated[bool, typer.Option("--extract", help="Extract missing features first instead of failing.")]
Notes = Annotated[str, typer.Option("--notes", help="Free text stored with the run.")]
MaxMemory = Annotated[Optional[str], typer.Option("--max-memory", help=(
    "Largest training matrix to hold (e.g. 4GB) [default: 3/4 of this machine's memory]; past it, a streaming "
    "head (" + ", ".join(h.name for h in head_registry.HEADS.values() if h.streams) + ") reads the cache chunk "
    "by chunk, others say what to do."))]
SweepLayers = Annotated[str, typer.Option("--layers", help="all (each stage's output), or L1,L2,... with `+` joining "
                                                           "taps fitted together (L1+L2).")]
SweepPools = Annotated[Optional[str], typer.Option("--pools", help="Poolings to compare, e.g. flatten,max2x2,avg "
                                                                   "[default: --pool].")]
SweepSizes = Annotated[Optional[str], typer.Option("--sizes", help="Input sizes, e.g. 32,64 [default: the images' "
                                                                   "own].")]


def _head_list(value: str) -> str:
    for name in value.split(","):
        head_registry.get_head(name.strip())  # an unknown head: one line naming the known ones
    return value


SweepHeads = Annotated[str, typer.Option("--heads", callback=_head_list, help=(
    "Heads to fit on each tap, e.g. linsvc,logreg; of " + ", ".join(head_registry.HEADS) + "."))]
Validation = Annotated[float, typer.Option("--validation", min=0.05, max=0.5, help=(
    "Fraction of the training images held out to compare configurations on; the test split scores the "
    "chosen one only."))]
SweepPlot = Annotated[Optional[Path], typer.Option("--plot", help="PNG path [default: <cache>/sweep.png].")]


# ---- the main callback, models and layers, the cache, the project file, export and serve ------------
Verbose = Annotated[bool, typer.Option("--verbose", help="Also show TensorFlow's, absl's and the engines' own log "
                                                         "lines.")]
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", help="Use this project file instead of the nearest featurecache.toml; only a file named here may "
                     "set serve's host, no-auth, token and token-file.")]
GraphsOnly = Annotated[bool, typer.Option("--graphs", help="With --json: list the converted engine graphs instead of "
                                                           "the feature sets.")]
SetIds = Annotated[list[str], typer.Argument(help="Feature-set ids (a unique prefix is enough).")]
SetsToCheck = Annotated[Optional[list[str]], typer.Argument(help="Sets to check (default all).")]
SetsToRepair = Annotated[list[str], typer.Argument(help="Sets to repair.")]
MaxSize = Annotated[Optional[str], typer.Option("--max-size", help="Keep at most this much, least recently used "
                                                                   "first out (e.g. 5GB).")]
OlderThan = Annotated[Optional[str], typer.Option("--older-than", help="Remove what was not used for this long "
                                                                       "(e.g. 30d).")]
PruneFeatures = Annotated[bool, typer.Option("--features", help="Also feature sets (hours of work each), never one "
                                                                "being written.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")]
CheckData = Annotated[Optional[str], typer.Option("--data", help="Also recompute a few stored rows from this "
                                                                 "dataset's images (same form as extract's).")]
Sample = Annotated[int, typer.Option("--sample", help="Rows to recompute per set with --data.")]
InitForce = Annotated[bool, typer.Option("--force", help="Replace an existing featurecache.toml.")]
ConfigWords = Annotated[Optional[list[str]], typer.Argument(
    help="A command (fit, cache verify) and, if you like, its flags: shows what that call would use.")]
ExportRun = Annotated[Optional[str], typer.Option("--run", help="Run id printed by `featurecache fit`.")]
ExportFormat = Annotated[str, typer.Option("--format", help="onnx.")]
ExportPrecision = Annotated[Optional[str], typer.Option(
    "--precision", help="float32 or int8; the run's own (a file feeds its head the vectors it was fitted on).")]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="File to write (default: ./RUN_ID.onnx).")]
ExportForce = Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")]
ExportCheck = Annotated[Optional[Path], typer.Option(
    "--check", help="Run an exported file with plain ONNX Runtime on the run's test images and compare with "
                    "`featurecache predict`.")]
ExportCheckData = Annotated[Optional[str], typer.Option("--data", help="With --check: the data to take the test "
                                                                       "split of (default: the run's own).")]
ServeRuns = Annotated[Optional[list[str]], typer.Option(
    "--run", help="Run id printed by `featurecache fit`; repeat to serve several (the first is the default, "
                  "`?run=ID` picks another).")]
AllRuns = Annotated[bool, typer.Option("--all-runs", help="Serve every run in the cache, newest first.")]
Host = Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback (0.0.0.0 exposes it to "
                                                  "the network) needs --token.")]
Port = Annotated[int, typer.Option("--port", min=1, max=65535)]  # checked before any model loads
Token = Annotated[Optional[str], typer.Option(
    "--token", envvar="FEATURECACHE_TOKEN", show_default=False,
    help="Clients must send `Authorization: Bearer TOKEN` (all but /health and the page). Every local user "
         "sees a flag in `ps`: prefer --token-file or FEATURECACHE_TOKEN.")]
TokenFile = Annotated[Optional[Path], typer.Option(
    "--token-file", help="Read the token from this file (surrounding whitespace dropped): out of `ps`, unlike "
                          "--token.")]
NoAuth = Annotated[bool, typer.Option("--no-auth", help="Serve off loopback without a token (anyone who reaches "
                                                        "the port may use it).")]
ServeWorkers = Annotated[int, typer.Option("--workers", help="Processes, each with its own model (1 batches best on "
                                                             "few cores).")]
MaxBatch = Annotated[int, typer.Option("--max-batch", help="Images per forward pass.")]
MaxWaitMs = Annotated[float, typer.Option("--max-wait-ms", help="Longest wait for a batch to fill.")]
MaxBodyMb = Annotated[float, typer.Option("--max-body-mb", help="Request size limit.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", help="Largest image, in pixels.")]
MaxRequestPixels = Annotated[int, typer.Option(
    "--max-request-pixels", min=1, help="Decoded pixels per request, summed over its new images (identical ones "
                                        "count once); over it: 413. Default: four 4096x4096 images.")]
ServeDocs = Annotated[bool, typer.Option("--docs", help="Serve /docs and /redoc (their pages load scripts from a "
                                                        "CDN; /openapi.json is always served).")]


# ---- classify --------------------------------------------------------------------------------------
ClassifyFiles = Annotated[list[Path], typer.Argument(help="Image files.")]
ClassifyTop = Annotated[int, typer.Option("--top", help="How many classes, best first.")]


def _classifier_models():
    from ..classify import MODELS

    return MODELS


ClassifyModel = Annotated[Literal[_classifier_models()], typer.Option(
    "--model", help="A backbone whose ImageNet classifier is a tap (offline weights).")]


@dataclass(frozen=True)
class Group:
    """Options that together fill one value object: name -> (annotation, default), and the builder."""
    fields: dict[str, tuple[Any, Any]]
    build: Callable[[dict], Any]


def _data(v: dict):
    from ..data.datasets import DataOptions

    return DataOptions(v["data"], v["data_dir"], v["test_size"], v["seed"], v["max_train"], v["max_test"])


def _features(v: dict):
    from ..extraction.extract import FeatureSpec

    return FeatureSpec(v["model"], v["weights"], tuple(v.get("layer") or ()), v["pool"], v.get("size"),
                       v["resize"], v["preprocess"], v["seed"], v["precision"])


def _run(v: dict):
    """settings.RunSettings from the run options; `--executor ray` adds where and how wide."""
    from ..settings import default_cache_dir, default_engine
    from ..settings import RunSettings

    cluster = None
    if v.get("executor", "local") == "ray":
        from ..extraction.cluster import ClusterSettings

        cluster = ClusterSettings(v.get("ray_address"), v.get("workers"), v.get("threads_per_worker", 1))
    return RunSettings(Path(v["cache_dir"]) if v.get("cache_dir") else default_cache_dir(),
                       v.get("engine") or default_engine(), v.get("batch_size", 64),
                       not v.get("quiet", False) and not v.get("as_json", False), v.get("on_error", "fail"),
                       None, v.get("executor", "local"), cluster, v.get("recompute_stale", False))


REQUIRED = inspect.Parameter.empty
DATA = Group({"data": (Data, REQUIRED), "data_dir": (DataDir, None), "test_size": (TestSize, 0.25),
              "seed": (Seed, 0), "max_train": (MaxTrain, None), "max_test": (MaxTest, None)}, _data)
FEATURES = Group({"model": (Model, "vgg16"), "weights": (Weights, "imagenet"), "layer": (Layers, None),
                  "pool": (Pool, "flatten"), "size": (Size, None), "resize": (Resize, "auto"),
                  "preprocess": (Preprocess, "auto"), "seed": (Seed, 0), "precision": (Precision, "float32")},
                 _features)
# fit may also pool at fit time: views of a stored flattened map (featurecache/encoding/pooling.py).
FIT_FEATURES = Group({**FEATURES.fields, "pool": (FitPool, "flatten")}, _features)
# sweep names its own taps (--layers) and sizes (--sizes): the same feature options less those two.
SWEEP_FEATURES = Group({k: v for k, v in FEATURES.fields.items() if k not in ("layer", "size")}, _features)
RUN = Group({"cache_dir": (CacheDir, None), "engine": (Engine, None), "batch_size": (BatchSize, 64),
             "on_error": (OnError, "fail"), "quiet": (Quiet, False), "recompute_stale": (RecomputeStale, False)},
            _run)
# extract and plan also choose where the network runs; fit --extract and sweep run it here.
EXTRACT_RUN = Group({**RUN.fields, "executor": (Executor, "local"), "ray_address": (RayAddress, None),
                     "workers": (Workers, None), "threads_per_worker": (ThreadsPerWorker, 1)}, _run)
# classify runs images through the encoder as extract does, but stores nothing (no stale sets to recompute)
# and shows no progress bar.
CLASSIFY_RUN = Group({k: v for k, v in RUN.fields.items() if k not in ("recompute_stale", "quiet")}, _run)

# cache verify/repair: --data is optional (no data: structure only), and only the cache folder of the run.
CHECK_DATA = Group({**DATA.fields, "data": (CheckData, None)}, lambda v: _data(v) if v["data"] else None)
CACHE = Group({"cache_dir": (CacheDir, None)}, _run)


def _head(v: dict):
    """settings.HeadSpec from fit's head options (sweep's: normalize, augment and tta)."""
    from ..store.prune import parse_size
    from ..settings import HeadSpec

    options = {name: v[name] if v[name] is not False else None for name in HEAD_FLAGS if name in v}
    size = v.get("max_memory")
    return HeadSpec(v.get("head", "linsvc"), options, v["normalize"], v.get("pca"), tuple(v.get("grid") or ()),
                    tuple(v.get("augment") or ()), v.get("tta", False),
                    parse_size(size, "--max-memory") if size else None, v.get("notes", ""))


def _space(v: dict):
    """sweep.SweepSpace from sweep's --layers, --sizes, --heads, --pools and --validation."""
    from ..errors import FeatureCacheError
    from ..runs.sweep import SweepSpace

    try:
        sizes = tuple(int(s) for s in v["sizes"].split(",")) if v["sizes"] else (None,)
    except ValueError:
        raise FeatureCacheError(f"--sizes {v['sizes']}: give whole numbers separated by commas, e.g. 32,64") from None
    return SweepSpace(v["layers"], sizes, tuple(h.strip() for h in v["heads"].split(",")),
                      tuple(p.strip() for p in v["pools"].split(",")) if v["pools"] else (), v["validation"])


HEAD = Group({"head": (HeadName, "linsvc"), "normalize": (Normalize, "auto"), "pca": (Pca, None), **HEAD_FLAGS,
              "grid": (Grid, None), "augment": (Augment, None), "tta": (Tta, False), "max_memory": (MaxMemory, None),
              "notes": (Notes, "")}, _head)
# sweep fits each of its --heads as they come (no options, pca or grid): the rows' scaling and the views.
SWEEP_HEAD = Group({"normalize": (Normalize, "auto"), "augment": (Augment, None), "tta": (Tta, False)}, _head)
SWEEP = Group({"layers": (SweepLayers, "all"), "pools": (SweepPools, None), "sizes": (SweepSizes, None),
               "heads": (SweepHeads, "linsvc"), "validation": (Validation, 0.2)}, _space)


def takes(**groups: Group):
    """Decorator: add each group's options to a command and pass it one value object per group.

    The command's own parameters come first in --help, then the groups' in declaration order; a field
    two groups share (`--seed`: the split's and random weights') is one option that fills both.
    """
    def wrap(func):
        hints = typing.get_type_hints(func, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(func).parameters.values() if p.name not in groups]
        names = {p.name for p in own}
        added = []
        for group in groups.values():
            for name, (annotation, default) in group.fields.items():
                if name not in names:
                    names.add(name)
                    added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                   annotation=annotation))
        own_names = {p.name for p in own}

        @functools.wraps(func)
        def command(**values):
            built = {gname: g.build(values) for gname, g in groups.items()}
            return func(**{k: v for k, v in values.items() if k in own_names}, **built)

        command.__signature__ = inspect.Signature(own + added)
        command.__annotations__ = {p.name: p.annotation for p in own + added}
        del command.__wrapped__  # typer must read the new signature, not the function's own
        return command
    return wrap
