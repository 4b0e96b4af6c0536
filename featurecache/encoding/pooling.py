"""Pooling: how a tap's (H, W, C) map becomes a vector, each pooling declared once with both its forms.

Extraction stores `flatten` (the whole map, in Keras' NHWC order, as one row), `avg` or `max` (global).
Every cheaper vector of a stored flattened map is a view of the row, made at fit time without the
network: global `avg`/`max`, 2x2 windows (`max2x2`, `avg2x2`: stride 2, odd edges dropped as Keras'
`MaxPooling2D` drops them), or `gridN`, adaptive max pooling to an N x N grid (the spatial-pyramid level
of He et al. 2014, which works at any input size; bins as in PyTorch's adaptive pooling). So an
experiment on a pooling costs a read of the cache.

Each pooling is one `_Rule` in `_RULES`: its output dims, its numpy form on NHWC maps (the encoder pools
the network's maps with it; a fit-time view runs it on stored rows reshaped to maps) and its ONNX form
(the nodes `featurecache export` writes after the backbone). A new pooling is one new rule here, and
tests/export/test_export.py holds every rule's two forms to the same numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import FeatureCacheError

STORED = ("flatten", "avg", "max")  # what extraction stores; every other rule is a view of a stored `flatten`
_GRID = re.compile(r"^grid([1-9][0-9]?)$")
CHUNK = 4096  # rows per step of a view: bounds its temporaries to a few hundred MB


# ---- the rules: dims, numpy form on (N, H, W, C) maps, ONNX form on the NHWC map `src` ----------------------
# A numpy form returns (N, ...) in (row, column, channel) order; an ONNX form returns the name of a tensor
# of the same values and order; both are flattened to (N, D) by the caller (`Pooling.maps`, `Pooling.onnx`).

def _windows(maps: np.ndarray, reduce) -> np.ndarray:
    """2x2 windows, stride 2, odd edges dropped (floor), as Keras' 2x2 pooling layers."""
    n, h, w, c = maps.shape
    return reduce(maps[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c), (2, 4))


def _grid(maps: np.ndarray, g: int) -> np.ndarray:
    _, h, w, _ = maps.shape
    return np.stack([np.stack([maps[:, r0:r1, c0:c1].max(axis=(1, 2)) for c0, c1 in bins(w, g)], axis=1)
                     for r0, r1 in bins(h, g)], axis=1)


def _onnx_windows(op: str) -> Callable:
    def write(g: _Glue, src: str, shape: tuple, n: int) -> str:
        # ONNX pools NCHW: around the pool, two transposes keep the map (and so the row order) NHWC
        nchw = g.node("Transpose", [src], "nchw", perm=[0, 3, 1, 2])
        win = g.node(op, [nchw], "win", kernel_shape=[2, 2], strides=[2, 2])  # no padding: odd edges dropped
        return g.node("Transpose", [win], "nhwc", perm=[0, 2, 3, 1])
    return write


def _onnx_grid(g: _Glue, src: str, shape: tuple, n: int) -> str:
    """Max over PyTorch's adaptive bins: a box's max is the max over its rows of the max over its columns."""
    for axis, size in ((1, shape[0]), (2, shape[1])):
        cells = []
        for j, (lo, hi) in enumerate(bins(size, n)):
            cut = g.node("Slice", [src, g.const(f"ax{axis}/{j}/lo", [lo]), g.const(f"ax{axis}/{j}/hi", [hi]),
                                   g.const(f"ax{axis}/{j}/axis", [axis])], f"ax{axis}/{j}/cut")
            cells.append(g.node("ReduceMax", [cut], f"ax{axis}/{j}/max", axes=[axis], keepdims=1))
        src = g.node("Concat", cells, f"ax{axis}", axis=axis)
    return src


