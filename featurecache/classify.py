"""Name what is in an image: ImageNet-1k top-k with the offline EfficientNet-Lite0 weights."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from . import images as imagelib
from .errors import FeatureCacheError
from .imagenet_classes import IMAGENET_CLASSES

SIZE = 224  # the resolution the weights were trained at
BATCH = 32


# Keras is imported on first use, so importing this module stays cheap.
@functools.lru_cache(maxsize=1)
def _model():
    from .backbones.efficientnet_lite import default_weights_path, efficientnet_lite0

    return efficientnet_lite0((SIZE, SIZE, 3), include_top=True, weights=default_weights_path())


def _pixels(item, index: int, max_pixels: int) -> np.ndarray:
    """One item as uint8 (SIZE, SIZE, 3), through the rules every image in featurecache follows
    (featurecache.images): EXIF rotation, colour modes, and the pixel-count guard checked on the
    header, before a file is decoded."""
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise FeatureCacheError(f"image {index}: array of {item.dtype} {item.shape}; pass uint8 "
                                    f"(H, W) or (H, W, 3|4) pixels, e.g. via skimage.util.img_as_ubyte")
        rgb = imagelib.array_to_rgb(item, f"image {index}")
    else:
        path = Path(os.fspath(item))
        if not path.is_file():
            raise FeatureCacheError(f"{path}: no such file; check the path")
        rgb = imagelib.load_file(path, max_pixels=max_pixels)
    return imagelib.resize(rgb, SIZE, "bilinear")


def classify(paths_or_arrays, top: int = 5, max_pixels: int = imagelib.MAX_PIXELS
             ) -> list[list[tuple[int, str, float]]]:
    """Per image, the `top` most likely ImageNet classes as (index, label, probability), best first.

    Items are file paths or uint8 pixel arrays (grey, RGB or RGBA); a single path or array also works.
    A file declaring more than `max_pixels` pixels is refused before it is decoded.
    """
    if not 1 <= top <= len(IMAGENET_CLASSES):
        raise FeatureCacheError(f"top={top}: must be between 1 and {len(IMAGENET_CLASSES)}")
    single = isinstance(paths_or_arrays, (str, os.PathLike)) or (
        isinstance(paths_or_arrays, np.ndarray) and paths_or_arrays.ndim < 4)
    items = [paths_or_arrays] if single else list(paths_or_arrays)
    if not items:
        return []
    from .backbones.efficientnet_lite import preprocess_input

    pixels = np.stack([_pixels(item, i, max_pixels) for i, item in enumerate(items)])
    probs = _model().predict(preprocess_input(pixels), batch_size=BATCH, verbose=0)
    best = np.argsort(-probs, axis=1, kind="stable")[:, :top]
    return [[(int(i), IMAGENET_CLASSES[i], float(p[i])) for i in row] for p, row in zip(probs, best)]
