"""Checking a feature set's files: what `featurecache cache verify` reports."""

from __future__ import annotations

import json

import h5py
import numpy as np

from .fingerprint import key_id
from .store import FeatureSet


def verify_set(fs: FeatureSet) -> list[str]:
    """Problems found in `fs` (empty when healthy): metadata, key, every part's structure, duplicates."""
    problems = []
    try:
        meta = json.loads((fs.folder / "meta.json").read_text())
        if key_id(meta["key"]) != fs.id:
            problems.append(f"meta.json key hashes to {key_id(meta['key'])}, not the folder's id")
        dims = int(meta["dims"])
    except (OSError, ValueError, KeyError) as e:
        return [f"meta.json unreadable ({e})"]
    seen: set[str] = set()
    duplicates = 0
    for path in fs.part_files():
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("set_id") != fs.id:
                    problems.append(f"{path.name}: belongs to set {f.attrs.get('set_id')!r}")
                    continue
                ids, feats = f["ids"], f["features"]
                if feats.ndim != 2 or feats.shape[1] != dims or len(ids) != feats.shape[0]:
                    problems.append(f"{path.name}: shape {feats.shape} for {len(ids)} ids, expected (N, {dims})")
                    continue
                block = feats[()]
                if not np.isfinite(block).all():
                    problems.append(f"{path.name}: non-finite values")
                for i in ids[()].astype("U32"):
                    duplicates += i in seen
                    seen.add(i)
        except (OSError, KeyError) as e:
            problems.append(f"{path.name}: unreadable ({str(e).splitlines()[0][:80]})")
    if duplicates:
        problems.append(f"{duplicates} duplicated image ids across parts")
    return problems
