"""Name what is in an image: ImageNet-1k top-k with the offline EfficientNet-Lite0 weights."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FeatureCacheError
from .imagenet_classes import IMAGENET_CLASSES

SIZE = 224  # the resolution the weights were trained at
BATCH = 32


# Keras is imported on first use, so importing this module stays cheap.
@functools.lru_cache(maxsize=1)
def _model():
    from .backbones.efficientnet_lite import default_weights_path, efficientnet_lite0

    return efficientnet_lite0((SIZE, SIZE, 3), include_top=True, weights=default_weights_path())


def _load(item, index: int) -> Image.Image:
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise FeatureCacheError(f"image {index}: array of {item.dtype} {item.shape}; pass uint8 "
                                    f"(H, W) or (H, W, 3|4) pixels, e.g. via skimage.util.img_as_ubyte")
        return Image.fromarray(item)
    path = Path(os.fspath(item))
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise FeatureCacheError(f"{path}: no such file; check the path") from None
    except (UnidentifiedImageError, OSError) as e:
        raise FeatureCacheError(f"{path}: not a readable image ({e}); pass a JPEG, PNG or other "
                                f"Pillow-readable file") from None


def _pixels(item, index: int) -> np.ndarray:
    image = _load(item, index).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def classify(paths_or_arrays, top: int = 5) -> list[list[tuple[int, str, float]]]:
    """Per image, the `top` most likely ImageNet classes as (index, label, probability), best first.

    Items are file paths or uint8 pixel arrays (grey, RGB or RGBA); a single path or array also works.
    """
    if not 1 <= top <= len(IMAGENET_CLASSES):
        raise FeatureCacheError(f"top={top}: must be between 1 and {len(IMAGENET_CLASSES)}")
    single = isinstance(paths_or_arrays, (str, os.PathLike)) or (
        isinstance(paths_or_arrays, np.ndarray) and paths_or_arrays.ndim < 4)
    items = [paths_or_arrays] if single else list(paths_or_arrays)
    if not items:
        return []
    from .backbones.efficientnet_lite import preprocess_input

    pixels = np.stack([_pixels(item, i) for i, item in enumerate(items)])
    probs = _model().predict(preprocess_input(pixels), batch_size=BATCH, verbose=0)
    best = np.argsort(-probs, axis=1, kind="stable")[:, :top]
    return [[(int(i), IMAGENET_CLASSES[i], float(p[i])) for i in row] for p, row in zip(probs, best)]
