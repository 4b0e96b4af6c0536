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
                preprocess: str, dtype: str = "float32", precision: str = "fp32") -> dict:
    return {
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


def key_id(parts: dict) -> str:
    """16 hex digits naming a feature set; equal parts give equal ids on every machine."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()
