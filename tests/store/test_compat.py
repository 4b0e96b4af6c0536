"""The cache stays readable across featurecache's own changes: feature sets, converted graphs and runs written
by main at b889c22, before the renovation (issue 21), are found and used by today's code. The fixture and the
commands that made it: tests/fixtures/cache-b889c22/ (MADE.md)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "cache-b889c22"
DATA = ["--data", "digits", "--max-train", "30", "--max-test", "10", "--model", "vgg16", "--weights", "hed-bsds",
        "--size", "32"]
TAPS = {"e1.json": ["--layer", "block3_pool", "--pool", "avg"], "e2.json": ["--layer", "block4_pool"]}
RUNS = [json.loads((FIXTURE / f).read_text())["run_id"] for f in ("f1.json", "f2.json")]


@pytest.fixture
def old_cache(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE / "cache", tmp_path / "cache"))


def test_old_feature_sets_are_cache_hits(old_cache):
    for made, tap in TAPS.items():
        out = json.loads(run_cli("extract", *DATA, *tap, "--engine", "onnxruntime", "--json", cache_dir=old_cache,
                                 check=True).stdout)
        before = json.loads((FIXTURE / made).read_text())
        assert out["cache_hit"] and out["computed"] == 0
        assert [s["id"] for s in out["sets"]] == [s["id"] for s in before["sets"]]


def test_old_runs_are_reported_and_predict_as_they_did(old_cache, tmp_path):
    report = run_cli("report", "--format", "csv", cache_dir=old_cache, check=True).stdout
    assert all(run_id in report for run_id in RUNS)
    graphs = sorted(p.name for p in (old_cache / "engines").iterdir())
    images = sorted((FIXTURE / "images").glob("*.png"))  # their rows are in the old sets: predicted then
    new = tmp_path / "new.png"  # an image the old cache never saw: its rows need the old graphs
    Image.fromarray(255 - np.asarray(Image.open(images[0]))).save(new)
    for run_id in RUNS:
        out = json.loads(run_cli("predict", "--run", run_id, *images, new, "--format", "json", "--engine",
                                 "onnxruntime", cache_dir=old_cache, check=True).stdout)
        before = json.loads((FIXTURE / f"pred-{run_id}.json").read_text())
        assert [(Path(r["file"]).name, r["label"]) for r in out[:-1]] == \
            [(Path(r["file"]).name, r["label"]) for r in before]
        np.testing.assert_allclose([r["score"] for r in out[:-1]], [r["score"] for r in before], atol=1e-5)
    # each run's graph was found under the id old code gave it, and its model.onnx (not checked in) rebuilt there
    assert sorted(p.name for p in (old_cache / "engines").iterdir()) == graphs
    assert all((old_cache / "engines" / g / "model.onnx").is_file() for g in graphs)


def test_fit_on_old_sets_needs_no_extraction(old_cache):
    out = json.loads(run_cli("fit", *DATA, "--layer", "block4_pool", "--pool", "max2x2", "--head", "logreg", "--C", "1",
                             "--json", cache_dir=old_cache, check=True).stdout)
    before = json.loads((FIXTURE / "f2.json").read_text())
    assert out["test_accuracy"] == before["test_accuracy"] and out["dims"] == before["dims"]
