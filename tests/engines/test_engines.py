"""Engines: parity with TensorFlow on every tap, shared feature sets, int8, conversion cache, errors, plan."""

import json

import numpy as np
import pytest

from conftest import error_line, needs, run_cli
from featurecache import engines
from featurecache.api import DataOptions, RunSettings, extract_dataset
from featurecache.backbones import get_backbone
from featurecache.backbones.weights import resolve_weights
from featurecache.engines import onnx_export
from featurecache.engines.graphs import Graph
from featurecache.errors import FeatureCacheError
from featurecache.extraction.extract import FeatureSpec
from featurecache.encoding.preprocessing import preprocess
from featurecache.store.sets import FeatureStore, relative_difference

CONVERTED = [e for e in ("onnxruntime", "openvino") if engines.installed(e)]
SPEC = FeatureSpec("vgg16", "random", ("block5_pool",), size=32)


def photos(size: int) -> np.ndarray:
    """Four real photos (scikit-image ships them), resized to size x size, uint8 RGB."""
    from skimage import data

    from featurecache.encoding.images import resize

    return np.stack([resize(getattr(data, n)(), size, "bilinear") for n in ("astronaut", "chelsea", "coffee", "rocket")])


@pytest.fixture(scope="module", params=[("vgg16", "hed-bsds", 32), ("efficientnet_lite0", "imagenet", 64)],
                ids=["vgg16", "efficientnet_lite0"])
def reference(request, tmp_path_factory):
    """The real offline weights, every tap, and TensorFlow's outputs for four photos."""
    from featurecache.backbones.build import build_model
    from featurecache.engines.tensorflow import tensorflow_forward
    from featurecache.encoding.taps import taps_of

    name, weights, size = request.param
    backbone = get_backbone(name)
    w = resolve_weights(backbone, weights)
    model = build_model(backbone, w, size)
    taps = [t.name for t in taps_of(model, size)]
    x = preprocess(photos(size), backbone.preprocess)
    want = tensorflow_forward(model, taps)(x)
    return backbone, w, size, model, taps, x, want, tmp_path_factory.mktemp("engines")


def count_calls(monkeypatch, module, name: str) -> dict:
    """Wrap module.name so a test can tell how often the expensive step (export, quantise) ran."""
    calls, real = {name: 0}, getattr(module, name)

    def counted(*a, **k):
        calls[name] += 1
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("engine", CONVERTED)
def test_every_tap_matches_tensorflow(reference, engine):
    backbone, w, size, model, taps, x, want, cache = reference
    forward = engines.make_forward(engine, model, Graph(backbone.name, w.id, size, tuple(taps)), cache)
    got = forward(x)
    assert forward.engine == engine and len(got) == len(taps) > 10
    worst = {t: relative_difference(g, r) for t, g, r in zip(taps, got, want)}
    assert all(g.shape == r.shape for g, r in zip(got, want))
    bad = {t: e for t, e in worst.items() if e >= 1e-4}
    assert not bad, f"{engine}: max |diff| / feature scale over 1e-4 at {bad}"


@pytest.fixture(scope="module")
def small():
    return DataOptions("digits", max_train=60, max_test=30).load()


@pytest.mark.parametrize("engine", CONVERTED)
def test_engine_shares_the_tensorflow_feature_set(small, tmp_path, engine):
    _, tf = extract_dataset(small, SPEC, RunSettings(tmp_path, progress=False, engine="tensorflow"))
    assert tf.engine == "tensorflow" and tf.computed == 90
    _, again = extract_dataset(small, SPEC, RunSettings(tmp_path, progress=False, engine=engine))
    assert again.cache_hit and again.sets[0]["id"] == tf.sets[0]["id"]  # no recompute: same key

    fresh = tmp_path / "fresh"
    _, other = extract_dataset(small, SPEC, RunSettings(fresh, progress=False, engine=engine))
    assert other.engine == engine and other.sets[0]["id"] == tf.sets[0]["id"]
    ids = small.train.images.ids
    a = FeatureStore(tmp_path).get(tf.sets[0]["id"]).gather(ids)
    b = FeatureStore(fresh).get(other.sets[0]["id"]).gather(ids)
    assert relative_difference(b, a) < 1e-4