@dataclass(frozen=True)
class _Rule:
    dims: Callable[[int, int, int, int], int]  # (h, w, c, n) -> output dims
    numpy: Callable[[np.ndarray, int], np.ndarray]  # ((N, H, W, C) float32 maps, n) -> (N, ...)
    onnx: Callable  # (_Glue, NHWC map name, (H, W, C), n) -> name of the pooled tensor
    min_side: int = 1  # the smallest map side it pools


_RULES: dict[str, _Rule] = {
    "flatten": _Rule(lambda h, w, c, n: h * w * c, lambda m, n: m, lambda g, src, shape, n: src),
    # axes: an attribute of ReduceMean/ReduceMax up to opset 17
    "avg": _Rule(lambda h, w, c, n: c, lambda m, n: m.mean(axis=(1, 2), dtype=np.float32),
                 lambda g, src, shape, n: g.node("ReduceMean", [src], "avg", axes=[1, 2], keepdims=0)),
    "max": _Rule(lambda h, w, c, n: c, lambda m, n: m.max(axis=(1, 2)),
                 lambda g, src, shape, n: g.node("ReduceMax", [src], "max", axes=[1, 2], keepdims=0)),
    "max2x2": _Rule(lambda h, w, c, n: (h // 2) * (w // 2) * c,
                    lambda m, n: _windows(m, lambda x, ax: x.max(axis=ax)), _onnx_windows("MaxPool"), 2),
    "avg2x2": _Rule(lambda h, w, c, n: (h // 2) * (w // 2) * c,
                    lambda m, n: _windows(m, lambda x, ax: x.mean(axis=ax, dtype=np.float32)),
                    _onnx_windows("AveragePool"), 2),
    "grid": _Rule(lambda h, w, c, n: n * n * c, _grid, _onnx_grid),  # gridN
}


# The choice lists the options show (options.py takes them from here): the rules, gridN spelled as a family.
VIEWS = tuple("gridN" if k == "grid" else k for k in _RULES if k not in STORED)  # max2x2, avg2x2, gridN (N: 1..99)
STORED_HELP = " | ".join(STORED)
HELP = (f"{STORED_HELP} (stored), or a view of a stored flattened map made at fit time, without the network: "
        f"{' | '.join(VIEWS)} (adaptive max pooling to N x N)")


def bins(size: int, n: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling bins: [floor(i*size/n), ceil((i+1)*size/n))."""
    return [(i * size // n, -(-(i + 1) * size // n)) for i in range(n)]


# ---- the value ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pooling:
    """One pooling, checked: `Pooling.parse("max2x2")`. `stored` is the pooling extraction stores for it."""
    name: str

    def __post_init__(self):
        if not (self.name in _RULES and self.name != "grid" or _GRID.match(self.name)):
            raise FeatureCacheError(f"--pool {self.name}: unknown; use {', '.join(STORED)} (stored), or a view of a "
                                    f"stored flattened map: {', '.join(VIEWS)} (e.g. grid2)")

    @classmethod
    def parse(cls, text) -> Pooling:
        return text if isinstance(text, Pooling) else cls(str(text))

    @classmethod
    def every(cls, grids: tuple[int, ...] = (1, 2, 3)) -> list[Pooling]:
        """Every declared pooling (gridN for each of `grids`): what the parity tests iterate over."""
        return [cls(k) for k in _RULES if k != "grid"] + [cls(f"grid{n}") for n in grids]

    def __str__(self) -> str:
        return self.name

    @property
    def is_view(self) -> bool:
        return self.name not in STORED

    @property
    def stored(self) -> str:
        """The stored pooling this one is made from ('flatten' for every view)."""
        return "flatten" if self.is_view else self.name

    def derivable_from(self, stored: str) -> bool:
        """Whether a set stored with `stored` pooling yields this one without the network."""
        return stored == self.name or (stored == "flatten" and self.name != "flatten")

    @property
    def _rule(self) -> tuple[_Rule, int]:
        grid = _GRID.match(self.name)
        return (_RULES["grid"], int(grid.group(1))) if grid else (_RULES[self.name], 0)

    def _hwc(self, shape: tuple) -> tuple[int, int, int] | None:
        """(H, W, C) of a map; None for a vector tap (it passes through every stored pooling)."""
        if len(shape) == 3:
            return int(shape[0]), int(shape[1]), int(shape[2])
        if self.is_view:
            raise FeatureCacheError(f"--pool {self.name}: this tap is a vector, not a map; use flatten")
        return None

    def dims(self, shape: tuple) -> int:
        """The length of the vector of a tap whose output for one image has `shape` ((H, W, C) or (C,))."""
        hwc = self._hwc(shape)
        if hwc is None:
            return int(np.prod(shape))
        rule, n = self._rule
        return rule.dims(*hwc, n)

    def _check_side(self, h: int, w: int) -> None:
        if min(h, w) < self._rule[0].min_side:
            raise FeatureCacheError(f"--pool {self.name}: the map is {h}x{w}, too small for 2x2 windows; "
                                    "use avg or max")

    # ---- the numpy form -------------------------------------------------------------------------------
    def maps(self, maps: np.ndarray) -> np.ndarray:
        """(N, H, W, C) maps -> (N, D) float32; (N, C) vectors pass through."""
        if maps.ndim == 2:
            self._hwc(maps.shape[1:])
            return maps.astype(np.float32, copy=False)
        rule, n = self._rule
        self._check_side(*maps.shape[1:3])
        return rule.numpy(maps, n).reshape(len(maps), -1).astype(np.float32, copy=False)

    def rows(self, x: np.ndarray, shape: tuple) -> np.ndarray:
        """Stored flattened rows (N, H*W*C) -> this pooling's rows (N, D) float32, in chunks of rows."""
        if self.name == "flatten":
            return x
        hwc = self._hwc(shape) or (1, 1, int(shape[-1]))
        if x.shape[1] != int(np.prod(hwc)):
            h, w, c = hwc
            raise FeatureCacheError(f"--pool {self.name}: the stored rows have {x.shape[1]} values, not the "
                                    f"{h}x{w}x{c} map this tap has at this size; the set is not a flattened map")
        self._check_side(*hwc[:2])
        out = np.empty((len(x), self.dims(shape)), np.float32)
        for lo in range(0, len(x), CHUNK):
            out[lo:lo + CHUNK] = self.maps(np.asarray(x[lo:lo + CHUNK], np.float32).reshape(-1, *hwc))
        return out

    # ---- the ONNX form --------------------------------------------------------------------------------
    def onnx(self, nodes: list, inits: list, prefix: str, src: str, shape: tuple, out: str) -> int:
        """Append to `nodes`/`inits` the nodes pooling NHWC map `src` (one image: `shape`) into `out` (N, D),
        their names under `prefix`; returns D. The flatten keeps NHWC order, so rows match `maps`."""
        g = _Glue(prefix, nodes, inits)
        hwc = self._hwc(shape)
        if hwc is not None:
            rule, n = self._rule
            self._check_side(*hwc[:2])
            src = rule.onnx(g, src, hwc, n)
        g.node("Reshape", [src, g.const("shape", [0, -1])], out, named=False)
        return self.dims(shape)


@dataclass
class _Glue:
    """Where an ONNX form writes: nodes and initialisers named under `prefix`."""
    prefix: str
    nodes: list
    inits: list

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        full = f"{self.prefix}/{name}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.int64), full))
        return full

    def node(self, op: str, inputs: list, name: str, named: bool = True, **attrs) -> str:
        from onnx import helper

        out = f"{self.prefix}/{name}" if named else name
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out


def check_stored(text: str) -> str:
    """A pooling extraction stores (`--pool` of extract): one line for a view or an unknown name."""
    pool = Pooling.parse(text)
    if pool.is_view:
        raise FeatureCacheError(f"--pool {pool}: a view of a stored flattened map, made at fit time; extraction "
                                f"stores {', '.join(STORED)} (store the map with --pool flatten, then fit with "
                                f"--pool {pool})")
    return pool.name
