"""The cache against careless and concurrent use (issue 25): `cache prune` never takes a graph a running
process has in use nor a folder featurecache did not make, a graph removed anyway is converted again, a
read-only cache reads without writing and refuses writes in one line, and `cache rm` of a linked set or of an
empty prefix answers in one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, error_line, read_line, run_cli
from featurecache.engines.graphs import OWNER, Graph
from featurecache.fingerprint import key_id
from featurecache.store.sets import FeatureStore

SMALL = ["--data", "digits", "--max-train", "30", "--max-test", "10", "--model", "vgg16", "--weights", "random",
         "--size", "32", "--layer", "block2_pool", "--engine", "onnxruntime"]
TIMEOUT = 300  # seconds: a hung child must fail the test, not hang it

# A process that has a cached graph in use, through the code every command uses (engines.make_forward): it
# says "ready" once the graph is loaded, then runs it on a line from stdin and says "ran".
HOLDER = """
import json, sys
from pathlib import Path
import numpy as np
from featurecache.engines import make_forward
from featurecache.engines.graphs import Graph
folder = Path(sys.argv[1])
p = json.loads((folder / "meta.json").read_text())
fwd = make_forward("onnxruntime", None, Graph(p["model"], p["weights"], p["size"], tuple(p["taps"])),
                   folder.parent.parent)
print("ready", flush=True)
sys.stdin.readline()
fwd(np.zeros((2, p["size"], p["size"], 3), np.float32))
print("ran", flush=True)
"""


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    """A cache made by a real extract (a converted graph, a feature set) and a fit (a run)."""
    cache = tmp_path_factory.mktemp("safety") / "cache"
    run_cli("extract", *SMALL, cache_dir=cache, check=True)
    run_cli("fit", *SMALL, "--head", "logreg", cache_dir=cache, check=True)
    return cache


def copy_of(extracted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(extracted, tmp_path / "cache", symlinks=True))


def graph_folders(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "engines").iterdir() if p.is_dir())


def prune(cache: Path, *args) -> dict:
    return json.loads(run_cli("cache", "prune", "--max-size", "0", "--json", *args, cache_dir=cache, check=True).stdout)


def start_holder(folder: Path) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    line = read_line(proc, "the graph holder", TIMEOUT)  # once the child has the graph in use, or has died
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"holder did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc


# ---- finding 2: prune vs a running process ---------------------------------------------------------------
def test_prune_never_takes_a_graph_in_use_and_a_dead_process_does_not_hold_it(extracted, tmp_path):
    """Red team: `featurecache extract ... & featurecache cache prune --max-size 0` deleted the graph just after
    the extract converted it; the extract died with onnxruntime's raw NO_SUCHFILE traceback."""
    cache = copy_of(extracted, tmp_path)
    (folder,) = graph_folders(cache)
    holder = start_holder(folder)
    try:
        out = prune(cache)
        assert [e["id"] for e in out["skipped"]] == [folder.name] and "in use" in out["skipped"][0]["reason"]
        assert (folder / "model.onnx").is_file() and folder.name not in [e["id"] for e in out["removed"]]
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert read_line(holder, "the graph holder", TIMEOUT).strip() == "ran"  # the process using it carries on
        assert holder.wait(timeout=TIMEOUT) == 0, holder.stderr.read()[-2000:]
    finally:
        holder.kill()
    killed = start_holder(folder)
    killed.send_signal(signal.SIGKILL)  # a process killed while using the graph leaves no marker behind
    killed.wait(timeout=TIMEOUT)
    out = prune(cache)
    assert [e["id"] for e in out["removed"]] == [folder.name] and not out["skipped"]
    assert not folder.exists() and not list((cache / "engines").glob(".removing-*"))


def test_a_graph_removed_between_conversion_and_loading_is_converted_again(tmp_path):
    """Red team: the graph an `extract` had just converted was deleted (`cache prune` then took no lock) before
    ONNX Runtime loaded it: `onnxruntime...NoSuchFile: [ONNXRuntimeError] : 3 : NO_SUCHFILE`. A remover that
    ignores the in-use lock (a user's `rm -rf`, an older featurecache) can still do it: the load converts again."""
    from featurecache.backbones import get_backbone
    from featurecache.backbones.build import build_model
    from featurecache.backbones.weights import resolve_weights
    from featurecache.engines import graphs, runtimes

    backbone = get_backbone("vgg16")
    weights = resolve_weights(backbone, "random")
    graph = Graph("vgg16", weights.id, 32, ("block2_pool",))
    path = graphs.convert("onnxruntime", lambda: build_model(backbone, weights, 32), graph, tmp_path)
    shutil.rmtree(path.parent)  # what the old prune did, between conversion and loading
    forward = runtimes.forward("onnxruntime", path, list(graph.taps))
    (out,) = forward(np.zeros((2, 32, 32, 3), np.float32))
    assert out.shape == (2, 8, 8, 128) and path.is_file() and (path.parent / OWNER).is_file()


