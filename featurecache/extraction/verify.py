"""Checking a feature set's files: what `featurecache cache verify` and `cache repair` do.

Two levels:
- structure (always): metadata and key, every part readable, belonging to the set, with the set's
  dims and finite values, no image stored twice;
- values (`--data`): a few stored rows, spread over the parts, recomputed from the images of that
  dataset and compared with what is stored. The store keeps image ids, not image paths, so the
  images must be given again; this also proves the id -> vector pairing, not only the numbers.

`repair` moves the parts found at fault into `<set>/damaged/`; their rows become missing, so the
next `extract` recomputes exactly them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import FeatureCacheError
from ..fingerprint import key_id
from ..settings import RunSettings
from ..store.sets import FeatureSet, relative_difference

RTOL = 1e-4  # of a row's largest value; TF's CPU kernels move vectors by ~1e-6 with batch size or threads


@dataclass
class Problem:
    text: str
    part: Path | None = None  # the part at fault, which `repair` moves aside


@dataclass
class Report:
    set_id: str
    problems: list[Problem]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        text = "ok" if self.ok else "; ".join(p.text for p in self.problems)
        return f"{self.set_id}: {text}" + "".join(f" ({n})" for n in self.notes)


def verify_set(fs: FeatureSet) -> list[str]:
    """Problems found in `fs` (empty when healthy): metadata, key, every part's structure, duplicates."""
    return [p.text for p in check_structure(fs)[0]]


