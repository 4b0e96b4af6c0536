"""`cache prune`: least recently used first, a size bound, and a set being written is never removed."""

import json
import os
import time

import numpy as np

from conftest import run_cli
from featurecache.engines.graphs import OWNER
from featurecache.fingerprint import key_id
from featurecache.store.prune import parse_age, parse_size, plan
from featurecache.store.sets import FeatureStore


def _graph(cache, name: str, mb: float, age_days: float) -> None:
    folder = cache / "engines" / name
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"\0" * int(mb * 1e6))
    (folder / OWNER).write_text("")  # a graph's marker: prune removes only folders it made
    then = time.time() - age_days * 86400
    for p in (*folder.iterdir(), folder):
        os.utime(p, (then, then))


def _set(cache, k: int, rows: int, age_days: float):
    fs = FeatureStore(cache).open(key_id({"k": k}), {"k": k}, 256)
    with fs.lock():
        fs.append([f"{i:032x}" for i in range(rows)], np.ones((rows, 256), np.float32))
    then = time.time() - age_days * 86400
    for p in fs.folder.rglob("*"):
        os.utime(p, (then, then))
    os.utime(fs.folder, (then, then))
    return fs


def test_sizes_and_ages_parse_as_people_write_them():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("500mb") == 500_000_000 and parse_size("2048") == 2048
    assert parse_age("30d") == 30 * 86400 and parse_age("12h") == 43200 and parse_age("2w") == 14 * 86400


def test_lru_order_and_size_bound(cache):
    _graph(cache, "old", 3, age_days=40)
    _graph(cache, "middle", 3, age_days=10)
    _graph(cache, "new", 3, age_days=1)
    gone, kept = plan(cache, max_size=int(6.5e6), older_than=None, features=False)
    assert [e.id for e in gone] == ["old"] and [e.id for e in kept] == ["middle", "new"]
    gone, _ = plan(cache, max_size=None, older_than=parse_age("30d"), features=False)
    assert [e.id for e in gone] == ["old"]
    out = json.loads(run_cli("cache", "prune", "--max-size", "4MB", "--json", cache_dir=cache, check=True).stdout)
    assert [e["id"] for e in out["removed"]] == ["old", "middle"] and out["freed_bytes"] == 6_000_000
    assert sorted(p.name for p in (cache / "engines").iterdir()) == ["new"]
    listed = json.loads(run_cli("cache", "ls", "--graphs", "--json", cache_dir=cache, check=True).stdout)
    assert [g["id"] for g in listed] == ["new"] and listed[0]["bytes"] == 3_000_000


def test_feature_sets_only_when_asked_and_never_one_being_written(cache):
    idle = _set(cache, 1, 100, age_days=50)
    busy = _set(cache, 2, 100, age_days=60)
    _graph(cache, "g", 1, age_days=70)
    gone, _ = plan(cache, max_size=0, older_than=None, features=False)
    assert [e.kind for e in gone] == ["graph"]  # feature sets are hours of work: only with --features
    with busy.lock():  # a writer holds this one
        proc = run_cli("cache", "prune", "--older-than", "30d", "--features", "--json", cache_dir=cache)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {e["id"] for e in out["removed"]} == {"g", idle.id}
    assert [e["id"] for e in out["skipped"]] == [busy.id] and "being extracted" in out["skipped"][0]["reason"]
    assert busy.folder.is_dir() and not idle.folder.exists()
    assert FeatureStore(cache).get(busy.id) is not None and len(FeatureStore(cache).get(busy.id)) == 100


def test_prune_without_a_bound_is_one_line(cache):
    proc = run_cli("cache", "prune", cache_dir=cache)
    assert proc.returncode == 2 and "--max-size" in proc.stderr and "Traceback" not in proc.stderr
