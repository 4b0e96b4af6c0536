"""fit / report / predict end to end through the CLI, on real images with seeded random VGG16 weights."""

import json

import numpy as np
import pytest

from conftest import error_line, run_cli, write_digit_folder
from featurecache.api import DataOptions, dataset_features
from featurecache.extract import FeatureSpec
from featurecache.runs import load_head

HEADS = ("linsvc", "svc", "logreg", "mlp", "ridge", "sgd", "knn", "rf")
FEATS = ["--model", "vgg16", "--weights", "random", "--size", "32"]


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory):
    """A folder dataset of real digit PNGs (4 classes) with its features extracted once."""
    root = tmp_path_factory.mktemp("fit")
    data, cache = root / "digits", root / "cache"
    write_digit_folder(data, 20, classes=(0, 1, 2, 3))
    run_cli("extract", "--data", data, *FEATS, "--quiet", cache_dir=cache, check=True)
    return data, cache


def fit_json(data, cache, *args):
    out = run_cli("fit", "--data", data, *FEATS, *args, "--json", cache_dir=cache, check=True).stdout
    return json.loads(out)


def test_every_head_fits_from_the_cache(folder_cache):
    data, cache = folder_cache
    runs = {}
    for head in HEADS:
        r = fit_json(data, cache, "--head", head)
        assert {"run_id", "head", "train_accuracy", "test_accuracy", "fit_seconds"} <= set(r)
        assert r["head"] == head and 0 <= r["test_accuracy"] <= 1 and r["fit_seconds"] >= 0
        runs[head] = r
    # Real digit images, 4 classes: a linear head on 512-d codes is far above chance (25%).
    assert runs["linsvc"]["test_accuracy"] >= 0.7 and runs["linsvc"]["train_accuracy"] >= 0.9

    table = run_cli("report", "--format", "csv", cache_dir=cache, check=True)
    listed = {line.split(",")[0] for line in table.stdout.splitlines()[1:]}
    assert {r["run_id"] for r in runs.values()} <= listed
    assert (cache / "runs" / "report.png").stat().st_size > 10_000
    md = run_cli("report", "--format", "markdown", cache_dir=cache, check=True).stdout
    assert md.startswith("| run_id | method |") and "+ linsvc" in md
    assert (cache / "runs" / runs["svc"]["run_id"] / "confusion.png").is_file()


def test_grid_search_reports_each_setting_and_refits_best(folder_cache):
    data, cache = folder_cache
    r = fit_json(data, cache, "--head", "logreg", "--grid", "C=0.1,1,10")
    assert [g["params"]["C"] for g in r["grid"]] == [0.1, 1, 10]
    record, pipeline = load_head(cache, r["run_id"])
    best = max(r["grid"], key=lambda g: g["mean"])["params"]["C"]
    assert pipeline.get_params()["head__C"] == best


def test_predict_gives_the_labels_the_head_gives_cached_features(folder_cache):
    data, cache = folder_cache
    r = fit_json(data, cache, "--head", "logreg")
    record, pipeline = load_head(cache, r["run_id"])
    opts = DataOptions(str(data))
    ds = opts.load()
    _, _, x_test = dataset_features(ds, FeatureSpec("vgg16", "random", size=32), cache, opts)
    want = [record["class_names"][i] for i in pipeline.predict(x_test)]
    files = ds.test.images.paths
    out = run_cli("predict", "--run", r["run_id"], *files, "--format", "json", "--top", "2",
                  cache_dir=cache, check=True).stdout
    rows = json.loads(out)
    assert [row["label"] for row in rows] == want
    assert rows[0]["score_kind"] == "probability" and len(rows[0]["top"]) == 2
    assert abs(sum(t["score"] for t in rows[0]["top"])) <= 1.0 + 1e-6
    csv_out = run_cli("predict", "--run", r["run_id"], files[0], "--format", "csv", cache_dir=cache, check=True)
    assert csv_out.stdout.splitlines()[1].split(",")[1] == want[0]


