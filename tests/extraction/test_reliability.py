"""Crash safety, concurrency, damaged files and bad images (issue #5): nothing lost, nothing corrupted.

Small configurations throughout (digits, vgg16 with seeded random weights at 32 px): the machine is
shared. Subprocess tests run the real CLI, because locks and signals are about processes.
"""

import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import CHILD_TIMEOUT, ROOT, error_line, feats, run_child, run_cli, stop, write_digit_folder
from featurecache.encoding import images
from featurecache.api import DataOptions, RunSettings, dataset_features, extract_dataset
from featurecache.data.datasets import load_dataset
from featurecache.errors import FeatureCacheError
from featurecache.extraction.extract import FeatureSpec
from featurecache.fingerprint import key_id
from featurecache.store.sets import FeatureStore
from featurecache.extraction.verify import check_structure, verify

SPEC = FeatureSpec("vgg16", "random", ("block5_pool",), size=32)
FEATS = feats(32, "block5_pool")
SMALL = ["--data", "digits", "--max-train", "60", "--max-test", "30"]


@pytest.fixture(scope="module")
def small():
    return DataOptions("digits", max_train=60, max_test=30).load()


def all_ids(ds) -> list[str]:
    return list(dict.fromkeys(ds.train.images.ids + ds.test.images.ids))


def rows_in_parts(fs) -> int:
    return sum(len(p.ids) for p in fs.parts())


class Child:
    """A CLI subprocess whose stderr is collected as it comes, so a test can wait for a line."""

    def __init__(self, *args, cache_dir, env=None):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", FEATURECACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1",
                   **(env or {}))
        self.cmd = ["featurecache", *map(str, args)]
        self.proc = subprocess.Popen([sys.executable, "-m", "featurecache.cli", *map(str, args)], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err = self.out = ""
        # Both pipes read as they come (a full pipe would block the child), so finish() can wait with a limit.
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        self._t_out = threading.Thread(target=self._read_out, daemon=True)
        self._t_out.start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stderr.read(1), ""):
            self.err += chunk

    def _read_out(self):
        self.out = self.proc.stdout.read()

    def wait_for(self, predicate, timeout=180):
        t0 = time.monotonic()
        while not predicate(self.err):
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise AssertionError(f"never saw the expected output:\n{self.err[-3000:]}")
            time.sleep(0.02)

    def finish(self, timeout=CHILD_TIMEOUT):
        # Not communicate(): it would read stderr too, racing the reader thread for the last lines.
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc, " ".join(self.cmd))
            raise AssertionError(f"hung: `{' '.join(self.cmd)}` still running after {timeout} s, stopped; its stderr "
                                 f"ended:\n{self.err[-3000:]}") from None
        self._t.join()
        self._t_out.join()
        return self.proc.returncode, self.out


def progress(err: str) -> int:
    counts = [int(m) for m in re.findall(r"(\d+)/\d+ \[", err)]
    return counts[-1] if counts else 0


# ---- crash safety: the store under SIGKILL ----------------------------------------------------------
DIE = "lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)"
KILL_AT = {
    # where the writer of the second part dies: (patch, rows of that part visible afterwards)
    "mid-write": (f"h5py.File.flush = {DIE}", 0),  # the temporary HDF5 file is half made
    "before-rename": ("real = os.replace\n"  # h5py closed, data fsynced, not yet renamed
                      "os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL) if '.part-' in str(a) "
                      "else real(a, b)", 0),
    "after-rename": (f"featurecache.store.sets._fsync_dir = {DIE}", 8),  # renamed, directory not yet synced
}


