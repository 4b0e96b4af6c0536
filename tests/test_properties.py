"""Property-based tests (hypothesis) of the cache key and the dataset loaders.

The key must change whenever a setting that changes the vectors changes, and must not change for the
settings that do not (batch size, thread count, file order, the cache folder itself); the loaders must
give every image the id of its content and its folder's label, whatever its size, mode, format or name.
"""

import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ROOT, run_child
from featurecache.encoding import images
from featurecache.api import DataOptions, RunSettings, extract_dataset
from featurecache.data.datasets import ArrayImages, Dataset, Split, load_dataset
from featurecache.extraction.extract import FeatureSpec, resolve
from featurecache.fingerprint import feature_key, key_id
from featurecache.store.sets import FeatureStore

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- the cache key ----------------------------------------------------------------------------------
key_parts = st.tuples(
    st.sampled_from(["vgg16", "vgg19", "resnet50", "mobilenetv2", "efficientnet_lite0"]),
    st.text(min_size=1, max_size=24),  # weights id
    st.sampled_from(["block3_pool", "block4_pool", "block5_pool", "conv5_block3_out", "out_relu"]),
    st.sampled_from(["flatten", "avg", "max"]),
    st.integers(32, 512),
    st.sampled_from(["nearest", "bilinear"]),
    st.sampled_from(["caffe", "tf", "torch", "scale01", "none"]),
    st.sampled_from(["float32", "float16"]),
)


@SETTINGS
@given(key_parts, key_parts)
def test_key_ids_are_equal_exactly_when_the_settings_are(a, b):
    assert (key_id(feature_key(*a)) == key_id(feature_key(*b))) == (a == b)


@SETTINGS
@given(key_parts, st.randoms(use_true_random=False))
def test_key_id_does_not_depend_on_dict_order(parts, rnd):
    key = feature_key(*parts)
    items = list(key.items())
    rnd.shuffle(items)
    assert key_id(dict(items)) == key_id(key)


VGG_LAYERS = ["block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool"]
spec_fields = st.fixed_dictionaries({
    "pool": st.sampled_from(["flatten", "avg", "max"]),
    "size": st.sampled_from([32, 48, 64, 224]),
    "resize": st.sampled_from(["nearest", "bilinear"]),
    "preprocess": st.sampled_from(["auto", "scale01"]),
    "seed": st.integers(0, 3),
})


