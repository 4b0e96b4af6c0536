"""Keeping the cache small: least recently used converted graphs (and, when asked, feature sets) go first.

Converted engine graphs (`cache/engines/<id>/`, ~58 MB for vgg16, one per model, size and tap set) are
pure derivatives: removing one costs a conversion next time. Feature sets are hours of work, so
they are pruned only with `--features`, and never one that a writer holds (its lock is tried
without waiting; a held set is skipped and named). "Last use" is the newest of a folder's
`.last_used` marker (touched when a graph is loaded or a set is read) and its files' times.

Only what is provably featurecache's goes (engines.graphs.ours: a graph's marker or its meta.json); any other
folder under engines/ is someone's, never touched, and reported as skipped. A graph a running process has
in use (engines.graphs.hold) is skipped too. A read-only cache is refused in one line.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import FeatureCacheError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_AGE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([smhdw])\s*$", re.IGNORECASE)
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str, option: str = "--max-size") -> int:
    m = _SIZE.match(text or "")
    if not m:
        raise FeatureCacheError(f"{option} {text}: give a size such as 500MB, 5GB or 1.5GiB")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3).lower().startswith("i")
    return int(number * (1024 if binary else 1000) ** " kmgt".index(unit or " "))


def parse_age(text: str) -> float:
    m = _AGE.match(text or "")
    if not m:
        raise FeatureCacheError(f"--older-than {text}: give an age such as 12h, 30d or 2w")
    return float(m.group(1)) * _AGE_SECONDS[m.group(2).lower()]


@dataclass
class Entry:
    kind: str  # graph | features
    id: str
    folder: Path
    bytes: int
    last_used: float

    def as_dict(self) -> dict:
        return {"kind": self.kind, "id": self.id, "bytes": self.bytes, "last_used": self.last_used,
                "folder": str(self.folder)}


def _usage(folder: Path) -> tuple[int, float]:
    size, newest = 0, folder.stat().st_mtime
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:  # a writer's temporary file, renamed meanwhile
                continue
            size += st.st_size
            newest = max(newest, st.st_mtime)
    return size, newest


def _folders(cache_dir: Path) -> list[Path]:
    root = Path(cache_dir) / "engines"
    return sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith("."))


def graphs(cache_dir: Path) -> list[Entry]:
    """The converted graphs: folders under engines/ that are provably featurecache's."""
    from ..engines.graphs import ours

    out = []
    for folder in _folders(cache_dir):
        if ours(folder):
            size, used = _usage(folder)
            out.append(Entry("graph", folder.name, folder, size, used))
    return out


def foreign(cache_dir: Path) -> list[Entry]:
    """Folders under engines/ that featurecache did not make (a user's, another tool's): never pruned."""
    from ..engines.graphs import ours

    return [Entry("folder", f.name, f, *_usage(f)) for f in _folders(cache_dir) if not ours(f)]


def feature_sets(cache_dir: Path) -> list[Entry]:
    from .sets import FeatureStore

    out = []
    for fs in FeatureStore(cache_dir).all():
        size, used = _usage(fs.folder)
        out.append(Entry("features", fs.id, fs.folder, size, used))
    return out


def plan(cache_dir: Path, max_size: int | None, older_than: float | None, features: bool,
         now: float | None = None) -> tuple[list[Entry], list[Entry]]:
    """(to remove, to keep), least recently used first: everything older than `older_than`, then
    more of the oldest until what is left fits in `max_size`."""
    if max_size is None and older_than is None:
        raise FeatureCacheError("cache prune: give --max-size (e.g. 5GB) and/or --older-than (e.g. 30d)")
    now = time.time() if now is None else now
    entries = sorted(graphs(cache_dir) + (feature_sets(cache_dir) if features else []), key=lambda e: e.last_used)
    gone = [e for e in entries if older_than is not None and now - e.last_used > older_than]
    kept = [e for e in entries if e not in gone]
    while max_size is not None and kept and sum(e.bytes for e in kept) > max_size:
        gone.append(kept.pop(0))
    return gone, kept


def prune(cache_dir: Path, max_size: int | None = None, older_than: float | None = None, features: bool = False,
          dry_run: bool = False) -> dict:
    """Remove what `plan` picks; a feature set whose lock is held, a graph in use, and a folder that is not
    featurecache's are skipped and named."""
    from ..engines.graphs import NOT_OURS, remove_leftovers, try_remove
    from .sets import FeatureStore, not_writable

    gone, kept = plan(cache_dir, max_size, older_than, features)
    if gone and not dry_run:
        for folder in {e.folder.parent for e in gone}:
            if not os.access(folder, os.W_OK):
                raise not_writable(folder, f"prune {len(gone)} cache folder(s)")
        remove_leftovers(Path(cache_dir) / "engines")
    removed, skipped = [], [(e, NOT_OURS) for e in foreign(cache_dir)]
    for e in gone:
        if dry_run:
            removed.append(e)
            continue
        try:
            if e.kind == "features":
                FeatureStore(cache_dir).remove(e.id)  # refuses a set a writer holds
            else:
                why = try_remove(e.folder)  # refuses a graph a process has in use
                if why:
                    skipped.append((e, why))
                    continue
        except FeatureCacheError as err:
            skipped.append((e, str(err)))
            continue
        removed.append(e)
    ours = [e for e, _ in skipped if e.kind != "folder"]
    return {"removed": [e.as_dict() for e in removed], "freed_bytes": sum(e.bytes for e in removed),
            "skipped": [dict(e.as_dict(), reason=why) for e, why in skipped],
            "kept_bytes": sum(e.bytes for e in kept) + sum(e.bytes for e in ours), "dry_run": dry_run}