# ---- finding 3: only what is provably featurecache's -------------------------------------------------------
def test_prune_leaves_folders_featurecache_did_not_make(tmp_path):
    """Red team: `mkdir ~/.cache/featurecache/engines/my-thesis && featurecache cache prune --max-size 0`
    removed engines/my-thesis with the graphs."""
    cache = tmp_path / "cache"
    old_parts = Graph("vgg16", "w", 32, ("block2_pool",)).parts()
    old = cache / "engines" / key_id(old_parts, spacing=True)  # converted by main at b889c22: no marker yet
    new = cache / "engines" / "0123456789abcdef"
    thesis, lookalike = cache / "engines" / "my-thesis", cache / "engines" / "notes"
    for folder in (old, new, thesis, lookalike):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"\0" * 1000)
    (old / "meta.json").write_text(json.dumps(old_parts, indent=1))
    (new / OWNER).write_text("a converted graph of featurecache's\n")
    (lookalike / "meta.json").write_text(json.dumps({"title": "my notes", "taps": []}))
    (thesis / "chapter1.tex").write_text("\\chapter{Introduction}\n")
    then = time.time() - 90 * 86400
    os.utime(thesis / "chapter1.tex", (then, then))
    out = prune(cache)
    assert sorted(e["id"] for e in out["removed"]) == sorted([old.name, new.name])
    assert sorted(e["id"] for e in out["skipped"]) == ["my-thesis", "notes"]
    assert all("not featurecache's" in e["reason"] for e in out["skipped"])
    assert (thesis / "chapter1.tex").read_text() == "\\chapter{Introduction}\n" and (lookalike / "model.onnx").is_file()
    assert sorted(p.name for p in (cache / "engines").iterdir()) == ["my-thesis", "notes"]
    listed = json.loads(run_cli("cache", "ls", "--graphs", "--json", cache_dir=cache, check=True).stdout)
    assert listed == []  # someone else's folders are not listed as graphs either


# ---- finding 6b: a read-only cache ---------------------------------------------------------------------------
def read_only(cache: Path, *args):
    """`featurecache ARGS` with `cache` read-only: as a shared cache mounted read-only is. Root (these tests'
    user here) writes through permission bits, so as root the cache is bind-mounted read-only in a private
    mount namespace (unshare); any other user gets the permission bits taken away."""
    cmd = [sys.executable, "-m", "featurecache.cli", *map(str, args)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", FEATURECACHE_DIR=str(cache))
    if os.geteuid() == 0:
        cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"',
               str(cache), *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT)
    modes = {p: p.stat().st_mode for p in [cache, *cache.rglob("*")] if not p.is_symlink()}
    for p, m in modes.items():
        p.chmod(m & ~0o222)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT)
    finally:
        for p, m in modes.items():
            p.chmod(m)


def test_a_read_only_cache_reads_without_writing_and_refuses_writes_in_one_line(extracted, tmp_path):
    """Red team, the cache mounted read-only (`mount -o remount,bind,ro ~/.cache/featurecache`): predict of a new
    image, extract, `cache rm`, `cache repair` and `cache prune` ended in PermissionError/OSError tracebacks
    (predict took the set's write lock to store the new image's vector)."""
    cache = copy_of(extracted, tmp_path)
    (sid,) = [p.name for p in (cache / "features").iterdir()]
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    hit = read_only(cache, "extract", *SMALL, "--json")  # every vector cached, the graph loaded read-only
    assert hit.returncode == 0, hit.stderr[-2000:]
    assert json.loads(hit.stdout)["cache_hit"]
    ls = read_only(cache, "cache", "ls", "--json")
    assert ls.returncode == 0 and [s["id"] for s in json.loads(ls.stdout)] == [sid]
    verify = read_only(cache, "cache", "verify")
    assert verify.returncode == 0 and "ok" in verify.stdout, verify.stderr[-2000:]
    new = read_only(cache, "extract", *[a if a != "30" else "40" for a in SMALL])  # 10 images not in the set yet
    run_ = (cache / "runs").glob("*/run.json")
    run_id = json.loads(next(run_).read_text())["run_id"]
    image = tmp_path / "new.png"
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(image)
    predict_new = read_only(cache, "predict", "--run", run_id, image)
    writes = {"extract": new, "predict": predict_new, "rm": read_only(cache, "cache", "rm", sid),
              "repair": read_only(cache, "cache", "repair", sid),
              "prune": read_only(cache, "cache", "prune", "--max-size", "0", "--features")}
    for name, proc in writes.items():
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, f"{name}: {proc.stderr[-2000:]}"
        line = error_line(proc)
        assert "not writable" in line and str(cache) in line and "--cache-dir" in line, f"{name}: {line}"
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before  # nothing written, nothing removed


# ---- low: cache rm ------------------------------------------------------------------------------------------
def a_set(cache: Path, k: int):
    fs = FeatureStore(cache).open(key_id({"k": k}), {"k": k}, 4)
    with fs.lock():
        fs.append([f"{i:032x}" for i in range(3)], np.ones((3, 4), np.float32))
    return fs


def test_cache_rm_of_a_linked_set_removes_the_link_not_what_it_points_to(tmp_path):
    """Red team: `ln -s /shared/features/<id> ~/.cache/featurecache/features/<id> && featurecache cache rm <id>`
    renamed the link, then crashed: `OSError: Cannot call rmtree on a symbolic link`."""
    shared = a_set(tmp_path / "shared", 1)
    cache = tmp_path / "cache"
    (cache / "features").mkdir(parents=True)
    (cache / "features" / shared.id).symlink_to(shared.folder)
    proc = run_cli("cache", "rm", shared.id[:6], cache_dir=cache)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"removed {shared.id}" in proc.stdout and str(shared.folder) in proc.stdout
    assert list((cache / "features").iterdir()) == []  # neither the link nor a renamed leftover
    assert len(FeatureStore(tmp_path / "shared").get(shared.id)) == 3  # what it pointed to is intact


def test_cache_rm_refuses_an_empty_prefix(tmp_path):
    """Red team: `featurecache cache rm ""` removed the cache's only feature set ("" is a prefix of every id)."""
    fs = a_set(tmp_path, 1)
    proc = run_cli("cache", "rm", "", cache_dir=tmp_path)
    assert proc.returncode == 2 and "empty" in error_line(proc) and "cache ls" in error_line(proc)
    assert FeatureStore(tmp_path).get(fs.id) is not None
