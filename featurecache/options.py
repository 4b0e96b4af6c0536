"""Command-line options, declared once, and the value objects they fill.

Every option a command takes is declared here, with its constraint (a `Literal` becomes a checked
choice, so a bad value is click's one-line usage error rather than a check of ours). Commands do not
list the feature, data and run options one by one: `takes(data=DATA, spec=FEATURES, run=RUN)` adds a
group's options to a command's signature and hands the command one value object per group. So
`extract`, `fit`, `plan` and `sweep` accept the same `--resize`, `--preprocess`, `--precision` and
`--engine`, and `featurecache.toml` (featurecache/config.py) can set any of them for every command.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer

POOLS = ("flatten", "avg", "max")
RESIZES = ("auto", "nearest", "bilinear")
PREPROCESSES = ("auto", "scale01")
ENGINES = ("auto", "tensorflow", "onnxruntime", "openvino")
PRECISIONS = ("float32", "bf16", "int8")
ON_ERRORS = ("fail", "skip")
NORMALIZES = ("auto", "l2", "l2-per-tap", "standard", "none")
EXECUTORS = ("local", "ray")

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
Pool = Annotated[Literal["flatten", "avg", "max"], typer.Option("--pool", help="How a tap's map becomes a vector.")]
Size = Annotated[Optional[int], typer.Option("--size", min=1, help="Input side in pixels (default: the images' "
                                                                   "own, raised to the model's minimum).")]
Resize = Annotated[Literal["auto", "nearest", "bilinear"], typer.Option(
    "--resize", help="How images reach --size: auto (nearest when upsizing, antialiased bilinear when downsizing) "
                     "| nearest | bilinear.")]
Preprocess = Annotated[Literal["auto", "scale01"], typer.Option("--preprocess", help="auto (the model's own) | "
                                                                                     "scale01 (x/255).")]
Precision = Annotated[Literal["float32", "bf16", "int8"], typer.Option(
    "--precision", help="bf16: bfloat16 arithmetic on OpenVINO, on CPUs with AVX512_BF16 or AMX; int8: post-training "
                        "quantisation calibrated on your training images (each a separate feature set).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass (does not change "
                                                                    "vectors).")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", envvar="FEATURECACHE_DIR",
                                                  help="Cache folder [default: ./cache, or next to "
                                                       "featurecache.toml].")]
Engine = Annotated[Optional[Literal["auto", "tensorflow", "onnxruntime", "openvino"]], typer.Option(
    "--engine", envvar="FEATURECACHE_ENGINE", help="What runs the network; same vectors, same cache "
                                                   "[default: auto, the fastest installed].")]
OnError = Annotated[Literal["fail", "skip"], typer.Option(
    "--on-error", help="Unreadable images: fail (checks every image before any network work) | skip (leave "
                       "them out, list them).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
RecomputeStale = Annotated[bool, typer.Option(
    "--recompute-stale", help="A feature set found stale under new TensorFlow, Keras or Pillow versions (its "
                              "sample rows no longer match): recompute it (sets under 10,000 rows always are).")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary.")]
Executor = Annotated[Literal["local", "ray"], typer.Option(
    "--executor", help="Where images are encoded: local (this process) | ray (a Ray cluster: --ray-address, or "
                       "a local one for the run); same vectors, same cache.")]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray-address", help="--executor ray: the cluster to join (HOST:PORT, ray://HOST:PORT or auto) "
                          "[default: $RAY_ADDRESS, else a local Ray started and stopped for the run].")]
Workers = Annotated[Optional[int], typer.Option("--workers", min=1, help="--executor ray: encoder actors "
                                                                        "[default: fill the cluster].")]
ThreadsPerWorker = Annotated[int, typer.Option("--threads-per-worker", min=1, help="--executor ray: CPUs (and "
                                                                                  "engine threads) per actor.")]
Normalize = Annotated[Literal["auto", "l2", "l2-per-tap", "standard", "none"], typer.Option(
    "--normalize", help="Row scaling before the head; auto: l2 for one tap, l2-per-tap (each tap to unit norm, "
                        "then the row) for several.")]


def _views(values):
    from .augment import check

    return list(check(values or []))


Augment = Annotated[Optional[list[str]], typer.Option(
    "--augment", callback=_views, help="Augmented views (repeatable; hflip): extract stores the training images' "
                                       "vectors of each view; fit adds them as training rows.")]
Tta = Annotated[bool, typer.Option("--tta", help="With --augment: the test images' views too (extract), and test "
                                                 "scores averaged over each image and its views (fit).")]


def _fit_pool(value: str) -> str:
    from .views import check

    return check(value)


FitPool = Annotated[str, typer.Option("--pool", callback=_fit_pool, help=(
    "flatten | avg | max (stored), or a view of a stored flattened map made at fit time, without the "
    "network: max2x2 | avg2x2 | gridN (adaptive max pooling to N x N)."))]


@dataclass(frozen=True)
class Group:
    """Options that together fill one value object: name -> (annotation, default), and the builder."""
    fields: dict[str, tuple[Any, Any]]
    build: Callable[[dict], Any]


def _data(v: dict):
    from .datasets import DataOptions

    return DataOptions(v["data"], v["data_dir"], v["test_size"], v["seed"], v["max_train"], v["max_test"])


def _features(v: dict):
    from .extract import FeatureSpec

    return FeatureSpec(v["model"], v["weights"], tuple(v.get("layer") or ()), v["pool"], v.get("size"),
                       v["resize"], v["preprocess"], v["seed"], v["precision"])


def _run(v: dict):
    """settings.RunSettings from the run options; `--executor ray` adds where and how wide."""
    from .settings import default_cache_dir, default_engine
    from .settings import RunSettings

    cluster = None
    if v.get("executor", "local") == "ray":
        from .cluster import ClusterSettings

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
# fit may also pool at fit time: views of a stored flattened map (featurecache/views.py).
FIT_FEATURES = Group({**FEATURES.fields, "pool": (FitPool, "flatten")}, _features)
# sweep names its own taps (--layers) and sizes (--sizes): the same feature options less those two.
SWEEP_FEATURES = Group({k: v for k, v in FEATURES.fields.items() if k not in ("layer", "size")}, _features)
RUN = Group({"cache_dir": (CacheDir, None), "engine": (Engine, None), "batch_size": (BatchSize, 64),
             "on_error": (OnError, "fail"), "quiet": (Quiet, False), "recompute_stale": (RecomputeStale, False)},
            _run)
# extract and plan also choose where the network runs; fit --extract and sweep run it here.
EXTRACT_RUN = Group({**RUN.fields, "executor": (Executor, "local"), "ray_address": (RayAddress, None),
                     "workers": (Workers, None), "threads_per_worker": (ThreadsPerWorker, 1)}, _run)


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
