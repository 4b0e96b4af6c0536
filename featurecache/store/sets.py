"""The feature store: one folder of immutable HDF5 parts per feature set.

    <cache>/features/<set id>/meta.json        key parts, dims (written once, atomically)
    <cache>/features/<set id>/part-*.h5        `ids` (N,) and `features` (N, D) float32
    <cache>/features/<set id>/skipped-*.json   images left out as unreadable (`--on-error skip`)

Why parts and not one growing file: an HDF5 file being appended to is not crash-safe (a SIGKILL
mid-write can leave its metadata unreadable). A part is written under a temporary name, flushed to
disk, then renamed into place, so at any instant every visible part is complete and a rerun only
redoes the part that was in flight. Readers need no lock: parts never change once visible. Writers
of one set take its lock file, so two extractions of the same settings never duplicate work.

A part is cut every `rows_per_part()` rows or `PART_SECONDS` seconds, whichever comes first, which
bounds the work a SIGKILL can lose; FEATURECACHE_PART_ROWS and FEATURECACHE_PART_SECONDS override
both (the chaos test uses tiny parts).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import FeatureCacheError

ID_DTYPE = "S32"  # 32 hex digits of an image content hash
PART_BYTES = 32 << 20  # rows per part are chosen so a part holds about this much
PART_SECONDS = 30.0  # ... and a part is cut at least this often, so a kill loses at most this much work
STALE_SECONDS = 600  # a temporary file this old is a killed writer's: no write takes that long
PART_ROWS_ENV, PART_SECONDS_ENV = "FEATURECACHE_PART_ROWS", "FEATURECACHE_PART_SECONDS"


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise FeatureCacheError(f"${name}={value!r}: not a number") from None
    if number <= 0:
        raise FeatureCacheError(f"${name}={value!r}: must be positive")
    return number


def _h5(path: Path, mode: str) -> h5py.File:
    # HDF5's own file locks fail on NFS/Lustre mounts without lock support ("unable to lock file,
    # errno = 38"); parts are immutable and writers hold our lock, so they add nothing here.
    return h5py.File(path, mode, locking=False)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


USED_MARKER = ".last_used"  # touched on each use of a feature set or converted graph; `cache prune` reads it
# What a cache that may not be written answers: a read-only mount (a shared cache), or no write permission.
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def touch_used(folder: Path) -> None:
    """Record a use of a cache folder (best effort: a read-only cache still works, without the record)."""
    if not os.access(folder, os.W_OK):
        return
    try:
        (Path(folder) / USED_MARKER).touch()
    except OSError:
        pass


def not_writable(path: Path, doing: str, error: OSError | None = None) -> FeatureCacheError:
    """The one line a refused write of the cache ends in: where, what could not be done, what to do."""
    why = os.strerror(error.errno) if error is not None and error.errno else "read-only"
    return FeatureCacheError(f"{path}: not writable ({why.lower()}), so cannot {doing}; use a writable cache "
                             "(--cache-dir or FEATURECACHE_DIR) or ask for write access to it (reading what is "
                             "stored there needs none)")


@contextmanager
def writing(path: Path, doing: str):
    """Turn a refused write under `path` (read-only mount, no permission) into `not_writable`'s one line."""
    try:
        yield
    except OSError as e:
        if e.errno in DENIED:
            raise not_writable(path, doing, e) from None
        raise


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def relative_difference(got, reference) -> float:
    """The largest difference of `got` from `reference`, relative to reference's largest value: how a
    recomputed vector is held to its stored one (cache verify, upgrades) and one chain to another."""
    reference = np.asarray(reference)
    return float(np.abs(np.asarray(got) - reference).max() / max(float(np.abs(reference).max()), 1e-12))


@dataclass
class _Part:
    path: Path
    ids: list[str]


