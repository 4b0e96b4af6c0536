"""The memoized extractor on real images (digits) with seeded random VGG16 weights (plumbing)."""

import json
import re
import shutil

import numpy as np
import pytest

from conftest import error_line, run_cli, run_python, write_digit_folder
from featurecache.api import DataOptions, RunSettings, dataset_features, extract_dataset
from featurecache.data.datasets import ArrayImages, Dataset, Split, load_dataset
from featurecache.errors import FeatureCacheError
from featurecache.extraction.extract import FeatureSpec, resolve
from featurecache.store.sets import FeatureStore

SPEC = FeatureSpec("vgg16", "random", ("block5_pool",), size=32)


@pytest.fixture(scope="module")
def small():
    return DataOptions("digits", max_train=60, max_test=30).load()


def test_extract_then_cache_hit_then_second_layer(small, cache):
    _, s1 = extract_dataset(small, SPEC, RunSettings(cache, batch_size=32, progress=False))
    assert s1.computed == 90 and s1.sets[0]["dims"] == 512 and s1.size == 32 and s1.engine is not None
    assert len(FeatureStore(cache).get(s1.sets[0]["id"])) == 90
    default_size = resolve(FeatureSpec("vgg16", "random"), small.native_size(), cache)
    assert default_size.size == 32 and "upsizing to 32x32" in default_size.notices[0]

    _, s2 = extract_dataset(small, SPEC, RunSettings(cache, batch_size=32, progress=False))
    assert s2.cache_hit and s2.computed == 0 and s2.sets[0]["reused"] == 90
    assert s2.engine is None  # nothing ran the network

    two_more = FeatureSpec("vgg16", "random", ("block5_pool", "block4_pool", "block3_pool"), size=32)
    _, s3 = extract_dataset(small, two_more, RunSettings(cache, batch_size=32, progress=False))
    by_layer = {s["layer"]: s for s in s3.sets}
    assert by_layer["block5_pool"]["computed"] == 0
    assert by_layer["block4_pool"]["computed"] == 90 and by_layer["block3_pool"]["computed"] == 90
    assert by_layer["block4_pool"]["dims"] == 2048 and by_layer["block3_pool"]["dims"] == 4096
    assert s3.computed == 90  # both missing taps in ONE pass over the 90 images, not two
    store = FeatureStore(cache)
    assert [len(store.get(by_layer[n]["id"])) for n in ("block5_pool", "block4_pool", "block3_pool")] == [90] * 3


def test_vectors_match_a_direct_keras_forward_pass(small, cache):
    import keras

    _, x_train, _ = dataset_features(small, SPEC, RunSettings(cache, progress=False), compute=True)
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    imgs = np.stack([np.repeat(np.repeat(small.train.images.load(i), 4, 0), 4, 1) for i in range(5)])
    x = keras.applications.vgg16.preprocess_input(imgs.astype("float32"))
    want = np.asarray(model(x, training=False)).reshape(5, -1)
    np.testing.assert_allclose(x_train[:5], want, rtol=1e-4, atol=1e-4)


def test_batch_size_does_not_change_vectors_or_key(small, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ra, sa = extract_dataset(small, SPEC, RunSettings(a, batch_size=7, progress=False))
    rb, sb = extract_dataset(small, SPEC, RunSettings(b, batch_size=64, progress=False))
    assert ra.set_ids == rb.set_ids
    ids = small.train.images.ids
    va = FeatureStore(a).get(sa.sets[0]["id"]).gather(ids)
    vb = FeatureStore(b).get(sb.sets[0]["id"]).gather(ids)
    np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5)


def test_every_key_part_makes_a_new_set(small, cache):
    base = resolve(SPEC, small.native_size(), cache).set_ids["block5_pool"]
    for change in (dict(pool="avg"), dict(size=64), dict(resize="bilinear"), dict(preprocess="scale01"),
                   dict(seed=1)):
        spec = FeatureSpec(**{**SPEC.__dict__, **change})
        assert resolve(spec, small.native_size(), cache).set_ids["block5_pool"] != base, change
    hed = FeatureSpec("vgg16", "hed-bsds", ("block5_pool",), size=32)
    assert resolve(hed, 8, cache).set_ids["block5_pool"] != base


def test_folder_that_gains_ten_images_computes_only_those(tmp_path, cache):
    write_digit_folder(tmp_path / "data", 10)
    spec = FeatureSpec("vgg16", "random", ("block5_pool",), size=32)
    _, s1 = extract_dataset(load_dataset(str(tmp_path / "data")), spec, RunSettings(cache, progress=False))
    assert s1.computed == 30
    write_digit_folder(tmp_path / "data", 5, classes=(0, 1), offset=10)
    _, s2 = extract_dataset(load_dataset(str(tmp_path / "data")), spec, RunSettings(cache, progress=False))
    assert s2.images == 40 and s2.computed == 10


class FailsAt(ArrayImages):
    """An image source whose `at`-th image fails to load once with `exc` (a Ctrl-C, a disk error, ...)."""

    def __init__(self, array, at: int, exc):
        super().__init__(array)
        self.at, self.exc, self.failed = at, exc, False

    def load(self, index):
        if index == self.at and not self.failed:
            self.failed = True
            raise self.exc
        return super().load(index)


