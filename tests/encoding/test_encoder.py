"""The encoder (featurecache/encoding/encoder.py): one object from settings to vectors, rebuildable elsewhere;
and the settings values around it (featurecache/settings.py), which keep the historic cache keys."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import feats, fit_run, require, run_cli, run_python, write_digit_folder
from featurecache import versions
from featurecache.api import encode_images, make_encoder
from featurecache.data.datasets import load_dataset
from featurecache.encoding.encoder import EncoderDescription
from featurecache.errors import FeatureCacheError
from featurecache.settings import FeatureSpec, Precision, RunSettings, resolve

SPEC = FeatureSpec("vgg16", "random", ("block4_pool", "block5_pool"), "avg", 32, "bilinear")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    return write_digit_folder(root / "digits", 2)  # 6 real digits as PNG files


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_encoder(SPEC, RunSettings(tmp_path_factory.mktemp("cache"), engine="tensorflow"))


def test_a_description_rebuilt_in_a_fresh_process_gives_the_same_vectors(encoder, files, tmp_path):
    want = encoder([str(p) for p in files])
    desc = encoder.description
    assert isinstance(desc, EncoderDescription) and desc.spec.size == 32 and desc.spec.layers == SPEC.layers
    (tmp_path / "desc.pkl").write_bytes(pickle.dumps(desc))
    code = (
        "import pickle, sys, numpy as np\n"
        f"desc = pickle.loads(open({str(tmp_path / 'desc.pkl')!r}, 'rb').read())\n"
        "enc = desc.build()\n"
        f"out = enc({[str(p) for p in files]!r})\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, **out)\n"
        "print(enc.engine, sys.modules.get('featurecache.cli') is None)\n")
    assert run_python(code).split() == ["tensorflow", "True"]
    got = np.load(tmp_path / "out.npz")
    assert sorted(got.files) == sorted(want)
    for tap in want:
        np.testing.assert_allclose(got[tap], want[tap], rtol=1e-6, atol=1e-6 * np.abs(want[tap]).max())


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_an_encoder_on_a_cached_graph_builds_no_network(engine, files, tmp_path):
    """Once a graph is converted, an encoder for it (a Ray actor, `predict`, `serve`) runs it without
    building the Keras model or importing TensorFlow, and gives the same vectors as the one that converted it."""
    require(engine, f"{engine} is not installed")
    first = make_encoder(SPEC, RunSettings(tmp_path, engine=engine))
    want = first([str(p) for p in files])
    (tmp_path / "desc.pkl").write_bytes(pickle.dumps(first.description))
    code = (
        "import pickle, sys, numpy as np\n"
        f"enc = pickle.loads(open({str(tmp_path / 'desc.pkl')!r}, 'rb').read()).build()\n"
        f"out = enc({[str(p) for p in files]!r})\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, **out)\n"
        "print(enc.engine, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    assert run_python(code).split() == [engine, "False", "False"]
    got = np.load(tmp_path / "out.npz")
    for tap in want:
        np.testing.assert_allclose(got[tap], want[tap], rtol=1e-6, atol=1e-6 * np.abs(want[tap]).max())


def test_predicting_new_images_on_cached_graphs_imports_no_tensorflow(files, tmp_path):
    """`predict` on images the cache has not seen, once the run's graph is converted: the network is not built
    (the taps are memoized, the engine runs the cached graph), so TensorFlow is never imported."""
    run_id = fit_run("--data", files[0].parents[1], *feats(32, "block4_pool"), "--head", "logreg", "--engine",
                     "onnxruntime", "--extract", cache=tmp_path)["run_id"]
    new = tmp_path / "new.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(new)
    code = (
        "import sys\n"
        "from featurecache.runs.predict import predict_files\n"
        "from featurecache.settings import RunSettings\n"
        f"rows = predict_files([{str(new)!r}], {run_id!r}, RunSettings({str(tmp_path)!r}, 'onnxruntime'))\n"
        "print(len(rows), 'tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    assert run_python(code).split()[-3:] == ["1", "False", "False"]


def test_paths_bytes_and_arrays_of_one_image_give_one_vector(encoder, files):
    path = files[0]
    pixels = np.asarray(Image.open(path))
    out = encoder([str(path), path, path.read_bytes(), pixels, lambda: pixels])
    for tap, vectors in out.items():
        assert vectors.shape[0] == 5 and vectors.dtype == np.float32
        assert np.allclose(vectors, vectors[0], rtol=1e-5, atol=1e-5 * np.abs(vectors).max()), tap


def test_on_error_fails_or_skips_in_one_place(encoder, files, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(FeatureCacheError, match="bad.png: not a readable image"):
        encoder.encode([str(files[0]), str(bad)])
    skipping = make_encoder(SPEC, RunSettings(encoder.cache_dir, engine="tensorflow", on_error="skip"))
    out = skipping.encode([str(files[0]), str(bad), str(files[1])], keys=["a", "b", "c"])
    assert out.keys == ["a", "c"] and list(out.skipped) == ["b"] and "not a readable image" in out.skipped["b"]
    assert all(v.shape[0] == 2 for v in out.vectors.values())


def test_encode_images_gives_one_array_per_tap(files, tmp_path):
    out = encode_images([str(p) for p in files], SPEC, RunSettings(tmp_path, engine="tensorflow"))
    assert {t: v.shape for t, v in out.items()} == {"block4_pool": (6, 512), "block5_pool": (6, 512)}


def test_plan_skips_a_corrupt_image_under_on_error_skip(tmp_path):
    from featurecache.extraction.plan import run_plan

    folder = tmp_path / "data"
    write_digit_folder(folder, 3)
    (folder / "digit1" / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    ds = load_dataset(str(folder))
    spec = FeatureSpec("vgg16", "random", ("block5_pool",), size=32)
    with pytest.raises(FeatureCacheError, match="zz-corrupt.png"):
        run_plan(ds, spec, RunSettings(tmp_path / "cache", engine="tensorflow"), probe=4)
    out = run_plan(ds, spec, RunSettings(tmp_path / "cache", engine="tensorflow", on_error="skip"), probe=4)
    assert out["to_compute"] == 10 and out["measured_images_per_second"] > 0
    assert [Path(s["name"]).name for s in out["skipped"]] == ["zz-corrupt.png"]
    proc = run_cli("plan", "--data", folder, "--model", "vgg16", "--weights", "random", "--size", "32", "--engine",
                   "tensorflow", "--on-error", "skip", "--json", cache_dir=tmp_path / "cache", check=True)
    assert [Path(s["name"]).name for s in json.loads(proc.stdout)["skipped"]] == ["zz-corrupt.png"]


# ---- settings ---------------------------------------------------------------------------------
def old_key(model, weights_id, layer, pool, size, resize, preprocess, precision="fp32") -> str:
    """A feature set's id as the code before the settings values made it (fingerprint.feature_key
    and key_id of commit 30b5ee2, written out here so a change to either shows)."""
    import hashlib

    parts = {"format": 1, "model": model, "weights": weights_id, "layer": layer, "pool": pool, "size": int(size),
             "resize": resize, "preprocess": preprocess, "dtype": "float32", "precision": precision,
             "libraries": versions.library_versions("tensorflow", "keras", "pillow")}
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


@pytest.mark.parametrize("spec, preprocess", [
    (FeatureSpec("vgg16", "random", ("block5_pool",), size=32), "caffe"),
    (FeatureSpec("vgg16", "hed-bsds", ("block3_pool",), "max", 64, "bilinear", "scale01"), "scale01"),
    (FeatureSpec("efficientnet_lite0", "imagenet", ("top_activation",), "avg", 224, seed=3), "tf"),
    (FeatureSpec("vgg16", "random", ("block4_pool",), size=48, seed=2, precision="int8", calibration="0123456789ab"),
     "caffe"),
])
def test_existing_feature_sets_keep_their_ids(spec, preprocess, tmp_path):
    res = resolve(spec, None, tmp_path)
    layer = spec.layers[0]
    precision = "fp32" if spec.precision == "float32" else f"int8-openvino-{spec.calibration}"
    assert res.set_ids[layer] == old_key(spec.model, res.weights.id, layer, spec.pool, spec.size, spec.resize,
                                         preprocess, precision)


def test_graph_folders_keep_their_names(tmp_path):
    import hashlib

    from featurecache.engines import onnx_export
    from featurecache.engines.graphs import Graph

    parts = {"format": onnx_export.FORMAT, "opset": onnx_export.OPSET, "model": "vgg16", "weights": "w1", "size": 64,
             "taps": ["block3_pool", "block5_pool"]}
    old = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=8).hexdigest()
    assert Graph("vgg16", "w1", 64, ("block5_pool", "block3_pool")).folder(tmp_path) == tmp_path / "engines" / old


def test_precision_has_one_spelling():
    assert Precision().key() == "fp32" and Precision.parse("fp32") == Precision.parse("float32") == Precision()
    int8 = Precision("int8", "0123456789ab")
    assert int8.key() == "int8-openvino-0123456789ab" and Precision.parse(int8.key()) == int8
    with pytest.raises(FeatureCacheError, match="--precision fp16: unknown"):
        Precision.parse("fp16")


def test_run_settings_check_themselves(tmp_path):
    assert RunSettings(str(tmp_path)).cache_dir == tmp_path
    with pytest.raises(FeatureCacheError, match="--on-error maybe"):
        RunSettings(tmp_path, on_error="maybe")
    with pytest.raises(FeatureCacheError, match="--batch-size 0"):
        RunSettings(tmp_path, batch_size=0)


def test_time_engines_measures_each_engine_asked_for(files, tmp_path):
    from featurecache.api import time_engines

    out = time_engines([str(p) for p in files], FeatureSpec("vgg16", "random", ("block3_pool",), size=32),
                       RunSettings(tmp_path, batch_size=4), engines=("tensorflow",), rounds=1)
    assert list(out) == ["tensorflow"] and out["tensorflow"]["images_per_second"] > 0
