"""Fit-time composition: several taps in one fit and pooling as a view of a stored map, with no network."""

import json

import numpy as np
import pytest

from conftest import error_line, feats, fit_run, run_cli, write_digit_folder
from featurecache.api import DataOptions
from featurecache.errors import FeatureCacheError
from featurecache.heads import L2Normalizer
from featurecache.settings import FeatureSpec

FEATS = feats(64)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_digit_folder(root, 16, classes=(0, 1, 2, 3))
    return root


@pytest.fixture(scope="module")
def stored(photos, tmp_path_factory):
    """block3_pool and block4_pool of vgg16 at 64 px, stored flattened (the default)."""
    cache = tmp_path_factory.mktemp("cache")
    run_cli("extract", "--data", photos, *FEATS, "--layer", "block3_pool", "--layer", "block4_pool", "--quiet",
            cache_dir=cache, check=True)
    return cache


def test_two_taps_max2x2_fit_from_the_cache_with_no_forward_pass(photos, stored, monkeypatch):
    from featurecache.encoding import encoder
    from featurecache.runs.fit import fit
    from featurecache.settings import HeadSpec, RunSettings

    passes = []
    original = encoder.Encoder.encode_pixels
    monkeypatch.setattr(encoder.Encoder, "encode_pixels", lambda self, px: passes.append(len(px)) or original(self, px))
    spec = FeatureSpec("vgg16", "random", ("block3_pool", "block4_pool"), "max2x2", 64)
    record = fit(DataOptions(str(photos)), spec, RunSettings(stored, log=lambda m: None), HeadSpec("linsvc"))
    assert passes == []  # every column came from the stored flattened maps
    # block3_pool 8x8x256 -> 4x4x256 = 4,096; block4_pool 4x4x512 -> 2x2x512 = 2,048
    assert record["dims"] == 6144 and [b["dims"] for b in record["blocks"]] == [4096, 2048]
    assert [b["source"] for b in record["blocks"]] == ["derived", "derived"]
    assert record["normalize"] == "l2-per-tap" and record["layers"] == ["block3_pool", "block4_pool"]
    assert record["features"] == "vgg16/block3_pool+block4_pool/max2x2 64px"
    # the CLI says the same, in the card's own words
    out = fit_run("--data", photos, *FEATS, "--layer", "block3_pool", "--layer", "block4_pool", "--pool", "max2x2",
                  "--head", "linsvc", cache=stored)
    assert out["dims"] == 6144 and out["test_accuracy"] > 0.5


def test_predict_and_the_fit_compose_rows_alike(photos, stored):
    """A composed run's predictions on new files equal its head on the rows the fit composed."""
    from featurecache.runs.fit import fit
    from featurecache.runs.predict import predict_files
    from featurecache.settings import HeadSpec, RunSettings
    from featurecache.runs.record import load_head

    data = DataOptions(str(photos))
    spec = FeatureSpec("vgg16", "random", ("block4_pool", "block3_pool"), "grid2", 64)
    record = fit(data, spec, RunSettings(stored, log=lambda m: None), HeadSpec("logreg"))
    _, pipeline = load_head(stored, record["run_id"])
    ds = data.load()
    files = [ds.test.images.name(k) for k in range(len(ds.test))]
    from featurecache.runs import compose
    from featurecache.settings import RunSettings

    got = predict_files([photos / f for f in files] if not files[0].startswith("/") else files, record["run_id"],
                        RunSettings(stored), top=4)

    want = compose.gather(ds, spec, RunSettings(stored))
    proba = pipeline.predict_proba(want.x_test)
    labels = [record["class_names"][i] for i in pipeline.predict(want.x_test)]
    assert [r["label"] for r in got] == labels
    np.testing.assert_allclose([r["score"] for r in got], proba.max(axis=1), rtol=1e-5)


def test_view_needs_the_flattened_map_and_says_which_pooling_is_stored(photos, tmp_path):
    run_cli("extract", "--data", photos, *FEATS, "--layer", "block4_pool", "--pool", "avg", "--quiet",
            cache_dir=tmp_path, check=True)
    proc = run_cli("fit", "--data", photos, *FEATS, "--layer", "block4_pool", "--pool", "max2x2", cache_dir=tmp_path)
    line = error_line(proc)
    assert proc.returncode == 2 and "block4_pool is stored only avg-pooled" in line and "--pool flatten" in line
    ok = fit_run("--data", photos, *FEATS, "--layer", "block4_pool", "--pool", "avg", cache=tmp_path)
    assert ok["dims"] == 512  # the stored avg set is used as it is
    bad = run_cli("fit", "--data", photos, *FEATS, "--pool", "median", cache_dir=tmp_path)
    assert bad.returncode == 2 and "--pool median" in error_line(bad)