@pytest.mark.parametrize("exc, expected", [
    (KeyboardInterrupt, (FeatureCacheError, "interrupted after 20 of 90 images")),  # Ctrl-C: one-line error
    (RuntimeError("disk on fire"), (RuntimeError, "disk on fire")),  # any other failure propagates
])
def test_failed_run_keeps_finished_batches_and_resumes(small, cache, exc, expected):
    source = FailsAt(small.train.images.array, 25, exc)  # in the third batch of 10
    ds = Dataset(small.name, small.class_names, Split(source, small.train.labels), small.test)
    with pytest.raises(expected[0], match=expected[1]):
        extract_dataset(ds, SPEC, RunSettings(cache, batch_size=10, progress=False))
    fs = FeatureStore(cache).get(resolve(SPEC, small.native_size(), cache).set_ids["block5_pool"])
    assert len(fs) == 20  # the two finished batches are stored
    _, s = extract_dataset(ds, SPEC, RunSettings(cache, batch_size=10, progress=False))
    assert s.computed == 70 and s.sets[0]["stored"] == 90 and s.sets[0]["reused"] == 20


def test_fit_without_features_names_the_extract_command(small, cache):
    opts = DataOptions("digits", max_train=60, max_test=30)
    with pytest.raises(FeatureCacheError, match=r"run `featurecache extract --data digits .*--max-train 60"):
        dataset_features(small, SPEC, RunSettings(cache), opts)


def test_damaged_or_foreign_parts_are_named(small, tmp_path):
    cache = tmp_path / "c"
    _, s = extract_dataset(small, SPEC, RunSettings(cache, progress=False))
    other = FeatureSpec("vgg16", "random", ("block5_pool",), pool="avg", size=32)
    _, s_other = extract_dataset(small, other, RunSettings(cache, progress=False))
    store = FeatureStore(cache)
    part = store.get(s.sets[0]["id"]).part_files()[0]
    foreign = store.get(s_other.sets[0]["id"]).folder / "part-99999999999999999999-1.h5"
    shutil.copy(part, foreign)
    with pytest.raises(FeatureCacheError, match="another configuration"):
        store.get(s_other.sets[0]["id"]).gather(small.train.images.ids)
    foreign.unlink()
    part.write_bytes(part.read_bytes()[:300])  # truncated
    with pytest.raises(FeatureCacheError, match=f"{part.name}: damaged feature file"):
        store.get(s.sets[0]["id"]).gather(small.train.images.ids)


def test_cache_hit_needs_no_tensorflow(small, cache):
    extract_dataset(small, SPEC, RunSettings(cache, progress=False))
    code = (
        "import sys, json; from pathlib import Path\n"
        "from featurecache.api import DataOptions, RunSettings, extract_dataset\n"
        "from featurecache.extraction.extract import FeatureSpec\n"
        f"ds = DataOptions('digits', max_train=60, max_test=30).load()\n"
        "spec = FeatureSpec('vgg16', 'random', ('block5_pool',), size=32)\n"
        f"_, s = extract_dataset(ds, spec, RunSettings(Path({str(cache)!r})))\n"
        "print(json.dumps([s.cache_hit, 'tensorflow' in sys.modules]))\n")
    assert json.loads(run_python(code).strip().splitlines()[-1]) == [True, False]


def test_cli_extract_json_and_cache_ls(cache):
    args = ["extract", "--data", "digits", "--max-train", "40", "--max-test", "20", "--model", "vgg16",
            "--weights", "random", "--size", "32", "--json"]
    first = json.loads(run_cli(*args, cache_dir=cache, check=True).stdout)
    assert first["computed"] == 60 and not first["cache_hit"] and first["images_per_second"] > 0
    again = json.loads(run_cli(*args, cache_dir=cache, check=True).stdout)
    assert again["cache_hit"] and again["sets"][0]["id"] == first["sets"][0]["id"]
    listing = json.loads(run_cli("cache", "ls", "--json", cache_dir=cache, check=True).stdout)
    assert listing[0]["images"] == 60 and listing[0]["layer"] == "block5_pool" and listing[0]["bytes"] > 0
    assert "ok" in run_cli("cache", "verify", cache_dir=cache, check=True).stdout
    run_cli("cache", "rm", first["sets"][0]["id"][:6], cache_dir=cache, check=True)
    assert json.loads(run_cli("cache", "ls", "--json", cache_dir=cache, check=True).stdout) == []


@pytest.mark.parametrize("args, words", [
    (["layers", "--model", "nosuchnet"], "--model nosuchnet: unknown model"),
    (["layers", "--model", "vgg16", "--size", "16"], "--size 16: vgg16 needs at least 32x32"),
    (["extract", "--data", "digits", "--model", "vgg16", "--weights", "random", "--layer", "block9_pool"],
     "--layer block9_pool: vgg16 has no such layer"),
    (["extract", "--data", "/no/such/folder"], "--data /no/such/folder: no such path"),
    (["extract", "--data", "digits", "--weights", "nope.h5"], "--weights nope.h5: not a file"),
    (["extract", "--data", "digits", "--pool", "median"], r"--pool.*median|median.*--pool"),  # ours or click's
])
def test_bad_options_give_one_line_and_status_2(args, words, cache):
    proc = run_cli(*args, cache_dir=cache)
    assert proc.returncode == 2
    assert words in error_line(proc) or re.search(words, error_line(proc))


def test_layers_lists_block5_pool_at_64(cache):
    out = run_cli("layers", "--model", "vgg16", "--size", "64", "--json", cache_dir=cache, check=True).stdout
    layers = {l["name"]: l for l in json.loads(out)["layers"]}
    assert layers["block5_pool"]["shape"] == [2, 2, 512] and layers["block5_pool"]["default"]
    assert layers["block3_pool"]["flatten_dims"] == 8 * 8 * 256