class FeatureSet:
    """One (backbone, weights, layer, pool, size, ...) configuration's vectors, keyed by image id."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.id = folder.name
        self._parts: list[_Part] | None = None
        self._index: dict[str, tuple[int, int]] | None = None

    # ---- metadata ----------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        path = self.folder / "meta.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FeatureCacheError(f"{path}: unreadable feature-set metadata ({e}); "
                                    f"remove the set with `featurecache cache rm {self.id}`") from e

    @property
    def key(self) -> dict:
        return self.meta["key"]

    @property
    def dims(self) -> int:
        return int(self.meta["dims"])

    def part_files(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.h5"))

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    # ---- reading -----------------------------------------------------------------------------
    def open_part(self, path: Path) -> h5py.File:
        try:
            f = _h5(path, "r")
        except OSError as e:
            raise FeatureCacheError(
                f"{path}: damaged feature file ({str(e).splitlines()[0][:100]}); run "
                f"`featurecache cache repair {self.id}` (moves damaged parts aside, the next extract "
                f"recomputes their rows) or `featurecache cache rm {self.id}`") from e
        if f.attrs.get("set_id") != self.id or "ids" not in f or "features" not in f:
            f.close()
            raise FeatureCacheError(
                f"{path}: written by another configuration than feature set {self.id}; "
                f"remove it (or `featurecache cache rm {self.id}`) and extract again")
        return f

    def parts(self) -> list[_Part]:
        if self._parts is None:
            parts = []
            for path in self.part_files():
                with self.open_part(path) as f:
                    parts.append(_Part(path, f["ids"][()].astype("U32").tolist()))
            self._parts = parts
        return self._parts

    def index(self) -> dict[str, tuple[int, int]]:
        """image id -> (part number, row). The first copy wins if a lock-less file system let two in."""
        if self._index is None:
            index: dict[str, tuple[int, int]] = {}
            for p, part in enumerate(self.parts()):
                for r, i in enumerate(part.ids):
                    index.setdefault(i, (p, r))
            self._index = index
        return self._index

    def __len__(self) -> int:
        return len(self.index())

    def refresh(self) -> None:
        self._parts = self._index = None

    def missing(self, ids: list[str]) -> list[int]:
        """Positions in `ids` whose vectors are not stored."""
        index = self.index()
        return [k for k, i in enumerate(ids) if i not in index]

    def gather(self, ids: list[str], out: np.ndarray | None = None) -> np.ndarray:
        """Vectors for `ids` in that order, read part by part straight into one matrix."""
        touch_used(self.folder)  # a use (fit, predict, sweep): `cache prune` removes least recently used sets first
        index = self.index()
        missing = [i for i in ids if i not in index]
        if missing:
            raise FeatureCacheError(f"feature set {self.id} lacks {len(missing)} of {len(ids)} images; "
                                    "run `featurecache extract` with the same options first")
        if out is None:
            out = np.empty((len(ids), self.dims), dtype=np.float32)
        where = np.array([index[i] for i in ids], dtype=np.int64).reshape(-1, 2)
        for p in np.unique(where[:, 0]):
            dest = np.flatnonzero(where[:, 0] == p)
            rows = where[dest, 1]
            with self.open_part(self.parts()[p].path) as f:
                # A part is small (about PART_BYTES): reading it whole beats h5py's fancy indexing.
                out[dest] = f["features"][()][rows]
        return out

    def part_names(self) -> tuple[str, ...]:
        """The visible parts' file names: a reader compares them to notice parts added since."""
        return tuple(p.name for p in self.part_files())

    def part_ids(self, path: Path) -> list[str]:
        with self.open_part(path) as f:
            return f["ids"][()].astype("U32").tolist()

    def row(self, path: Path, r: int) -> np.ndarray:
        """One stored vector: row `r` of part `path`."""
        with self.open_part(path) as f:
            return f["features"][r]

    def sample_rows(self, wanted: set[str], k: int, seed: int = 0, skip=()) -> list[tuple[Path, int, str]]:
        """[(part, row, id)]: up to `k` stored rows of images in `wanted`, a seeded choice taken round-robin over
        the parts (those in `skip` left out) in a seeded order, so a sample of any size spreads over the parts
        (a damaged or stale part shows) and the last round favours no part. What `cache verify --data` and the
        first use under new library versions (upgrades.py) recompute."""
        rng = np.random.default_rng(seed)
        per_part = []
        for path in self.part_files():
            if path in skip:
                continue
            rows = [(path, r, i) for r, i in enumerate(self.part_ids(path)) if i in wanted]
            if rows:
                per_part.append([rows[j] for j in rng.permutation(len(rows))])
        order = rng.permutation(len(per_part)) if per_part else []
        picks, depth = [], 0
        while len(picks) < k and any(depth < len(p) for p in per_part):
            picks += [per_part[j][depth] for j in order if depth < len(per_part[j])][:k - len(picks)]
            depth += 1
        return picks

    def reader(self) -> SetReader:
        """Every part opened once, for many small row reads (a server's lookups); see SetReader."""
        touch_used(self.folder)
        parts = self.parts()
        # The store's own opener: same checks, and the same HDF5 open flags, which HDF5 insists on
        # for a file this process already holds open.
        return SetReader(tuple(p.path.name for p in parts), self.index(),
                         [self.open_part(p.path)["features"] for p in parts])

    def check_part(self, path: Path, dims: int) -> tuple[str | None, list[str]]:
        """(what is wrong with one part or None, its ids): belongs to this set, shapes, finite values."""
        try:
            with _h5(path, "r") as f:
                if f.attrs.get("set_id") != self.id:
                    return f"belongs to set {f.attrs.get('set_id')!r}", []
                ids, feats = f["ids"], f["features"]
                if feats.ndim != 2 or feats.shape[1] != dims or ids.shape != (feats.shape[0],):
                    return f"shape {feats.shape} for {ids.shape[0]} ids, expected (N, {dims})", []
                if not np.isfinite(feats[()]).all():
                    return "non-finite values", []
                return None, ids[()].astype("U32").tolist()
        except (OSError, KeyError, ValueError, TypeError) as e:
            return f"unreadable ({str(e).splitlines()[0][:80]})", []

    # ---- writing -----------------------------------------------------------------------------
    def rows_per_part(self) -> int:
        default = int(np.clip(PART_BYTES // (4 * max(self.dims, 1)), 64, 4096))
        return max(1, int(_env_number(PART_ROWS_ENV, default)))

    def part_due(self, rows: int, seconds: float) -> bool:
        """Whether `rows` buffered over `seconds` should become a part now."""
        if rows <= 0:
            return False
        return rows >= self.rows_per_part() or seconds >= _env_number(PART_SECONDS_ENV, PART_SECONDS)

    # ---- images left out -----------------------------------------------------------------------
    def skipped(self) -> dict[str, str]:
        """image id -> why it was left out (`--on-error skip`); such ids are never recomputed."""
        out: dict[str, str] = {}
        for path in sorted(self.folder.glob("skipped-*.json")):
            try:
                out.update(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                raise FeatureCacheError(f"{path}: unreadable ({e}); remove it (its images are then "
                                        "checked again by the next extract)") from e
        return out

    def record_skipped(self, reasons: dict[str, str]) -> None:
        """Remember unreadable images in a new immutable file (no lock needed: the name is unique)."""
        known = self.skipped() if reasons else {}
        new = {i: r for i, r in reasons.items() if i not in known}
        if new:
            with writing(self.folder, f"remember {len(new)} unreadable image(s) of feature set {self.id}"):
                write_atomic(self.folder / f"skipped-{time.time_ns():020d}-{os.getpid()}.json",
                             json.dumps(new, indent=0, sort_keys=True))

    def append(self, ids: list[str], vectors: np.ndarray) -> None:
        """Make `ids` durable: write a part under a temporary name, fsync, rename into place."""
        if len(ids) == 0:
            return
        if vectors.shape != (len(ids), self.dims):
            raise ValueError(f"vectors {vectors.shape} do not match {len(ids)} ids x {self.dims} dims")
        name = f"part-{time.time_ns():020d}-{os.getpid()}"
        tmp, final = self.folder / f".{name}.tmp", self.folder / f"{name}.h5"
        with _h5(tmp, "w") as f:
            f.attrs["set_id"] = self.id
            f.create_dataset("ids", data=np.asarray(ids, dtype=ID_DTYPE))
            f.create_dataset("features", data=np.asarray(vectors, dtype=np.float32))
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        if self._parts is not None:
            self._parts.append(_Part(final, list(ids)))
            for r, i in enumerate(ids):
                self._index.setdefault(i, (len(self._parts) - 1, r))

    @contextmanager
    def lock(self, notify=None, wait: bool = True):
        """Exclusive right to add parts to this set; waits (and says so) while another process has it.

        `filelock` takes an flock(2) on `.lock`; the kernel drops it when its holder dies, so a killed
        writer never blocks the next one. Where flock is missing (ENOSYS) filelock falls back to a
        marker file holding the owner's pid and host, reclaimed once that process is provably gone.
        """
        import warnings

        from filelock import FileLock, Timeout

        lock = FileLock(str(self.folder / ".lock"))
        with warnings.catch_warnings(record=True) as caught, \
                writing(self.folder, f"store vectors in (or change) feature set {self.id}"):
            warnings.simplefilter("always")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                if not wait:
                    raise FeatureCacheError(f"feature set {self.id} is being extracted by another process; "
                                            "wait for it to finish (or stop it) and try again") from None
                if notify:
                    notify(f"notice: feature set {self.id} is being extracted by another process; waiting for it")
                lock.acquire()
        if notify and any("SoftFileLock" in str(w.message) for w in caught):
            notify(f"notice: {self.folder} does not support flock; locking with a marker file instead "
                   "(a killed holder's marker is reclaimed only from the same host)")
        try:
            if not (self.folder / "meta.json").is_file():
                raise FeatureCacheError(f"feature set {self.id} was removed while this process waited for it; "
                                        "run the command again")
            self.remove_stale()
            self.refresh()
            yield self
        finally:
            lock.release()

    def temp_files(self) -> list[Path]:
        """Temporary files of writers (parts, metadata): invisible to readers, removed once stale."""
        return sorted(self.folder.glob(".*.tmp*"))

    def remove_stale(self, min_age: float = STALE_SECONDS) -> list[Path]:
        """Delete temporary files a killed writer left. Age, not the lock, decides: on a file system
        whose locks do not work across hosts (NFS mounted `nolock`) a live writer may hold one."""
        gone = []
        for tmp in self.temp_files():
            try:
                if time.time() - tmp.stat().st_mtime >= min_age:
                    tmp.unlink()
                    gone.append(tmp)
            except FileNotFoundError:
                pass  # its writer renamed it meanwhile
        return gone

    def move_aside(self, parts: list[Path]) -> Path:
        """Take damaged parts out of the set (into damaged/, kept for inspection): their rows become
        missing, so the next extract recomputes exactly them. Call under `lock()`."""
        aside = self.folder / "damaged"
        with writing(self.folder, f"move damaged parts of feature set {self.id} aside"):
            aside.mkdir(exist_ok=True)
            for part in parts:
                os.replace(part, aside / part.name)
        _fsync_dir(self.folder)
        self.refresh()
        return aside


@dataclass(frozen=True)
class SetReader:
    """A read-only snapshot of a set: its parts open, its index built. Parts never change once
    visible, so the open handles stay valid; handles close when the last holder drops the reader."""
    names: tuple[str, ...]  # part file names, to compare with FeatureSet.part_names()
    index: dict  # image id -> (part, row)
    features: list  # open h5py datasets, one per part

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, ids: list[str]) -> dict[int, np.ndarray]:
        """{position in ids: stored vector} for the ids the set holds, one row per read (a request
        wants a few rows, not the whole part `gather` reads)."""
        found = {k: self.index[i] for k, i in enumerate(ids) if i in self.index}
        return {k: self.features[p][r] for k, (p, r) in found.items()}


EMPTY_READER = SetReader((), {}, [])


class FeatureStore:
    """All feature sets under one cache folder."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self.root = self.cache_dir / "features"

    def open(self, set_id: str, key: dict, dims: int, extra: dict | None = None) -> FeatureSet:
        """The set for `key`, created (metadata only) if new; `extra` is stored beside the key (where
        the weights came from, so `cache verify --data` can rebuild the model)."""
        folder = self.root / set_id
        meta = folder / "meta.json"
        if meta.is_file():
            fs = FeatureSet(folder)
            if fs.key != key or fs.dims != dims:
                raise FeatureCacheError(f"{meta}: written by another configuration (key or dims differ); "
                                        f"remove it with `featurecache cache rm {set_id}`")
            return fs
        with writing(self.root, f"create feature set {set_id}"):
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(meta, json.dumps({"id": set_id, "key": key, "dims": int(dims), **(extra or {}),
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        return FeatureSet(folder)

    def get(self, set_id: str) -> FeatureSet | None:
        folder = self.root / set_id
        return FeatureSet(folder) if (folder / "meta.json").is_file() else None

    def all(self) -> list[FeatureSet]:
        if not self.root.is_dir():
            return []
        return [FeatureSet(p) for p in sorted(self.root.iterdir())
                if not p.name.startswith(".") and (p / "meta.json").is_file()]

    def find(self, prefix: str) -> FeatureSet:
        if not prefix.strip():  # "" is a prefix of every id: `cache rm ""` must not take the only set
            raise FeatureCacheError(f"feature set id {prefix!r} is empty; give an id (or a unique prefix of one) "
                                    "from `featurecache cache ls`")
        hits = [s for s in self.all() if s.id.startswith(prefix)]
        if len(hits) != 1:
            what = "no" if not hits else "more than one"
            raise FeatureCacheError(f"{what} feature set matches {prefix!r} in {self.root}; "
                                    "see `featurecache cache ls`")
        return hits[0]

    def remove(self, set_id: str) -> str:
        """Delete a set, refusing while an extraction writes to it (it would fail half-way); what was done,
        in words. A set that is a link to a folder elsewhere (shared, or the user's) loses the link only."""
        fs = self.find(set_id)
        if not os.access(self.root, os.W_OK):
            raise not_writable(self.root, f"remove feature set {fs.id}")
        with writing(self.root, f"remove feature set {fs.id}"):
            for leftover in self.root.glob(".removing-*"):  # a `cache rm` killed half-way
                if leftover.is_symlink():
                    leftover.unlink()
                else:
                    shutil.rmtree(leftover, ignore_errors=True)
            with fs.lock(wait=False):
                # Rename first: a reader then sees the whole set or nothing, never half of it.
                doomed = fs.folder.with_name(f".removing-{fs.id}-{os.getpid()}")
                link = os.readlink(fs.folder) if fs.folder.is_symlink() else None
                os.replace(fs.folder, doomed)
            if link is not None:
                doomed.unlink()
                return f"removed {fs.id} (a link; the folder it pointed to, {link}, is left in place)"
            shutil.rmtree(doomed)
        return f"removed {fs.id}"