def test_linsvc_predict_reports_decision_scores(folder_cache, tmp_path):
    data, cache = folder_cache
    r = fit_json(data, cache, "--head", "linsvc")
    # A brand-new image (not in the cache), RGBA and larger than the training images.
    from PIL import Image

    img = np.zeros((40, 40, 4), np.uint8)
    img[8:32, 18:22, :3] = 255
    img[..., 3] = 255
    Image.fromarray(img).save(tmp_path / "new.png")
    rows = json.loads(run_cli("predict", "--run", r["run_id"], tmp_path / "new.png", "--format", "json",
                              cache_dir=cache, check=True).stdout)
    assert rows[0]["score_kind"] == "decision" and rows[0]["label"] in ("digit0", "digit1", "digit2", "digit3")


@pytest.mark.parametrize("args, words", [
    (["fit", "--data", "digits", *FEATS, "--layer", "block4_pool"], "run `featurecache extract --data digits"),
    (["fit", "--data", "{data}", *FEATS, "--head", "linsvc", "--kernel", "rbf"], "--kernel"),
    (["fit", "--data", "{data}", *FEATS, "--head", "logreg", "--grid", "nonsense=1,2"], "nonsense"),
    (["fit", "--data", "{data}", *FEATS, "--head", "boosting"], "boosting"),
    (["predict", "--run", "no-such-run", "x.png"], "--run no-such-run: no such run"),
    (["report", "--format", "xml"], "--format xml"),
])
def test_bad_fit_input_gives_one_line(folder_cache, args, words):
    data, cache = folder_cache
    proc = run_cli(*[a.format(data=data) if isinstance(a, str) else a for a in args], cache_dir=cache)
    assert proc.returncode == 2 and words in error_line(proc)


def test_predict_names_a_non_image(folder_cache, tmp_path):
    data, cache = folder_cache
    r = fit_json(data, cache, "--head", "ridge")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    proc = run_cli("predict", "--run", r["run_id"], bad, cache_dir=cache)
    assert proc.returncode == 2 and "notes.png: not a readable image" in error_line(proc)


def test_changed_head_file_is_refused(folder_cache):
    data, cache = folder_cache
    r = fit_json(data, cache, "--head", "knn")
    head = cache / "runs" / r["run_id"] / "head.joblib"
    head.write_bytes(head.read_bytes() + b"\0")
    proc = run_cli("predict", "--run", r["run_id"], data / "digit0" / next(iter(sorted(
        p.name for p in (data / "digit0").iterdir()))), cache_dir=cache)
    assert proc.returncode == 2 and "hash mismatch" in error_line(proc)


def test_sweep_fits_each_tap_and_recommends(tmp_path):
    cache = tmp_path / "cache"
    out = run_cli("sweep", "--data", "digits", "--max-train", "120", "--max-test", "60", "--model", "vgg16",
                  "--weights", "random", "--layers", "block3_pool,block5_pool", "--sizes", "32",
                  "--heads", "linsvc,logreg", "--json", cache_dir=cache, check=True).stdout
    result = json.loads(out)
    rows = result["rows"]
    assert [(r["layer"], r["head"]) for r in rows] == [("block3_pool", "linsvc"), ("block3_pool", "logreg"),
                                                       ("block5_pool", "linsvc"), ("block5_pool", "logreg")]
    assert {r["dims"] for r in rows} == {4096, 512}
    best = max(rows, key=lambda r: r["test_accuracy"])
    assert result["recommendation"].startswith(f"recommended: --layer {best['layer']} --size 32")
    assert (cache / "sweep.png").stat().st_size > 10_000
    ledger = run_cli("report", "--format", "csv", cache_dir=cache, check=True).stdout
    assert len(ledger.strip().splitlines()) == 1 + 4  # every sweep fit is an ordinary run
