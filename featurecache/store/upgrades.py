"""Keeping the cache across library upgrades.

A feature key records the TensorFlow, Keras and Pillow versions it was made with ("libraries"), so a
patch release would turn every stored set into a miss. Instead:

- `adopt` (called by `settings.resolve`): when a layer's set id has no set in the store, a stored set
  whose key differs from the wanted one ONLY in "libraries" is used in its place (its id and key), so
  extract appends to it and fit/predict/serve read it. Only a miss reads other sets' metadata.
- `check` (called where the images are at hand, `extract.run_extract`): the first use of a set made
  with other library versions recomputes a small seeded sample of its rows and compares them at the
  engines' parity tolerance. Within it, a `checked-<versions>.json` sidecar records that the set holds
  for these versions (later uses skip the check); beyond it, a `stale-<versions>.json` sidecar says which
  library moved and by how much, with a one-line notice. A stale set is recomputed afresh under the new
  id when the user consents (`--recompute-stale`) or when it is small (`SMALL_SET_ROWS`); otherwise
  its vectors keep being used, with the notice.

Nothing here imports TensorFlow, settings or the encoder (settings imports this module): the caller
passes a function that encodes images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .. import versions
from ..errors import FeatureCacheError
from ..fingerprint import key_id
from .sets import FeatureSet, FeatureStore, relative_difference, write_atomic

LIBRARIES = ("tensorflow", "keras", "pillow")  # what fingerprint.feature_key records under "libraries"
TOLERANCE = 1e-4  # of the feature scale: the engines' parity tolerance (verify.RTOL)
SAMPLE = 8  # rows recomputed on a set's first use under other versions
SMALL_SET_ROWS = 10_000  # a stale set below this is recomputed without asking
SMALL_SET_ENV = "FEATURECACHE_SMALL_SET_ROWS"


def running() -> dict[str, str]:
    return versions.library_versions(*LIBRARIES)


def small_set_rows() -> int:
    value = os.environ.get(SMALL_SET_ENV)
    return int(value) if value and value.isdigit() else SMALL_SET_ROWS


def _without_libraries(key: dict) -> dict:
    return {k: v for k, v in key.items() if k != "libraries"}


# ---- adoption (no TensorFlow, only on a miss) ----------------------------------------------------
def adopt(res, cache_dir: Path):
    """`res` (a settings.Resolved), where each layer whose set is missing reads a stored set made with
    other library versions but otherwise the same key instead (a new value; `res` itself is frozen)."""
    store = FeatureStore(cache_dir)
    candidates = None
    adopted = {}
    for layer, set_id in res.set_ids.items():
        if store.get(set_id) is not None:
            continue  # a hit (or a set of the running versions): nothing read
        if candidates is None:
            candidates = _readable_keys(store)
        want = _without_libraries(res.keys[layer])
        found = [(fs, key) for fs, key in candidates
                 if "libraries" in key and _without_libraries(key) == want and fs.id != set_id]
        if found:
            fs, key = max(found, key=lambda c: _rows(c[0]))  # the fullest, when several versions left sets
            adopted[layer] = key
    return res.with_sets(adopted) if adopted else res


def _readable_keys(store: FeatureStore) -> list[tuple[FeatureSet, dict]]:
    out = []
    for fs in store.all():
        try:
            out.append((fs, fs.key))
        except Exception:  # an unreadable meta.json is `cache verify`'s business, not a lookup's
            continue
    return out


def _rows(fs: FeatureSet) -> int:
    try:
        return len(fs)
    except Exception:
        return 0


def outdated(res) -> list[str]:
    """Layers of `res` whose set key records other library versions than the running ones (reads nothing)."""
    now = running()
    return [layer for layer in res.layers if moved(res.keys[layer].get("libraries", now), now)]


def drop(res, layer: str):
    """Undo an adoption: `res` where `layer`'s set is the one of the running versions (computed afresh)."""
    return res.with_sets({layer: res.key(layer)})


# ---- the first use under other versions ------------------------------------------------------------
def versions_id(libs: dict) -> str:
    return key_id({"libraries": libs})


def sidecar(fs: FeatureSet, kind: str, libs: dict | None = None) -> Path:
    """`<set>/checked-<versions>.json` or `<set>/stale-<versions>.json`."""
    return fs.folder / f"{kind}-{versions_id(libs or running())}.json"


def moved(recorded: dict, now: dict) -> dict[str, tuple[str, str]]:
    """library -> (recorded version, running version) for each that differs."""
    return {lib: (recorded.get(lib, "none"), now[lib]) for lib in now if recorded.get(lib, "none") != now[lib]}


def check(fs: FeatureSet, available: set[str], encode: Callable[[list[str]], dict[str, np.ndarray]],
          say: Callable[[str], None], recompute_stale: bool = False, k: int = SAMPLE, seed: int = 0) -> bool:
    """Check set `fs` if it was made with other library versions than the running ones; returns whether
    it must be recomputed afresh (stale, and the user consented or the set is small).

    `available`: image ids at hand; `encode(ids)`: {id: fresh vector} of those ids (unreadable ones left out).
    """
    key, now = fs.key, running()
    changed = moved(key.get("libraries", {}), now)
    if not changed:
        return False
    if sidecar(fs, "checked", now).is_file():
        return False
    stale = sidecar(fs, "stale", now)
    if stale.is_file():
        record = json.loads(stale.read_text())
    else:
        picks = fs.sample_rows(available, k, seed)
        if not picks:
            return False  # none of these images is stored: nothing to compare, check on a later use
        try:
            fresh = encode([i for _, _, i in picks])
        except FeatureCacheError as e:  # e.g. the weights are no longer found: use the set, check it later
            say(f"notice: feature set {fs.id} was made with {_versions_text(changed)}; not checked ({e})")
            return False
        diffs = [relative_difference(fresh[i], fs.row(path, row)) for path, row, i in picks if i in fresh]
        if not diffs:
            return False
        worst = max(diffs)
        record = {"set": fs.id, "recorded": key.get("libraries", {}), "running": now,
                  "moved": sorted(changed), "rows": len(diffs), "difference": worst, "tolerance": TOLERANCE}
        if worst <= TOLERANCE:
            write_atomic(sidecar(fs, "checked", now), json.dumps(record, indent=1))
            say(f"notice: feature set {fs.id} was made with {_versions_text(changed)}; {len(diffs)} recomputed "
                f"rows agree within {TOLERANCE:g} of the feature scale (largest difference {worst:.2g}), it stays valid")
            return False
        write_atomic(stale, json.dumps(record, indent=1))
    small = _rows(fs) < small_set_rows()
    redo = recompute_stale or small
    then = ("recomputing it under the new versions" + ("" if recompute_stale else " (a small set)") if redo else
            "its stored vectors are still used; pass --recompute-stale to recompute it")
    say(f"notice: feature set {fs.id} was made with {_versions_text(changed)}, and {record['rows']} recomputed "
        f"rows differ by {record['difference']:.2g} of the feature scale (tolerance {TOLERANCE:g}): {then}")
    return redo


def _versions_text(changed: dict[str, tuple[str, str]]) -> str:
    return ", ".join(f"{lib} {old}, this is {new}" for lib, (old, new) in sorted(changed.items()))