@SETTINGS
@given(spec_fields, st.lists(st.sampled_from(VGG_LAYERS), min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_set_ids_ignore_layer_order_repeats_and_the_cache_folder(fields, layers, rnd):
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        a = resolve(FeatureSpec("vgg16", "random", tuple(layers), **fields), 8, Path(d1))
        shuffled = layers * 2
        rnd.shuffle(shuffled)
        b = resolve(FeatureSpec("vgg16", "random", tuple(shuffled), **fields), 8, Path(d2))
    assert a.set_ids == b.set_ids
    assert len(set(a.set_ids.values())) == len(set(layers))  # one set per distinct layer


@SETTINGS
@given(spec_fields, spec_fields, st.sampled_from(VGG_LAYERS))
def test_set_ids_change_with_every_setting_that_changes_vectors(f1, f2, layer):
    with tempfile.TemporaryDirectory() as d:
        a = resolve(FeatureSpec("vgg16", "random", (layer,), **f1), 8, Path(d)).set_ids[layer]
        b = resolve(FeatureSpec("vgg16", "random", (layer,), **f2), 8, Path(d)).set_ids[layer]
    assert (a == b) == (f1 == f2)


# ---- ... and the vectors behind it: order, batch size, threads ------------------------------------------
SPEC = FeatureSpec("vgg16", "random", ("block5_pool",), size=32)


def _reversed(ds: Dataset) -> Dataset:
    def rev(split):
        return Split(ArrayImages(split.images.array[::-1]), split.labels[::-1])
    return Dataset(ds.name, ds.class_names, rev(ds.test), rev(ds.train))


def test_file_order_and_batch_position_do_not_change_vectors_or_the_set(tmp_path):
    """One image at a time (batch size 1) the vectors are bit-identical whatever the order."""
    ds = DataOptions("digits", max_train=30, max_test=10).load()
    ra, sa = extract_dataset(ds, SPEC, RunSettings(tmp_path / "a", batch_size=1, progress=False))
    rb, sb = extract_dataset(_reversed(ds), SPEC, RunSettings(tmp_path / "b", batch_size=1, progress=False))
    assert ra.set_ids == rb.set_ids
    ids = ds.train.images.ids + ds.test.images.ids
    va = FeatureStore(tmp_path / "a").get(sa.sets[0]["id"]).gather(ids)
    vb = FeatureStore(tmp_path / "b").get(sb.sets[0]["id"]).gather(ids)
    assert np.array_equal(va, vb)


def test_thread_count_does_not_change_the_set_and_barely_the_vectors(tmp_path):
    """TF's intra-op thread count is not in the key. The vectors are not bit-identical across thread
    counts (oneDNN splits work differently: ~1e-7 relative), which is why the key may leave it out.
    Both runs are pinned to TensorFlow, whose thread variables the child sets (auto would pick ONNX
    Runtime, which never reads them)."""
    ds = DataOptions("digits", max_train=20, max_test=10).load()
    _, s = extract_dataset(ds, SPEC, RunSettings(tmp_path / "a", progress=False, engine="tensorflow"))
    assert s.engine == "tensorflow"
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
    out = run_child([sys.executable, "-m", "featurecache.cli", "extract", "--data", "digits", "--max-train", "20",
                          "--max-test", "10", "--model", "vgg16", "--weights", "random", "--size", "32",
                          "--layer", "block5_pool", "--cache-dir", str(tmp_path / "b"), "--engine", "tensorflow", "--json"],
                    env=env, cwd=ROOT, check=True).stdout
    child = json.loads(out)
    other = child["sets"][0]["id"]
    assert other == s.sets[0]["id"] and child["engine"] == "tensorflow"
    ids = ds.train.images.ids + ds.test.images.ids
    va = FeatureStore(tmp_path / "a").get(other).gather(ids)
    vb = FeatureStore(tmp_path / "b").get(other).gather(ids)
    np.testing.assert_allclose(va, vb, rtol=0, atol=1e-5 * np.abs(va).max())


# ---- dataset loaders ------------------------------------------------------------------------------
MODES = {  # format -> modes it stores
    "PNG": ["L", "RGB", "RGBA", "P", "I;16", "LA", "1"],
    "JPEG": ["L", "RGB", "CMYK"],
    "BMP": ["L", "RGB", "P"],
    "TIFF": ["L", "RGB", "RGBA", "CMYK"],
}
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}


@st.composite
def an_image(draw):
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode == "P":
        img = img.quantize(16)
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue(), SUFFIX[fmt], (h, w)


@st.composite
def a_folder(draw):
    """3 classes of 2..5 images each, with random file names (hence a random order on disk)."""
    classes = {}
    for c in range(3):
        n = draw(st.integers(2, 5))
        names = draw(st.lists(st.text("abcdefghij0123456789", min_size=1, max_size=8), min_size=n, max_size=n,
                              unique=True))
        classes[f"class{c}"] = [(name, draw(an_image())) for name in names]
    return classes


def _write(root: Path, classes, rename=lambda name: name) -> dict:
    """Write the folder; returns {path: (bytes, (h, w), label)}."""
    out = {}
    for label, (cls, files) in enumerate(sorted(classes.items())):
        (root / cls).mkdir(parents=True)
        for name, (data, suffix, hw) in files:
            path = root / cls / (rename(name) + suffix)
            path.write_bytes(data)
            out[str(path)] = (data, hw, label)
    return out


def _by_path(ds: Dataset) -> dict:
    out = {}
    for split in (ds.train, ds.test):
        for k in range(len(split)):
            out[split.images.name(k)] = (split.images.ids[k], int(split.labels[k]), k, split)
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a_folder(), st.integers(0, 3))
def test_folder_loader_ids_labels_and_pixels(classes, seed):
    with tempfile.TemporaryDirectory() as d:
        written = _write(Path(d) / "data", classes)
        ds = load_dataset(str(Path(d) / "data"), test_size=0.4, seed=seed)
        got = _by_path(ds)
        assert set(got) == set(written)  # every file in exactly one split
        for path, (data, (h, w), label) in written.items():
            image_id, lab, k, split = got[path]
            assert image_id == images.content_hash(data) and lab == label
            rgb = split.images.load(k)
            assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
        again = load_dataset(str(Path(d) / "data"), test_size=0.4, seed=seed)
        assert again.train.images.ids == ds.train.images.ids  # a seeded split is reproducible
        # Other names, hence another order on disk: the same (id, label) pairs, so the same vectors.
        _write(Path(d) / "renamed", classes, rename=lambda name: "x" + name[::-1])
        other = load_dataset(str(Path(d) / "renamed"), test_size=0.4, seed=seed)
        pairs = sorted((i, lab) for i, lab, _, _ in got.values())
        assert sorted((i, lab) for i, lab, _, _ in _by_path(other).values()) == pairs


@settings(max_examples=20, deadline=None)
@given(st.integers(4, 12), st.integers(1, 20), st.integers(1, 20), st.booleans(), st.integers(0, 2**32 - 1))
def test_npz_loader_round_trips_arrays(n, h, w, colour, seed):
    rng = np.random.default_rng(seed)
    shape = (n, h, w, 3) if colour else (n, h, w)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = np.arange(n) % 2
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.npz"
        np.savez(path, x_train=x, y_train=y, x_test=x[::-1], y_test=y[::-1])
        ds = load_dataset(str(path))
    assert ds.native_size() == (h if h == w else None)
    for k in range(n):
        rgb = ds.train.images.load(k)
        assert rgb.shape == (h, w, 3)
        assert np.array_equal(rgb, x[k] if colour else np.repeat(x[k][..., None], 3, axis=2))
    # Equal pixels, equal ids: the test split holds the same images reversed.
    assert ds.test.images.ids == ds.train.images.ids[::-1]


@settings(max_examples=25, deadline=None)
@given(an_image())
def test_a_png_and_its_pixels_as_an_array_decode_alike(image):
    data, suffix, (h, w) = image
    decoded = images.to_rgb(images.open_image(data, "x" + suffix))
    assert decoded.shape == (h, w, 3)
    if suffix == ".png":  # lossless: the same pixels given as an array make the same input
        again = io.BytesIO()
        Image.fromarray(decoded).save(again, "PNG")
        assert np.array_equal(images.to_rgb(images.open_image(again.getvalue(), "y.png")),
                              images.array_to_rgb(decoded))
