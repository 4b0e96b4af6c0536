"""Augmented views of images: a view is a fixed transformation of the decoded, resized pixels whose
vectors are stored as a feature set of their own (the view is part of the key), under the same image
ids. A fit adds them as extra training rows (`fit --augment hflip`); with `--tta` a test image's
scores are averaged over its views. Fixed transformations, not random ones, so a view's vectors are
as reproducible and cacheable as the original's.
"""

from __future__ import annotations

import numpy as np

from ..errors import FeatureCacheError

VIEWS = {
    "hflip": lambda rgb: rgb[:, ::-1],  # mirror left-right: a shirt is a shirt either way
}


def check(views: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    for v in views:
        if v not in VIEWS:
            raise FeatureCacheError(f"--augment {v}: unknown view; use one of {', '.join(VIEWS)}")
    return tuple(dict.fromkeys(views))


def apply(rgb: np.ndarray, view: str) -> np.ndarray:
    """One image (H, W, 3) as seen in `view` ("" is the image itself)."""
    return rgb if not view else np.ascontiguousarray(VIEWS[view](rgb))