def check_structure(fs: FeatureSet) -> tuple[list[Problem], list[str]]:
    """(problems, notes) of the set's files; notes are harmless (stale temporary files, parts set aside)."""
    try:
        meta = json.loads((fs.folder / "meta.json").read_text())
        dims = int(meta["dims"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [Problem(f"meta.json unreadable ({e}); remove the set with `featurecache cache rm {fs.id}`")], []
    problems = []
    if key_id(meta.get("key", {})) != fs.id:
        problems.append(Problem(f"meta.json key hashes to {key_id(meta.get('key', {}))}, not the folder's id"))
    seen: set[str] = set()
    duplicates = 0
    for path in fs.part_files():
        problem, ids = fs.check_part(path, dims)
        if problem:
            problems.append(Problem(f"{path.name}: {problem}", path))
            continue
        for i in ids:
            duplicates += i in seen
            seen.add(i)
    try:
        fs.skipped()
    except FeatureCacheError as e:
        problems.append(Problem(str(e)))
    notes = _notes(fs)
    if duplicates:
        notes.append(f"{duplicates} image id(s) stored twice (a file system without working locks?); "
                     "harmless, readers keep the first copy")
    return problems, notes


def _notes(fs: FeatureSet) -> list[str]:
    notes = []
    if temps := fs.temp_files():
        notes.append(f"{len(temps)} temporary file(s) of killed writers, invisible to readers; "
                     "the next extract or `cache repair` removes them")
    aside = fs.folder / "damaged"
    if aside.is_dir() and any(aside.iterdir()):
        notes.append(f"{len(list(aside.iterdir()))} damaged part(s) set aside in {aside}")
    return notes


# ---- values -----------------------------------------------------------------------------------
def recompute_sample(fs: FeatureSet, ds, k: int, cache_dir: Path, bad_parts=()) -> tuple[list[Problem], str]:
    """Recompute up to `k` stored rows of images of `ds`, spread over the healthy parts (a seeded choice)."""
    from .extract import Sources, first_positions

    src = Sources([ds.train.images, ds.test.images])
    first = first_positions(src.ids)
    picks = fs.sample_rows(set(first), k, skip=set(bad_parts))
    if not picks:
        return [], f"no image of --data {ds.name} is stored in this set; values not checked"
    encoder, why = _encoder_for(fs, cache_dir)
    if encoder is None:
        return [], why
    problems, worst, checked = [], 0.0, 0
    for path, row, image_id in picks:
        pos = first[image_id]
        fresh = encoder.encode([src.item(pos)], [src.name(pos)])  # unreadable now: skipped, nothing to compare
        if not fresh.keys:
            continue
        stored = fs.row(path, row)
        diff = relative_difference(fresh.vectors[encoder.taps[0]][0], stored)
        worst, checked = max(worst, diff), checked + 1
        if diff > RTOL:
            problems.append(Problem(f"{path.name}: stored vector of {src.name(pos)} differs from a "
                                    f"fresh computation (relative difference {diff:.2g})", path))
    return problems, (f"recomputed {checked} rows from --data {ds.name}: largest relative difference "
                      f"{worst:.2g} (tolerance {RTOL:g})")


def spec_of(key: dict, weights: str, seed: int):
    """The feature settings a set's key was made from (`weights` and `seed`: the option that gives
    its weights id), so the same encoder can be built again."""
    from ..backbones import get_backbone
    from ..settings import FeatureSpec, Precision

    precision = Precision.parse(key["precision"])
    # The key stores the preprocessing mode; the option is `scale01` or the model's own (`auto`).
    mode = "scale01" if key["preprocess"] == "scale01" != get_backbone(key["model"]).preprocess else "auto"
    return FeatureSpec(key["model"], weights, (key["layer"],), key["pool"], key["size"], key["resize"], mode, seed,
                       precision.name, precision.calibration)


def _encoder_for(fs: FeatureSet, cache_dir: Path):
    """(an encoder that remakes the set's vectors, "") for the set's key, or (None, why not)."""
    from ..backbones import get_backbone
    from ..encoding.encoder import Encoder
    from ..settings import resolve

    key, meta = fs.key, fs.meta
    backbone = get_backbone(key["model"])
    weights = _weights_for(backbone, key, meta.get("source", {}), cache_dir)
    if weights is None:
        return None, f"weights {key['weights']} not found again (a weights file moved or changed); values not checked"
    try:
        res = resolve(spec_of(key, *weights), None, cache_dir)
    except FeatureCacheError as e:
        return None, f"{e}; values not checked"
    if res.keys[key["layer"]] != key:
        return None, "made with other library versions than installed now; values not checked"
    encoder = Encoder(res, cache_dir, res.precision.reference_engine, on_error="skip")
    try:
        encoder.load()
    except FeatureCacheError as e:
        return None, f"{e}; values not checked"
    return encoder, ""


def _weights_for(backbone, key: dict, source: dict, cache_dir: Path):
    """(weights option, seed) that give the weights id the key records, from meta.json's source or
    guessed from the id; None when no option gives it now."""
    from ..backbones.weights import resolve_weights

    wid = key["weights"]
    seed = source.get("seed")
    if seed is None:
        m = re.match(r"random-seed(\d+)-", wid)
        seed = int(m.group(1)) if m else 0
    guesses = [source.get("weights"), source.get("weights_path"), wid.split("-")[0], wid.rsplit("-", 1)[0]]
    for option in dict.fromkeys(g for g in guesses if g):
        try:
            w = resolve_weights(backbone, option, seed, cache_dir)
        except FeatureCacheError:
            continue
        if w.id == wid:
            return option, seed
    return None


# ---- commands ---------------------------------------------------------------------------------
def verify(fs: FeatureSet, ds=None, run: RunSettings | None = None, sample: int = 8) -> Report:
    """Check `fs`'s files and, given the dataset `ds`, recompute `sample` of its rows from the images.
    run: the cache (converted graphs, weights) and the log; default: the cache `fs` lives in."""
    run = run or RunSettings(fs.folder.parents[1])
    problems, notes = check_structure(fs)
    if ds is not None and sample > 0 and not any(p.part is None for p in problems):
        found, note = recompute_sample(fs, ds, sample, run.cache_dir, bad_parts={p.part for p in problems})
        problems += found
        notes.append(note)
    elif ds is not None:
        notes.append("values not checked: fix the problems above first")
    return Report(fs.id, problems, notes)


def repair(fs: FeatureSet, ds=None, run: RunSettings | None = None, sample: int = 8) -> Report:
    """Verify, then (under the set's lock) move damaged parts aside and delete temporary files."""
    run = run or RunSettings(fs.folder.parents[1])
    with fs.lock(notify=run.say):
        report = verify(fs, ds, run, sample)
        unfixable = [p for p in report.problems if p.part is None]
        if unfixable:
            raise FeatureCacheError(f"{fs.id}: {unfixable[0].text}; repair cannot fix this, "
                                    f"remove the set with `featurecache cache rm {fs.id}` and extract again")
        parts = list(dict.fromkeys(p.part for p in report.problems if p.part is not None))
        temps = fs.remove_stale(min_age=0)  # we hold the lock: no writer of ours is mid-write
        actions = []
        if parts:
            aside = fs.move_aside(parts)
            actions.append(f"moved {len(parts)} damaged part(s) to {aside}; the next extract recomputes their rows")
        if temps:
            actions.append(f"removed {len(temps)} temporary file(s)")
        return Report(fs.id, [], actions or ["nothing to repair"])
