"""Settings as values: what shapes a vector (`FeatureSpec`, made concrete by `resolve`) and how a run
goes (`RunSettings`), each passed as one frozen value rather than as loose arguments.

Nothing here imports TensorFlow: resolving a spec, naming its feature sets and checking the options
are what a cache hit needs, and a cache hit must stay cheap. Every feature set is named by one key
function, `fingerprint.key_id`, applied to `Resolved.key(layer)`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .encoding import images as imagelib
from .backbones import Backbone, get_backbone
from .backbones.weights import Weights, resolve_weights
from .errors import FeatureCacheError
from .fingerprint import feature_key, key_id
from .encoding.preprocessing import preprocess_mode

# Choice lists, declared once: the CLI's options (featurecache/cli/options.py) and so `featurecache.toml`'s
# checks (config.py asks the options) take them from here; the engines' is engines.ENGINES.
RESIZES = imagelib.RESIZES  # auto | nearest | bilinear
ON_ERROR = ("fail", "skip")  # unreadable images
EXECUTORS = ("local", "ray")  # where batches are encoded (featurecache/extraction/cluster.py for ray)
PRECISIONS = ("float32", "bf16", "int8")
INT8_ENGINE = "openvino"  # nncf's post-training quantisation targets OpenVINO's int8 kernels
BF16_ENGINE = "openvino"  # its CPU plugin runs bf16 through oneDNN's AVX512_BF16/AMX kernels


@dataclass(frozen=True)
class Precision:
    """The numeric precision of a feature set, with one spelling in keys: `key()` writes it, `parse()`
    reads it back. float32 keeps the historic "fp32" so existing sets stay valid; int8 names its
    engine and calibration sample, both of which move the vectors; bf16 (arithmetic in bfloat16,
    weights and outputs float32) names its engine, whose kernels round it."""
    name: str = "float32"  # one of PRECISIONS
    calibration: str = ""  # int8: id of the training-image sample it was calibrated on

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise FeatureCacheError(f"--precision {self.name}: unknown; use one of {', '.join(PRECISIONS)}")

    @property
    def int8(self) -> bool:
        return self.name == "int8"

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def reference_engine(self) -> str:
        """The engine a set of this precision is recomputed on to check its stored rows (cache verify, the
        first use under new library versions): float32 on TensorFlow, the reference every engine is held to;
        int8 and bf16 on the one engine that makes them, which `auto` picks (the cached int8 graph reproduces
        its set; bf16's rounding is that engine's kernels'). Never a run's --engine, which need not be one."""
        return "tensorflow" if self.name == "float32" else "auto"

    def key(self) -> str:
        if self.bf16:
            return f"bf16-{BF16_ENGINE}"
        return "fp32" if self.name == "float32" else f"int8-{INT8_ENGINE}-{self.calibration}"

    @classmethod
    def parse(cls, text: str) -> Precision:
        """A precision from an option (float32, bf16, int8) or a key (fp32, bf16-openvino, int8-openvino-<sample>)."""
        if text in ("float32", "fp32"):
            return cls()
        if text in ("bf16", f"bf16-{BF16_ENGINE}"):
            return cls("bf16")
        if text == "int8":
            return cls("int8")
        prefix = f"int8-{INT8_ENGINE}-"
        if text.startswith(prefix):
            return cls("int8", text[len(prefix):])
        raise FeatureCacheError(f"--precision {text}: unknown; use one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class FeatureSpec:
    """The feature settings: the options that shape vectors (one spec may name several taps)."""
    model: str
    weights: str = "imagenet"
    layers: tuple[str, ...] = ()
    pool: str = "flatten"
    size: int | None = None
    resize: str = "auto"  # nearest upsizing, antialiased downsizing (images.resize_filter); sets keyed "auto"
    preprocess: str = "auto"
    seed: int = 0  # of random weights
    precision: str = "float32"  # one of PRECISIONS, each a feature set of its own; `resolve` makes it a Precision
    calibration: str = ""  # int8 only: id of the training-image sample it was calibrated on (`calibrated`)
    view: str = ""  # an augmented view of the images (featurecache/data/augment.py): a set of its own


@dataclass(frozen=True)
class RunSettings:
    """How a run goes, never what it computes: none of these changes a vector or a key."""
    cache_dir: Path
    # an engine.ENGINE_CHOICES name; default: $FEATURECACHE_ENGINE, else auto (the fastest installed)
    engine: str = field(default_factory=lambda: default_engine())
    batch_size: int = 64
    progress: bool = True
    on_error: str = "fail"  # unreadable images: fail (checked before any network work) | skip
    log: object = field(default=None, compare=False, repr=False)  # callable(str); None: stderr
    executor: str = "local"  # one of EXECUTORS: where batches are encoded
    cluster: object = None  # executor "ray": cluster.ClusterSettings (None: a local Ray for the run)
    recompute_stale: bool = False  # a set stale under new library versions: recompute it (featurecache/store/upgrades.py)

    def __post_init__(self):
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.batch_size < 1:
            raise FeatureCacheError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.on_error not in ON_ERROR:
            raise FeatureCacheError(f"--on-error {self.on_error}: use {' or '.join(ON_ERROR)}")
        if self.executor not in EXECUTORS:
            raise FeatureCacheError(f"--executor {self.executor}: use one of {', '.join(EXECUTORS)}")

    def say(self, msg: str) -> None:
        (self.log or _stderr)(msg)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# How an int8 graph is made (engines/int8.py reads it): everything here moves int8 vectors, so its id
# enters every int8 key through the calibration name, "<recipe id>-<sample id>" (`calibration_sample`).
# Calibration names without a recipe id are the first recipe's (nncf on OpenVINO IR), read but no longer made.
INT8_RECIPE = {
    "format": "onnx-qdq",  # nncf's ONNX backend: one QuantizeLinear/DequantizeLinear graph that OpenVINO runs
    # with its int8 kernels and that `featurecache export` can embed as it is
    "samples": 300,  # nncf's default subset size
    "preset": "performance",  # symmetric activations, symmetric per-channel weights
    "fast_bias_correction": True,
}


def int8_recipe_id() -> str:
    return key_id(INT8_RECIPE)[:6]


def is_current(calibration: str) -> bool:
    """Whether an int8 calibration name carries a recipe id ("<recipe>-<sample>", `calibration_sample`),
    rather than naming the first recipe's OpenVINO IR (a bare sample id)."""
    return "-" in calibration


def calibration_sample(train_ids: list[str]) -> tuple[list[str], str]:
    """(chosen image ids, calibration name "<recipe id>-<sample id>"): a seeded choice among the training
    images' content hashes, independent of file order, so the same training set always gives the same int8 set."""
    import hashlib

    import numpy as np

    unique = sorted(set(train_ids))
    order = np.random.default_rng(0).permutation(len(unique))[:INT8_RECIPE["samples"]]
    chosen = sorted(unique[k] for k in order)
    return chosen, f"{int8_recipe_id()}-" + hashlib.blake2b("\n".join(chosen).encode(), digest_size=6).hexdigest()


def calibrated(spec: FeatureSpec, train_ids: list[str]) -> FeatureSpec:
    """`spec` with its int8 calibration sample named (drawn from `train_ids`); float32 specs unchanged."""
    if not Precision(spec.precision).int8 or spec.calibration:
        return spec
    if not train_ids:
        raise FeatureCacheError("--precision int8: no training images to calibrate on; use --precision float32")
    return replace(spec, calibration=calibration_sample(train_ids)[1])


@dataclass(frozen=True)
class Resolved:
    """A spec made concrete for one dataset: size, layer names, precision, keys and set ids.

    Frozen, and its dicts are never changed in place: a set standing in for a missing one
    (`upgrades.adopt`) or dropped again (`upgrades.drop`) gives a new value (`with_sets`)."""
    backbone: Backbone
    weights: Weights
    size: int
    preprocess_mode: str
    pool: str
    resize: str
    layers: tuple[str, ...]
    precision: Precision
    spec: FeatureSpec  # the spec with size, layers and resize pinned: rebuilds this anywhere
    notices: tuple[str, ...] = ()
    keys: dict[str, dict] = field(default_factory=dict)  # layer -> key of the set read and written
    set_ids: dict[str, str] = field(default_factory=dict)  # layer -> that set's id

    def key(self, layer: str) -> dict:
        """The key parts of `layer`'s feature set under the running library versions: everything that
        changes its vectors."""
        return feature_key(self.backbone.name, self.weights.id, layer, self.pool, self.size, self.resize,
                           self.preprocess_mode, precision=self.precision.key(), view=self.spec.view)

    def with_sets(self, keys: dict[str, dict]) -> Resolved:
        """This value reading and writing the sets of `keys` (layer -> key); ids follow from the keys."""
        keys = {**self.keys, **keys}
        return replace(self, keys=keys, set_ids={layer: key_id(k) for layer, k in keys.items()})


def input_size(backbone: Backbone, size: int | None, native_size: int | None) -> int:
    """The side images are read at (the size rule): --size when given, else the images' own side raised to
    the model's minimum, or the model's default size when the images have no one size (`native_size` None)."""
    if size is not None:
        return size
    if native_size is None:
        return backbone.default_size
    return max(native_size, backbone.min_size)


def resolve(spec: FeatureSpec, native_size: int | None, cache_dir: Path) -> Resolved:
    """Everything needed for a cache lookup, without importing TensorFlow."""
    from .encoding.pooling import check_stored
    from .encoding.taps import default_layer

    backbone = get_backbone(spec.model)
    check_stored(spec.pool)
    if spec.resize not in RESIZES:
        raise FeatureCacheError(f"--resize {spec.resize}: unknown; use one of {', '.join(RESIZES)}")
    precision = Precision(spec.precision, spec.calibration)
    notices = []
    size = input_size(backbone, spec.size, native_size)
    if spec.size is None and native_size is not None and native_size < size:
        notices.append(f"images are {native_size}x{native_size}, below {backbone.name}'s minimum; "
                       f"upsizing to {size}x{size} "
                       f"({imagelib.resize_filter((native_size, native_size), size, spec.resize)}); set --size to choose")
    backbone.check_size(size)
    mode = preprocess_mode(backbone, spec.preprocess)
    weights = resolve_weights(backbone, spec.weights, spec.seed, cache_dir)
    layers = list(dict.fromkeys(spec.layers)) or [default_layer(backbone, size, cache_dir)]
    if precision.int8 and not precision.calibration:
        raise FeatureCacheError("--precision int8: no calibration sample named; pass the spec through "
                                "featurecache.settings.calibrated(spec, train_ids) first")
    # `auto` is a rule, not a filter: where every image has the same size the rule picks one filter for
    # all of them, and the set is keyed by that filter, since its vectors are exactly that filter's (so
    # sets made with `nearest` before `auto` became the default stay cache hits when upsizing).
    resize = imagelib.resize_filter((native_size, native_size), size, spec.resize) if native_size else spec.resize
    pinned = replace(spec, resize=resize, size=size, layers=tuple(layers))
    res = Resolved(backbone, weights, size, mode, spec.pool, resize, tuple(layers), precision, pinned, tuple(notices))
    res = res.with_sets({layer: res.key(layer) for layer in layers})
    from .store.upgrades import adopt

    return adopt(res, cache_dir)  # a miss: a set made with other library versions, otherwise the same, stands in


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEATURECACHE_DIR", "cache"))


def default_engine() -> str:
    """--engine's default: auto (the fastest installed engine), or $FEATURECACHE_ENGINE."""
    return os.environ.get("FEATURECACHE_ENGINE", "auto")


def spec_args(spec: FeatureSpec, layer: str | None = None) -> list[str]:
    """The command-line options that reproduce `spec` (for hints and reports)."""
    out = ["--model", spec.model, "--weights", spec.weights]
    for name in ([layer] if layer else spec.layers):
        out += ["--layer", name]
    defaults = FeatureSpec(spec.model)
    for flag, attr in (("--pool", "pool"), ("--size", "size"), ("--resize", "resize"),
                       ("--preprocess", "preprocess"), ("--precision", "precision")):
        if getattr(spec, attr) != getattr(defaults, attr):
            out += [flag, str(getattr(spec, attr))]
    return out


@dataclass(frozen=True)
class HeadSpec:
    """The head side of a run: which head (featurecache/heads/registry.py) with which options, how rows
    reach it (`normalize`, `pca`), the grid searched, the augmented views added as training rows (and
    averaged over for the test scores with `tta`), the largest training matrix held in memory, and the
    note stored with the run. Checked against the head registry when built; the options are kept as
    sorted (name, value) pairs (unset ones dropped), so the value stays immutable."""
    head: str = "linsvc"
    options: tuple[tuple[str, object], ...] = ()  # or a dict: option name (heads/options.py) -> value
    normalize: str = "auto"  # heads.NORMALIZES; auto: l2 for one tap, l2-per-tap for several
    pca: int | None = None
    grid: tuple[str, ...] = ()  # "C=0.01,0.1,1": a cross-validated search on the train split
    augment: tuple[str, ...] = ()  # views of featurecache/data/augment.py
    tta: bool = False
    max_memory: int | None = None  # bytes; None: 3/4 of this machine's memory (featurecache/runs/stream.py)
    notes: str = ""

    def __post_init__(self):
        from .data import augment
        from .heads import check_head, parse_grid

        pairs = self.options.items() if isinstance(self.options, dict) else self.options
        options = tuple(sorted((name, tuple(v) if isinstance(v, list) else v) for name, v in pairs if v is not None))
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "grid", tuple(self.grid))
        object.__setattr__(self, "augment", augment.check(self.augment))
        check_head(self.head, dict(options), self.normalize, self.pca)
        parse_grid(list(self.grid))  # names and values; the pipeline's parameter names are resolved at fit time
        if self.tta and not self.augment:
            raise FeatureCacheError("--tta averages over augmented views: give --augment too (e.g. --augment hflip)")

    @property
    def option_values(self) -> dict:
        return dict(self.options)