@pytest.mark.parametrize("where", KILL_AT)
def test_sigkill_while_writing_a_part_leaves_complete_parts_only(tmp_path, where):
    patch, visible = KILL_AT[where]
    key = {"k": "test"}
    code = f"""
import os, signal, h5py, numpy as np, featurecache.store.sets
from pathlib import Path
fs = featurecache.store.sets.FeatureStore(Path({str(tmp_path)!r})).open({key_id(key)!r}, {key!r}, 4)
fs.append([f"{{i:032x}}" for i in range(8)], np.ones((8, 4), np.float32))
{patch}
fs.append([f"{{i:032x}}" for i in range(8, 16)], np.full((8, 4), 2, np.float32))
"""
    proc = run_child([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    fs = FeatureStore(tmp_path).get(key_id(key))
    assert len(fs) == 8 + visible and rows_in_parts(fs) == 8 + visible
    assert fs.gather(list(fs.index())).shape == (8 + visible, 4)  # every visible part reads
    problems, notes = check_structure(fs)
    assert problems == []
    temps = fs.temp_files()
    assert (len(temps) == 1) == (visible == 0), temps  # a killed writer's file, invisible to readers
    if temps:
        assert any("temporary file" in n for n in notes)
        with fs.lock():
            assert temps[0].exists()  # too young to be sure its writer is dead (no-lock file systems)
        old = time.time() - 3600
        os.utime(temps[0], (old, old))
        with fs.lock():
            assert not temps[0].exists()  # the next writer removes it
    with fs.lock():
        fs.append([f"{i:032x}" for i in range(8, 16)], np.full((8, 4), 2, np.float32))
    assert len(fs) == 16


def test_sigkill_while_meta_json_is_written(tmp_path):
    key = {"k": "meta"}
    code = f"""
import os, signal
from pathlib import Path
real = os.replace
def die(src, dst):
    if str(dst).endswith("meta.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = die
from featurecache.store.sets import FeatureStore
FeatureStore(Path({str(tmp_path)!r})).open({key_id(key)!r}, {key!r}, 4)
"""
    proc = run_child([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = FeatureStore(tmp_path)
    folder = tmp_path / "features" / key_id(key)
    assert folder.is_dir() and not (folder / "meta.json").exists()
    assert store.get(key_id(key)) is None and store.all() == []  # no half-made set is ever listed
    fs = store.open(key_id(key), key, 4)  # the rerun simply writes it again
    assert fs.key == key and check_structure(fs)[0] == []
    assert len(fs.temp_files()) == 1
    fs.remove_stale(min_age=0)
    assert fs.temp_files() == []


def test_parts_are_cut_by_rows_or_by_time(small, cache, monkeypatch):
    monkeypatch.setenv("FEATURECACHE_PART_ROWS", "25")
    _, s = extract_dataset(small, SPEC, RunSettings(cache, batch_size=10, progress=False))
    fs = FeatureStore(cache).get(s.sets[0]["id"])
    assert [len(p.ids) for p in fs.parts()] == [30, 30, 30]  # cut at the first batch end past 25 rows
    assert fs.part_due(5, 31.0) and not fs.part_due(5, 1.0) and not fs.part_due(0, 99.0)
    monkeypatch.setenv("FEATURECACHE_PART_SECONDS", "0.5")
    assert fs.part_due(1, 0.6)
    monkeypatch.setenv("FEATURECACHE_PART_ROWS", "lots")
    with pytest.raises(FeatureCacheError, match="FEATURECACHE_PART_ROWS"):
        fs.rows_per_part()


def test_sigterm_stops_like_ctrl_c_and_keeps_every_finished_batch(cache):
    # One part would hold everything: only the SIGTERM handler can save the finished batches.
    env = {"FEATURECACHE_PART_ROWS": "100000", "FEATURECACHE_PART_SECONDS": "100000", "TQDM_MININTERVAL": "0",
           "TQDM_MINITERS": "1"}
    # TensorFlow at 64 px: slow enough that the signal lands mid-run even on an idle machine (the faster
    # engines finished all 90 images before it arrived).
    child = Child("extract", *SMALL, *FEATS[:4], "--size", "64", "--layer", "block5_pool", "--engine", "tensorflow",
                  "--batch-size", "5",
                  cache_dir=cache, env=env)
    child.wait_for(lambda e: progress(e) >= 20)
    child.proc.send_signal(signal.SIGTERM)
    rc, _ = child.finish()
    done = re.search(r"interrupted after (\d+) of 90 images", child.err)
    assert rc == 2 and done, child.err[-2000:]
    fs = FeatureStore(cache).all()[0]
    assert len(fs) == int(done.group(1)) >= 20 and check_structure(fs)[0] == []


# ---- damaged files: verify, repair -----------------------------------------------------------------
@pytest.fixture
def three_parts(small, cache, monkeypatch):
    """A set of 90 digits in three parts of 30 rows, computed one image at a time (bit-exact reruns)."""
    monkeypatch.setenv("FEATURECACHE_PART_ROWS", "30")
    _, s = extract_dataset(small, SPEC, RunSettings(cache, batch_size=1, progress=False))
    fs = FeatureStore(cache).get(s.sets[0]["id"])
    assert len(fs.part_files()) == 3
    return fs, fs.gather(all_ids(small))


def test_truncated_part_is_named_and_repair_recomputes_only_its_rows(small, cache, three_parts):
    fs, before = three_parts
    part = fs.part_files()[1]
    part.write_bytes(part.read_bytes()[:1000])
    with pytest.raises(FeatureCacheError, match=f"{part.name}: damaged feature file.*cache repair"):
        FeatureStore(cache).get(fs.id).gather(all_ids(small))
    proc = run_cli("cache", "verify", cache_dir=cache)
    assert proc.returncode == 2 and f"{fs.id}: {part.name}: unreadable" in proc.stdout
    assert f"cache repair {fs.id}" in error_line(proc)
    out = run_cli("cache", "repair", fs.id[:6], cache_dir=cache, check=True).stdout
    assert "moved 1 damaged part(s)" in out and (fs.folder / "damaged" / part.name).exists()
    _, s = extract_dataset(small, SPEC, RunSettings(cache, batch_size=1, progress=False))
    assert s.computed == 30  # exactly the rows of the part set aside
    fs = FeatureStore(cache).get(fs.id)
    assert np.array_equal(fs.gather(all_ids(small)), before)
    assert "ok" in run_cli("cache", "verify", cache_dir=cache, check=True).stdout


def test_verify_with_data_recomputes_rows_and_catches_wrong_vectors(small, cache, three_parts):
    fs, _ = three_parts
    good = verify(fs, small, RunSettings(cache), 6)
    assert good.ok and "recomputed 6 rows" in good.line(), good.line()
    part = fs.part_files()[2]
    with h5py.File(part, "r+") as f:  # structurally perfect, but two images' vectors swapped
        feats = f["features"][()]
        f["features"][0], f["features"][1] = feats[1], feats[0]
    assert check_structure(fs)[0] == []  # the structure alone cannot see it
    bad = verify(fs, small, RunSettings(cache), 90)
    assert [p.part for p in bad.problems] == [part, part] and "differs from a fresh computation" in bad.line()
    args = ["--data", "digits", "--max-train", "60", "--max-test", "30", "--sample", "90"]
    proc = run_cli("cache", "repair", fs.id, *args, cache_dir=cache, check=True)
    assert "moved 1 damaged part(s)" in proc.stdout
    extract_dataset(small, SPEC, RunSettings(cache, batch_size=1, progress=False))
    assert run_cli("cache", "verify", *args, cache_dir=cache, check=True).returncode == 0


def test_repair_cannot_fix_metadata_and_says_rm(small, cache, three_parts):
    fs, _ = three_parts
    (fs.folder / "meta.json").write_text("{not json")
    proc = run_cli("cache", "repair", fs.id, cache_dir=cache)
    assert proc.returncode == 2 and f"cache rm {fs.id}" in error_line(proc)


# ---- concurrency -------------------------------------------------------------------------------
def test_second_extract_waits_for_the_lock_and_says_so(small, cache):
    extract_dataset(DataOptions("digits", max_train=40, max_test=20).load(), SPEC, RunSettings(cache, progress=False))
    fs = FeatureStore(cache).all()[0]
    before, missing = len(fs), len(fs.missing(all_ids(small)))  # the subsets overlap only in part
    with fs.lock():
        child = Child("extract", *SMALL, *FEATS, "--json", cache_dir=cache)
        child.wait_for(lambda e: "being extracted by another process; waiting for it" in e)
        time.sleep(0.5)
        assert child.proc.poll() is None  # still waiting
    rc, out = child.finish()
    assert rc == 0 and json.loads(out)["computed"] == missing > 0
    assert len(FeatureStore(cache).get(fs.id)) == before + missing


def test_two_extracts_at_once_with_the_same_settings(cache):
    args = ["extract", "--data", "digits", "--max-train", "120", "--max-test", "40", *FEATS, "--batch-size", "16",
            "--json"]
    env = {"FEATURECACHE_PART_ROWS": "32"}
    a, b = Child(*args, cache_dir=cache, env=env), Child(*args, cache_dir=cache, env=env)
    (ra, oa), (rb, ob) = a.finish(), b.finish()
    assert ra == rb == 0, a.err + b.err
    ja, jb = json.loads(oa), json.loads(ob)
    assert sorted([ja["computed"], jb["computed"]]) == [0, 160]  # the work was done once
    idle, idle_out = (a, ja) if ja["computed"] == 0 else (b, jb)
    assert "waiting for it" in idle.err or idle_out["cache_hit"]
    fs = FeatureStore(cache).all()[0]
    assert len(fs) == rows_in_parts(fs) == 160 and check_structure(fs)[0] == []


def test_two_extracts_at_once_with_overlapping_layers_do_not_deadlock(cache):
    base = ["extract", *SMALL, "--model", "vgg16", "--weights", "random", "--size", "32", "--json"]
    a = Child(*base, "--layer", "block5_pool", "--layer", "block4_pool", cache_dir=cache)
    b = Child(*base, "--layer", "block3_pool", "--layer", "block4_pool", cache_dir=cache)
    (ra, _), (rb, _) = a.finish(), b.finish()
    assert ra == rb == 0, a.err + b.err
    sets = FeatureStore(cache).all()
    assert len(sets) == 3
    for fs in sets:
        assert len(fs) == rows_in_parts(fs) == 90 and check_structure(fs)[0] == []


def test_reading_one_set_while_another_process_extracts_another(small, cache):
    _, s = extract_dataset(small, SPEC, RunSettings(cache, progress=False))
    reader = FeatureStore(cache).get(s.sets[0]["id"])
    want = reader.gather(all_ids(small))
    child = Child("extract", *SMALL, *FEATS[:-2], "--layer", "block4_pool", "--batch-size", "5", cache_dir=cache,
                  env={"FEATURECACHE_PART_ROWS": "5"})
    reads = 0
    while child.proc.poll() is None:
        fresh = FeatureStore(cache).get(s.sets[0]["id"])
        assert np.array_equal(fresh.gather(all_ids(small)), want)
        for fs in FeatureStore(cache).all():  # the set being written: whatever is visible reads whole
            ids = list(fs.index())
            assert fs.gather(ids).shape[0] == len(ids)
        reads += 1
    assert child.finish()[0] == 0 and reads > 0
    assert all(len(fs) == 90 for fs in FeatureStore(cache).all())


def test_lock_without_flock_falls_back_and_says_so(tmp_path, monkeypatch):
    """A file system without flock(2), simulated at the operating-system call (the standard library's
    `fcntl.flock` answers ENOSYS, as NFS mounted `nolock` or some FUSE mounts do), not inside filelock."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    fs = FeatureStore(tmp_path).open(key_id({"k": 1}), {"k": 1}, 2)
    said = []
    with fs.lock(notify=said.append):
        fs.append(["a" * 32], np.zeros((1, 2), np.float32))
    assert len(fs) == 1 and "does not support flock" in said[0]


def test_cache_rm_refuses_while_a_writer_holds_the_set(tmp_path):
    store = FeatureStore(tmp_path)
    fs = store.open(key_id({"k": 2}), {"k": 2}, 2)
    with fs.lock():
        with pytest.raises(FeatureCacheError, match="being extracted by another process"):
            store.remove(fs.id)
    store.remove(fs.id)
    assert store.all() == [] and not fs.folder.exists()


# ---- bad images ---------------------------------------------------------------------------------
def _png_declaring(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares w x h pixels (a decompression bomb's calling card)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


GOOD_ODD = ["palette.png", "rgba.png", "sixteen.png", "cmyk.jpg", "exif.jpg"]
BAD = ["empty.png", "truncated.jpg", "text.png", "bomb.png", "notes.txt"]


def write_odd_images(folder: Path) -> None:
    """Odd but valid images in digit0, and one of each kind of bad file spread over the classes."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    d0, d1, d2 = folder / "digit0", folder / "digit1", folder / "digit2"
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        d0 / "palette.png": _encode(Image.fromarray(rgb).quantize(8), "PNG"),
        d0 / "rgba.png": _encode(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "PNG"),
        d0 / "sixteen.png": _encode(Image.fromarray((rgb[..., 0].astype(np.uint16) * 250)), "PNG"),
        d0 / "cmyk.jpg": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        d0 / "exif.jpg": _encode(Image.fromarray(rgb), "JPEG", exif=exif.tobytes()),
        d1 / "empty.png": b"",
        d1 / "truncated.jpg": _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")[:900],
        d2 / "text.png": b"this is not a png\n",
        d2 / "bomb.png": _png_declaring(20000, 20000),
        d2 / "notes.txt": b"labelled by hand, 2026\n",
    }
    for path, data in files.items():
        path.write_bytes(data)


@pytest.fixture
def messy(tmp_path):
    folder = tmp_path / "messy"
    write_digit_folder(folder, 6)
    write_odd_images(folder)
    return folder


def test_fail_mode_names_every_bad_file_before_building_the_model(messy, cache, monkeypatch):
    import featurecache.backbones.build as build

    monkeypatch.setattr(build, "build_model", lambda *a: pytest.fail("built the model despite bad images"))
    with pytest.raises(FeatureCacheError) as e:
        extract_dataset(load_dataset(str(messy)), SPEC, RunSettings(cache, progress=False))
    msg = str(e.value)
    assert msg.startswith("5 unreadable image(s), nothing extracted") and "--on-error skip" in msg
    for name in BAD:
        assert name in msg
    assert FeatureStore(cache).all() == []
    proc = run_cli("extract", "--data", messy, *FEATS, cache_dir=cache)
    assert proc.returncode == 2 and "empty file" in error_line(proc) and "over the limit" in error_line(proc)


def test_skip_mode_leaves_bad_images_out_everywhere(messy, cache):
    proc = run_cli("extract", "--data", messy, *FEATS, "--on-error", "skip", "--json", cache_dir=cache, check=True)
    out = json.loads(proc.stdout)
    skipped = {Path(s["name"]).name: s["reason"] for s in out["skipped"]}
    assert sorted(skipped) == sorted(BAD) and out["computed"] == 18 + len(GOOD_ODD)
    assert "empty file" in skipped["empty.png"] and "over the limit" in skipped["bomb.png"]
    assert "not a readable image" in skipped["notes.txt"] and "truncated" in skipped["truncated.jpg"]
    text = run_cli("extract", "--data", messy, *FEATS, cache_dir=cache, check=True).stdout  # fail mode now
    assert "cache hit" in text and "skipped 5 unreadable image(s)" in text  # remembered, not retried
    ds = load_dataset(str(messy))
    _, x_train, x_test = dataset_features(ds, SPEC, RunSettings(cache))
    names = [Path(ds.train.images.name(k)).name for k in range(len(ds.train))] + \
            [Path(ds.test.images.name(k)).name for k in range(len(ds.test))]
    assert not set(BAD) & set(names) and set(GOOD_ODD) <= set(names)
    assert len(x_train) == len(ds.train.labels) and len(x_test) == len(ds.test.labels)
    assert len(names) == 18 + len(GOOD_ODD)


def test_nothing_computed_is_lost_when_bad_images_appear(tmp_path, cache):
    folder = tmp_path / "data"
    write_digit_folder(folder, 6)
    _, s = extract_dataset(load_dataset(str(folder)), SPEC, RunSettings(cache, progress=False))
    write_odd_images(folder)
    with pytest.raises(FeatureCacheError, match="5 unreadable"):
        extract_dataset(load_dataset(str(folder)), SPEC, RunSettings(cache, progress=False))
    assert len(FeatureStore(cache).get(s.sets[0]["id"])) == 18
    _, s2 = extract_dataset(load_dataset(str(folder)), SPEC, RunSettings(cache, progress=False, on_error="skip"))
    assert s2.computed == len(GOOD_ODD) and s2.sets[0]["stored"] == 18 + len(GOOD_ODD)


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_image_that_breaks_after_the_check(tmp_path, cache, monkeypatch, on_error):
    """A file that passes the up-front check but fails later (changed meanwhile) still stops or is skipped
    cleanly, and the batches before it are stored."""
    folder = tmp_path / "data"
    write_digit_folder(folder, 6)
    late = folder / "digit2" / "zz-late.png"
    late.write_bytes(b"")
    monkeypatch.setattr(images, "check_file", lambda path: None)  # the up-front check passes it: changed since
    ds = load_dataset(str(folder))
    if on_error == "fail":
        with pytest.raises(FeatureCacheError, match="zz-late.png: empty file"):
            extract_dataset(ds, SPEC, RunSettings(cache, batch_size=2, progress=False))
        fs = FeatureStore(cache).all()[0]
        assert len(fs) > 0  # batches before the bad image are kept
    else:
        _, s = extract_dataset(ds, SPEC, RunSettings(cache, batch_size=2, progress=False, on_error="skip"))
        assert [Path(x["name"]).name for x in s.skipped] == ["zz-late.png"] and s.sets[0]["stored"] == 18
        assert list(FeatureStore(cache).all()[0].skipped().values())[0].endswith("replace it with an image")


def test_on_error_value_is_checked(small, cache):
    with pytest.raises(FeatureCacheError, match="--on-error maybe: use fail or skip"):
        extract_dataset(small, SPEC, RunSettings(cache, on_error="maybe"))


# ---- saved heads --------------------------------------------------------------------------------
def test_load_head_refuses_a_head_file_changed_since_it_was_saved(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from featurecache.runs import record as runs

    x, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    pipe = make_pipeline(LogisticRegression()).fit(x, y)
    record = {"metrics": runs.evaluate(pipe, x, y, x, y, ["a", "b"]), "class_names": ["a", "b"], "head": "logreg",
              "features": "test", "data": "test", "library": "scikit-learn", "notes": "", "fit_seconds": 0.0,
              "dims": 3, "n_train": 20, "n_test": 20}
    runs.save_run(tmp_path, "r1", pipe, record)
    _, loaded = runs.load_head(tmp_path, "r1")
    assert (loaded.predict(x) == pipe.predict(x)).all()
    head = runs.runs_dir(tmp_path) / "r1" / "head.joblib"
    head.write_bytes(head.read_bytes() + b"\x00")  # one byte more: could be anything, e.g. a payload
    with pytest.raises(FeatureCacheError, match="hash mismatch.*refusing to unpickle"):
        runs.load_head(tmp_path, "r1")
    head.unlink()
    with pytest.raises(FeatureCacheError, match="missing or changed"):
        runs.load_head(tmp_path, "r1")


# ---- the chaos run ------------------------------------------------------------------------------
@pytest.mark.chaos
def test_chaos_extract_survives_20_sigkills_bit_for_bit(tmp_path):
    """scripts/chaos_extract.py with its small default configuration (about 3 minutes on 2 cores)."""
    proc = subprocess.run([sys.executable, "scripts/chaos_extract.py", "--kills", "20", "--work", str(tmp_path),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["kills"] == 20 and r["kills_in_network"] >= 10
    assert r["same_ids"] and r["bit_identical"] and r["rows_in_parts"] == r["stored_ids"] == r["images"]
    assert r["redo_beyond_lost_max"] == 0 and r["verify_problems"] == []