def test_conversion_happens_once_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    from featurecache.backbones.build import build_model

    calls = count_calls(monkeypatch, onnx_export, "export")
    backbone = get_backbone("vgg16")
    w = resolve_weights(backbone, "random")
    model = build_model(backbone, w, 32)
    x = preprocess(photos(32), "caffe")
    outs = []
    for engine in CONVERTED * 2:
        forward = engines.make_forward(engine, model, Graph("vgg16", w.id, 32, ("block4_pool",)), tmp_path)
        outs.append(forward(x)[0])
    assert calls["export"] == 1  # one ONNX graph serves both engines, and a second build only reads
    folder = Graph("vgg16", w.id, 32, ("block4_pool",)).folder(tmp_path)
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
    assert all(np.allclose(o, outs[0], rtol=1e-4, atol=1e-4) for o in outs)


@needs(engines.installed("openvino"), "int8 runs on openvino")
def test_int8_is_another_feature_set_calibrated_once(small, tmp_path, monkeypatch):
    from featurecache.engines import int8

    calls = count_calls(monkeypatch, int8, "quantize")
    _, f32 = extract_dataset(small, SPEC, RunSettings(tmp_path, progress=False))
    spec8 = FeatureSpec(**{**SPEC.__dict__, "precision": "int8"})
    res8, q = extract_dataset(small, spec8, RunSettings(tmp_path, progress=False))
    assert not q.cache_hit and q.computed == 90 and q.sets[0]["id"] != f32.sets[0]["id"]
    assert res8.keys["block5_pool"]["precision"].startswith("int8-openvino-") and q.engine == "openvino"
    ids = small.train.images.ids
    a = FeatureStore(tmp_path).get(f32.sets[0]["id"]).gather(ids)
    b = FeatureStore(tmp_path).get(q.sets[0]["id"]).gather(ids)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95 and not np.allclose(a, b)
    # The same int8 spec again: a cache hit, and no second calibration.
    _, again = extract_dataset(small, spec8, RunSettings(tmp_path, progress=False))
    assert again.cache_hit and calls["quantize"] == 1
    from featurecache.extraction.verify import verify

    fs = FeatureStore(tmp_path).get(q.sets[0]["id"])
    assert verify(fs, small, RunSettings(tmp_path), 4).ok  # recomputed on the int8 graph
    with pytest.raises(FeatureCacheError, match="--engine onnxruntime: --precision int8 runs on openvino"):
        extract_dataset(small, spec8, RunSettings(tmp_path, progress=False, engine="onnxruntime"))


@needs(engines.installed("openvino"), "int8 runs on openvino")
def test_verify_checks_one_tap_of_an_int8_set_extracted_beside_others(small, tmp_path):
    """Sets extracted together share one int8 graph (a graph per tap set); verifying one of them finds that
    graph rather than asking for a calibration the training images are not at hand for."""
    from featurecache.extraction.verify import verify

    spec8 = FeatureSpec("vgg16", "random", ("block4_pool", "block5_pool"), size=32, precision="int8")
    _, q = extract_dataset(small, spec8, RunSettings(tmp_path, progress=False))
    assert len(list((tmp_path / "engines").glob("*/int8-*.onnx"))) == 1
    for s in q.sets:
        fs = FeatureStore(tmp_path).get(s["id"])
        report = verify(fs, small, RunSettings(tmp_path), 4)
        assert report.ok and any(n.startswith("recomputed 4 rows") for n in report.notes), report.line()


