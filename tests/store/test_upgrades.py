"""Keeping the cache across library upgrades (featurecache/store/upgrades.py): a set made under other
TensorFlow/Keras/Pillow versions is adopted, checked once on a sample of recomputed rows, and either
kept (within the engines' parity tolerance) or marked stale. The version change is faked in-process;
everything else (extraction, encoder, store) is real: digits, random VGG16 weights, one early tap."""

import h5py
import pytest

from featurecache.runs import compose
from featurecache.store import upgrades
from featurecache.extraction import verify
from featurecache import versions
from featurecache.api import DataOptions
from featurecache.extraction.extract import FeatureSpec, run_extract
from featurecache.settings import RunSettings
from featurecache.store.sets import FeatureStore

SPEC = FeatureSpec("vgg16", "random", ("block1_pool",), pool="avg", size=32)


@pytest.fixture(scope="module")
def small():
    return DataOptions("digits", max_train=24, max_test=12).load()


def extract(ds, cache, lines, recompute_stale=False):
    run = RunSettings(cache, "tensorflow", 32, False, log=lines.append, recompute_stale=recompute_stale)
    return run_extract([ds.train.images, ds.test.images], SPEC, run, ds.native_size())[1]


def fake_pillow(monkeypatch, to="99.0"):
    real = versions.version
    monkeypatch.setattr(versions, "version", lambda p: to if p == "pillow" else real(p))


def sidecars(cache, set_id, kind):
    return sorted((cache / "features" / set_id).glob(f"{kind}-*.json"))


def perturb(cache, set_id, factor=1.05):
    """What a decoder or kernel that now computes differently would leave: stored rows off by 5%."""
    for part in sorted((cache / "features" / set_id).glob("part-*.h5")):
        with h5py.File(part, "r+", locking=False) as f:
            f["features"][...] = f["features"][()] * factor


def test_versions_moved_vectors_unchanged_is_a_checked_hit(small, cache, monkeypatch):
    assert upgrades.TOLERANCE == verify.RTOL
    first = extract(small, cache, [])
    old = first.sets[0]["id"]
    assert first.computed == 36 and first.sets[0]["key"]["libraries"]["pillow"] != "99.0"

    fake_pillow(monkeypatch)
    lines = []
    again = extract(small, cache, lines)
    assert again.computed == 0 and again.sets[0]["id"] == old  # adopted: the old set, not a miss
    assert len(sidecars(cache, old, "checked")) == 1 and not sidecars(cache, old, "stale")
    assert any("pillow" in line and "this is 99.0" in line and "stays valid" in line for line in lines), lines

    mtime = sidecars(cache, old, "checked")[0].stat().st_mtime_ns
    lines = []
    third = extract(small, cache, lines)
    assert third.computed == 0 and third.sets[0]["id"] == old
    assert not any("recomputed" in line for line in lines), lines  # no sample recomputed again
    assert sidecars(cache, old, "checked")[0].stat().st_mtime_ns == mtime
    # fit reads the same adopted set
    run = RunSettings(cache, "tensorflow", 32, False, log=lines.append)
    _, blocks = compose.plan(small, SPEC, run)
    assert [b.set_id for b in blocks] == [old]


@pytest.mark.parametrize("case", ["small-set-by-default", "large-set-with-consent"])
def test_versions_moved_vectors_changed_is_stale(small, cache, monkeypatch, case):
    old = extract(small, cache, []).sets[0]["id"]
    perturb(cache, old)
    fake_pillow(monkeypatch)
    if case == "large-set-with-consent":
        monkeypatch.setenv(upgrades.SMALL_SET_ENV, "10")  # 36 rows count as large
        lines = []
        kept = extract(small, cache, lines)
        assert kept.computed == 0 and kept.sets[0]["id"] == old  # no consent: the stale vectors stay in use
        notice = [line for line in lines if "differ by" in line]
        assert len(notice) == 1 and "pillow" in notice[0] and "this is 99.0" in notice[0]
        assert "--recompute-stale" in notice[0]
        assert len(sidecars(cache, old, "stale")) == 1 and not sidecars(cache, old, "checked")
        lines = []
        redone = extract(small, cache, lines, recompute_stale=True)
    else:
        lines = []
        redone = extract(small, cache, lines)
        assert any("pillow" in line and "differ by" in line and "small set" in line for line in lines), lines
    assert redone.computed == 36 and redone.sets[0]["id"] != old  # afresh, under the running versions' id
    assert redone.sets[0]["key"]["libraries"]["pillow"] == "99.0"
    assert len(sidecars(cache, old, "stale")) == 1
    hit = extract(small, cache, [])
    assert hit.computed == 0 and hit.sets[0]["id"] == redone.sets[0]["id"]


def test_an_ordinary_hit_reads_no_other_set(small, cache, monkeypatch):
    extract(small, cache, [])
    calls = []
    real_all = FeatureStore.all
    monkeypatch.setattr(FeatureStore, "all", lambda self: calls.append(1) or real_all(self))  # a spy
    lines = []
    hit = extract(small, cache, lines)
    assert hit.computed == 0 and calls == [] and lines == []
    assert not sidecars(cache, hit.sets[0]["id"], "checked")


def test_the_cli_recompute_stale_flag_reaches_extraction(small, cache, monkeypatch):
    """`featurecache extract --recompute-stale` through the real command (options -> RunSettings ->
    extraction): a large stale set is recomputed, where without the flag its vectors stay in use."""
    import json

    from typer.testing import CliRunner

    from featurecache.cli.commands import app

    old = extract(small, cache, []).sets[0]["id"]
    perturb(cache, old)
    fake_pillow(monkeypatch)
    monkeypatch.setenv(upgrades.SMALL_SET_ENV, "10")  # 36 rows count as large: only consent recomputes
    args = ["extract", "--data", "digits", "--max-train", "24", "--max-test", "12", "--model", "vgg16",
            "--weights", "random", "--layer", "block1_pool", "--pool", "avg", "--size", "32",
            "--engine", "tensorflow", "--batch-size", "32", "--cache-dir", str(cache), "--json"]
    runner = CliRunner()
    kept = runner.invoke(app, args)
    assert kept.exit_code == 0, kept.output
    out = json.loads(kept.stdout)
    assert out["computed"] == 0 and out["sets"][0]["id"] == old
    redone = runner.invoke(app, [*args, "--recompute-stale"])
    assert redone.exit_code == 0, redone.output
    out = json.loads(redone.stdout)
    assert out["computed"] == 36 and out["sets"][0]["id"] != old
    assert out["sets"][0]["key"]["libraries"]["pillow"] == "99.0"