def test_taps_that_left_out_different_images_are_refused_naming_both(photos, tmp_path):
    from featurecache.runs import compose
    from featurecache.settings import RunSettings
    from featurecache.store.sets import FeatureStore

    run_cli("extract", "--data", photos, *FEATS, "--layer", "block3_pool", "--layer", "block4_pool", "--quiet",
            cache_dir=tmp_path, check=True)
    ds = DataOptions(str(photos)).load()
    spec = FeatureSpec("vgg16", "random", ("block3_pool", "block4_pool"), "flatten", 64)
    first = compose.gather(ds, spec, RunSettings(tmp_path))
    FeatureStore(tmp_path).get(first.blocks[1].set_id).record_skipped({ds.train.images.ids[0]: "unreadable"})
    with pytest.raises(FeatureCacheError, match=f"feature sets {first.blocks[0].set_id} and "
                                                f"{first.blocks[1].set_id} left out different"):
        compose.gather(DataOptions(str(photos)).load(), spec, RunSettings(tmp_path))


def test_l2_per_tap_gives_each_tap_unit_norm_then_the_row():
    x = np.hstack([np.full((3, 4), 10.0, np.float32), np.full((3, 2), 0.1, np.float32)])
    out = L2Normalizer(blocks=(4, 2)).fit_transform(x.copy())
    np.testing.assert_allclose(np.linalg.norm(out[:, :4], axis=1), np.sqrt(0.5), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out[:, 4:], axis=1), np.sqrt(0.5), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="add up to 5 columns"):
        L2Normalizer(blocks=(4, 1)).fit_transform(x)


def test_augmented_views_are_training_rows_of_their_own_set_and_reach_test_rows_only_with_tta(photos, tmp_path):
    from featurecache.fingerprint import feature_key, key_id
    from featurecache.runs.predict import predict_files
    from featurecache.runs.record import load_head

    common = ["--data", photos, *FEATS, "--layer", "block4_pool", "--pool", "avg"]
    ex = json.loads(run_cli("extract", *common, "--augment", "hflip", "--json", cache_dir=tmp_path, check=True).stdout)
    ds = DataOptions(str(photos)).load()
    assert ex["views"]["hflip"]["images"] == len(ds.train)  # the test images get no view without --tta
    hflip_set = ex["views"]["hflip"]["sets"][0]["id"]
    assert hflip_set != ex["sets"][0]["id"]
    key = feature_key("m", "w", "l", "avg", 64, "nearest", "caffe")
    assert "view" not in key and key_id(key) != key_id(feature_key("m", "w", "l", "avg", 64, "nearest", "caffe",
                                                                     view="hflip"))
    fit = fit_run(*common, "--augment", "hflip", cache=tmp_path)
    assert fit["n_train"] == 2 * len(ds.train)
    tta = run_cli("fit", *common, "--augment", "hflip", "--tta", "--json", cache_dir=tmp_path)
    assert tta.returncode == 2 and "no cached features" in error_line(tta) and "--augment hflip" in tta.stderr
    run_cli("extract", *common, "--augment", "hflip", "--tta", "--quiet", cache_dir=tmp_path, check=True)
    record = fit_run(*common, "--augment", "hflip", "--tta", "--head", "logreg", cache=tmp_path)
    saved, pipeline = load_head(tmp_path, record["run_id"])
    assert saved.tta and saved.augment == ("hflip",) and saved.views == ["", "hflip"]
    # predict averages the image's and its mirror's probabilities, as the fit's test evaluation did
    files = [photos / ds.test.images.name(k) for k in range(3)]
    from featurecache.runs.predict import features_for_files
    from featurecache.settings import RunSettings

    got = predict_files(files, record["run_id"], RunSettings(tmp_path))
    xs = [features_for_files(files, saved, RunSettings(tmp_path), view=v) for v in ("", "hflip")]
    want = (pipeline.predict_proba(xs[0]) + pipeline.predict_proba(xs[1])) / 2
    np.testing.assert_allclose([r["score"] for r in got], want.max(axis=1), rtol=1e-5)
    assert "--tta" in error_line(run_cli("fit", *common, "--tta", cache_dir=tmp_path))
    serve = run_cli("serve", "--run", record["run_id"], cache_dir=tmp_path)
    assert serve.returncode == 2 and "--tta" in error_line(serve)


def test_a_matrix_over_max_memory_streams_with_sgd_and_is_refused_in_one_line_otherwise(photos, stored):
    common = ["--data", photos, *FEATS, "--layer", "block3_pool", "--layer", "block4_pool", "--pool", "max2x2"]
    # 64 images x 6,144 float32 = 1.6 MB: 400 kB of memory makes chunks of 256 rows... all rows in one
    # chunk here, so the budget below is what forces the streamed path, not the chunk count
    streamed = fit_run(*common, "--head", "sgd", "--max-memory", "400kB", cache=stored)
    from featurecache.runs.record import load_head

    record, _ = load_head(stored, streamed["run_id"])
    assert record.streamed["epochs"] == 5 and record.streamed["max_memory"] == 400_000
    in_memory = fit_run(*common, "--head", "sgd", cache=stored)
    assert load_head(stored, in_memory["run_id"])[0].streamed is None
    assert streamed["test_accuracy"] > 0.5 and in_memory["test_accuracy"] > 0.5  # 16 test images: far above 0.25
    refused = run_cli("fit", *common, "--head", "linsvc", "--max-memory", "400kB", cache_dir=stored)
    line = error_line(refused)
    assert refused.returncode == 2 and "over --max-memory 0.4 MB" in line and "--head sgd" in line
    assert "--pca" in line and "--max-train" in line