def test_unknown_or_missing_engine_is_one_line(tmp_path, monkeypatch):
    proc = run_cli("extract", "--data", "digits", "--model", "vgg16", "--weights", "random", "--size", "32",
                   "--engine", "cuda", cache_dir=tmp_path)
    assert proc.returncode == 2 and "--engine" in error_line(proc) and "cuda" in error_line(proc)  # ours or click's
    with pytest.raises(FeatureCacheError, match="--engine cuda: unknown; use one of auto, tensorflow"):
        engines.choose("cuda")  # the API's own check
    monkeypatch.setattr(engines, "installed", lambda e: e == "tensorflow")
    with pytest.raises(FeatureCacheError, match=r"--engine openvino: not installed; run `pip install openvino onnx`"):
        engines.choose("openvino")
    assert engines.choose("auto") == "tensorflow"  # auto falls back to what is there
    with pytest.raises(FeatureCacheError, match="--precision fp16: unknown"):
        engines.choose("auto", "fp16")


def test_a_layer_the_exporter_lacks_falls_back_or_fails_by_choice(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    out = keras.layers.Activation("gelu", name="act")(x)
    model = keras.Model(inputs, out)
    backbone, w = get_backbone("vgg16"), resolve_weights(get_backbone("vgg16"), "random")
    said = []
    graph = Graph(backbone.name, w.id, 32, ("act",))
    forward = engines.make_forward("auto", model, graph, tmp_path, log=said.append)
    assert forward.engine == "tensorflow" and "using tensorflow" in said[0]
    assert forward(np.zeros((2, 32, 32, 3), np.float32))[0].shape == (2, 30, 30, 4)
    if CONVERTED:
        with pytest.raises(FeatureCacheError, match=f"--engine {CONVERTED[0]}: cannot convert"):
            engines.make_forward(CONVERTED[0], model, graph, tmp_path)


def test_plan_counts_what_the_cache_lacks_and_the_disk_it_needs(tmp_path):
    args = ["--data", "digits", "--max-train", "60", "--max-test", "30", "--model", "vgg16", "--weights", "random",
            "--size", "32", "--layer", "block5_pool", "--layer", "block4_pool"]
    before = json.loads(run_cli("plan", *args, "--json", cache_dir=tmp_path, check=True).stdout)
    assert before["to_compute"] == 90 and before["expected_seconds"] > 0 and before["measured_images_per_second"] > 0
    dims = {r["layer"]: r["dims"] for r in before["layers"]}
    assert dims == {"block5_pool": 512, "block4_pool": 2048}
    assert before["bytes_to_add"] == 90 * (512 * 4 + 32) + 90 * (2048 * 4 + 32)
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())  # plan stores nothing
    run_cli("extract", *args[:-2], "--quiet", cache_dir=tmp_path, check=True)  # block5_pool only
    after = json.loads(run_cli("plan", *args, "--json", cache_dir=tmp_path, check=True).stdout)
    by_layer = {r["layer"]: r for r in after["layers"]}
    assert by_layer["block5_pool"]["to_compute"] == 0 and by_layer["block4_pool"]["to_compute"] == 90
    assert by_layer["block5_pool"]["bytes_after"] == 90 * (512 * 4 + 32)


@needs(engines.installed("openvino"), "openvino not installed")
def test_openvino_does_not_pin_threads_when_given_fewer_cores(monkeypatch, tmp_path):
    """A Ray actor is given FEATURECACHE_THREADS cores of the machine: OpenVINO must not pin its threads to the
    first cores (two actors would share one), and the compiled model must carry that setting."""
    import openvino as ov
    from onnx import TensorProto, helper

    from featurecache.engines.runtimes import openvino_config

    monkeypatch.delenv("FEATURECACHE_THREADS", raising=False)
    assert "ENABLE_CPU_PINNING" not in openvino_config()
    monkeypatch.setenv("FEATURECACHE_THREADS", "1")
    config = openvino_config()
    assert config["ENABLE_CPU_PINNING"] is False and config["INFERENCE_NUM_THREADS"] == 1 and config["NUM_STREAMS"] == 1
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    (tmp_path / "relu.onnx").write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                         .SerializeToString())
    compiled = ov.Core().compile_model(str(tmp_path / "relu.onnx"), "CPU", config)
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
