"""Views of stored feature maps: pooling done at fit time, on cached vectors, with no network.

A tap stored with `--pool flatten` keeps its whole (H, W, C) map, in Keras' NHWC order, as one row.
Every cheaper vector of that tap is a view of the row: global `avg`/`max`, 2x2 windows (`max2x2`,
`avg2x2`, stride 2, odd edges dropped as Keras' `MaxPooling2D` drops them), or `gridN`, adaptive max
pooling to an N x N grid (the spatial-pyramid level of He et al. 2014, which works at any input size;
bins as in PyTorch's adaptive pooling). So an experiment on a pooling costs a read of the cache.
"""

from __future__ import annotations

import re

import numpy as np

from .errors import FeatureCacheError

STORED = ("flatten", "avg", "max")  # what extraction stores
WINDOWS = ("max2x2", "avg2x2")
_GRID = re.compile(r"^grid([1-9][0-9]?)$")
CHUNK = 4096  # rows per step: bounds the temporaries of a view to a few hundred MB


def is_view(pool: str) -> bool:
    return pool in WINDOWS or bool(_GRID.match(pool))


def check(pool: str) -> str:
    if pool in STORED or is_view(pool):
        return pool
    raise FeatureCacheError(f"--pool {pool}: unknown; use flatten, avg or max (stored), or a view of a stored "
                            "flattened map: max2x2, avg2x2, gridN (e.g. grid2)")


def source_pool(pool: str) -> str:
    """The stored pooling a fit-time pooling is derived from ('flatten' for every view)."""
    return "flatten" if is_view(pool) else pool


def derivable(stored: str, pool: str) -> bool:
    """Whether a set stored with `stored` pooling yields `pool` without the network."""
    return stored == pool or (stored == "flatten" and (pool in ("avg", "max") or is_view(pool)))


def dims(shape: tuple[int, ...], pool: str) -> int:
    h, w, c = _hwc(shape, pool)
    if pool == "flatten":
        return h * w * c
    if pool in ("avg", "max"):
        return c
    if pool in WINDOWS:
        return (h // 2) * (w // 2) * c
    n = int(_GRID.match(pool).group(1))
    return n * n * c


def apply(x: np.ndarray, shape: tuple[int, ...], pool: str) -> np.ndarray:
    """Rows of flattened (H, W, C) maps -> rows of the `pool` view, float32, in chunks of rows."""
    if pool == "flatten":
        return x
    h, w, c = _hwc(shape, pool)
    if x.shape[1] != h * w * c:
        raise FeatureCacheError(f"--pool {pool}: the stored rows have {x.shape[1]} values, not the "
                                f"{h}x{w}x{c} map this tap has at this size; the set is not a flattened map")
    out = np.empty((len(x), dims(shape, pool)), np.float32)
    for lo in range(0, len(x), CHUNK):
        maps = np.asarray(x[lo:lo + CHUNK], np.float32).reshape(-1, h, w, c)
        out[lo:lo + CHUNK] = _pool(maps, pool).reshape(len(maps), -1)
    return out


def _pool(maps: np.ndarray, pool: str) -> np.ndarray:
    n, h, w, c = maps.shape
    if pool == "avg":
        return maps.mean(axis=(1, 2), dtype=np.float32)
    if pool == "max":
        return maps.max(axis=(1, 2))
    if pool in WINDOWS:
        if h < 2 or w < 2:
            raise FeatureCacheError(f"--pool {pool}: the map is {h}x{w}, too small for 2x2 windows; use avg or max")
        cut = maps[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
        return cut.max(axis=(2, 4)) if pool == "max2x2" else cut.mean(axis=(2, 4), dtype=np.float32)
    g = int(_GRID.match(pool).group(1))
    rows, cols = bins(h, g), bins(w, g)
    return np.stack([np.stack([maps[:, r0:r1, c0:c1].max(axis=(1, 2)) for c0, c1 in cols], axis=1)
                     for r0, r1 in rows], axis=1)


def bins(size: int, n: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling bins: [floor(i*size/n), ceil((i+1)*size/n))."""
    return [(i * size // n, -(-(i + 1) * size // n)) for i in range(n)]


def _hwc(shape: tuple[int, ...], pool: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        if pool in ("flatten", "avg", "max"):
            return 1, 1, int(shape[-1])
        raise FeatureCacheError(f"--pool {pool}: this tap is a vector, not a map; use flatten")
    return int(shape[0]), int(shape[1]), int(shape[2])
