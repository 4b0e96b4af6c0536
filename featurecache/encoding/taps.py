"""Layer taps: which intermediate outputs of a backbone can become feature vectors.

A `Tap` describes one tappable layer at one input size (name, output shape, channels, reduction),
in the manner of timm's FeatureInfo. Pooling (featurecache/encoding/pooling.py) turns a tap's (H, W, C) map into a vector.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import versions
from ..backbones import Backbone
from ..errors import FeatureCacheError
from .pooling import Pooling


@dataclass(frozen=True)
class Tap:
    name: str
    shape: tuple[int, ...]  # output shape for one image, e.g. (2, 2, 512)
    reduction: int  # input size / output height (1 for vectors)

    @property
    def channels(self) -> int:
        return self.shape[-1]

    def dims(self, pool: str) -> int:
        return Pooling.parse(pool).dims(self.shape)


def taps_of(model, size: int) -> list[Tap]:
    """Every layer with one (H, W, C) or (C,) output, in graph order."""
    out = []
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        shape = getattr(layer, "output", None)
        shape = tuple(getattr(shape, "shape", ()) or ())[1:]
        if len(shape) in (1, 3) and all(isinstance(d, int) and d > 0 for d in shape):
            out.append(Tap(layer.name, shape, size // shape[0] if len(shape) == 3 else 1))
    return out


# Raised when a backbone's layers change, so a memo written before is rebuilt once rather than hiding the
# new taps (2: efficientnet_lite0 keeps its classifier, the `predictions` tap that classify reads).
CATALOGUE_REVISION = 2


def _memo_path(backbone: Backbone, size: int, cache_dir: Path) -> Path:
    return cache_dir / "taps" / f"{backbone.name}-{size}-keras{versions.version('keras')}-r{CATALOGUE_REVISION}.json"


def remember(backbone: Backbone, size: int, cache_dir: Path, taps: list[Tap]) -> None:
    memo = _memo_path(backbone, size, cache_dir)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps([asdict(t) for t in taps]))
    os.replace(tmp, memo)


def known(backbone: Backbone, size: int, cache_dir: Path | None) -> list[Tap] | None:
    """The memoized taps of `backbone` at `size`, or None when this cache has not seen them yet."""
    memo = _memo_path(backbone, size, cache_dir) if cache_dir else None
    if memo and memo.is_file():
        try:
            return [Tap(t["name"], tuple(t["shape"]), t["reduction"]) for t in json.loads(memo.read_text())]
        except (OSError, ValueError, KeyError):
            return None  # rebuilt by the caller
    return None


def catalogue(backbone: Backbone, size: int, cache_dir: Path | None) -> list[Tap]:
    """The taps of `backbone` at `size`, memoized on disk: they depend on architecture, not weights."""
    backbone.check_size(size)
    taps = known(backbone, size, cache_dir)
    if taps is not None:
        return taps
    from ..backbones.build import build_model
    from ..backbones.weights import Weights

    taps = taps_of(build_model(backbone, Weights("random", "catalogue"), size), size)
    if cache_dir:
        remember(backbone, size, cache_dir, taps)
    return taps


def default_layer(backbone: Backbone, size: int, cache_dir: Path | None) -> str:
    return backbone.default_layer or catalogue(backbone, size, cache_dir)[-1].name


def check_layers(backbone: Backbone, names: list[str], taps: list[Tap]) -> list[Tap]:
    by_name = {t.name: t for t in taps}
    for n in names:
        if n not in by_name:
            close = difflib.get_close_matches(n, by_name, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise FeatureCacheError(f"--layer {n}: {backbone.name} has no such layer; {hint}"
                                    f"list them with `featurecache layers --model {backbone.name}`")
    return [by_name[n] for n in names]
