"""Cache keys: everything that changes a feature vector, and nothing that does not.

In the manner of Hugging Face datasets' fingerprints: the key parts are a small dict hashed in a
canonical JSON form. Batch size, thread counts, engine and file order are deliberately absent: they
do not change the vectors. Bump FORMAT when the meaning of stored vectors changes.
"""

from __future__ import annotations

import hashlib
import json

from . import versions

FORMAT = 1


def feature_key(model: str, weights_id: str, layer: str, pool: str, size: int, resize: str,
                preprocess: str, dtype: str = "float32", precision: str = "fp32", view: str = "") -> dict:
    """`view`: an augmented view (featurecache/data/augment.py); absent from the key of the images themselves,
    so sets made before views existed keep their ids."""
    parts = {
        "format": FORMAT,
        "model": model,
        "weights": weights_id,
        "layer": layer,
        "pool": pool,
        "size": int(size),
        "resize": resize,
        "preprocess": preprocess,
        "dtype": dtype,
        "precision": precision,
        # Kernels and decoders that can move the numbers between releases.
        "libraries": versions.library_versions("tensorflow", "keras", "pillow"),
    }
    return parts | {"view": view} if view else parts


def key_id(parts: dict, spacing: bool = False) -> str:
    """16 hex digits naming a cache folder (a feature set, a converted graph); equal parts give equal
    ids on every machine. The one hasher of cache folders. `spacing`: JSON's default ", " and ": "
    separators, with which converted-graph folders were first named (kept so cached graphs, int8 ones
    calibrated on images no longer at hand, stay found)."""
    separators = (", ", ": ") if spacing else (",", ":")
    canonical = json.dumps(parts, sort_keys=True, separators=separators)
    return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()
