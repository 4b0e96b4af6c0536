"""`featurecache export`: one ONNX file per run that plain ONNX Runtime runs, image in, label out (issue 17)."""

import hashlib
import importlib.util
import json
import shutil
import sys

import joblib
import numpy as np
import pytest
from PIL import Image

from conftest import error_line, feats, fit_run, needs, require, run_child, run_cli
from featurecache.encoding.pooling import Pooling
from featurecache.encoding.preprocessing import MODES

# Both are featurecache's own dependencies: skipped only on a partial install, failed under CI.
require("skl2onnx", "skl2onnx is not installed")
ort = require("onnxruntime", "onnxruntime is not installed")

# --resize nearest: the plain program below maps the metadata's method to a Pillow filter (auto, the
# default, is a rule: nearest up, bilinear down).
DATA = ["--data", "digits", "--max-train", "60", "--max-test", "24", "--resize", "nearest"]
# Both runs read 8x8 digits at 32x32 (each backbone's minimum; nearest-neighbour upsizing).
RUNS = {
    "linsvc": ["--model", "vgg16", "--weights", "random", "--layer", "block4_pool", "--head", "linsvc"],
    "logreg": ["--model", "efficientnet_lite0", "--weights", "imagenet", "--pool", "avg", "--head", "logreg"],
}

# What a user's program does with the file: onnxruntime, numpy and Pillow, nothing of featurecache.
PLAIN_ORT = r"""
import json, sys
import numpy as np
import onnxruntime as ort
from PIL import Image

model, files = sys.argv[1], sys.argv[2:]
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
size = int(meta["input_size"])
method = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}[meta["resize"]]
x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), method)) for f in files])
scores, label, name = sess.run(["scores", "label", "label_name"], {"images": x})
loaded = [m for m in ("tensorflow", "keras", "sklearn", "featurecache") if m in sys.modules]
assert "tensorflow" not in sys.modules, loaded
print(json.dumps({"scores": scores.tolist(), "label": label.tolist(), "label_name": name.tolist(),
                  "loaded": loaded, "meta": meta}))
"""


def _fit(cache, kind):
    return fit_run(*DATA, *RUNS[kind], "--extract", cache=cache)["run_id"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both runs fitted and exported once; the test digits written as PNG files for `featurecache predict`."""
    from featurecache.api import DataOptions

    root = tmp_path_factory.mktemp("export")
    cache = root / "cache"
    ds = DataOptions("digits", max_train=60, max_test=24).load()
    files = []
    for j in range(len(ds.test)):
        p = root / "test" / f"{j:03d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(ds.test.images.load(j)).save(p)
        files.append(p)
    out = {"root": root, "cache": cache, "files": files, "class_names": list(ds.class_names)}
    for kind in RUNS:
        run_id = _fit(cache, kind)
        path = root / f"{kind}.onnx"
        proc = run_cli("export", "--run", run_id, "-o", path, "--json", cache_dir=cache, check=True)
        out[kind] = {"run_id": run_id, "path": path, "summary": json.loads(proc.stdout)}
    return out


def _plain_ort(path, files, cwd):
    proc = run_child([sys.executable, "-c", PLAIN_ORT, path, *files], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind", list(RUNS))
def test_the_file_alone_labels_every_test_image_as_predict_does(exported, kind):
    _same_as_predict(exported, exported[kind])


def _same_as_predict(exported, run):
    """The file, run by onnxruntime alone on every test image, gives `featurecache predict`'s labels and scores."""
    got = _plain_ort(run["path"], exported["files"], exported["root"])
    assert got["loaded"] == []  # neither TensorFlow nor scikit-learn nor featurecache was imported
    k = len(exported["class_names"])
    proc = run_cli("predict", *exported["files"], "--run", run["run_id"], "--format", "json", "--top", k,
                   cache_dir=exported["cache"], check=True)
    rows = json.loads(proc.stdout)
    assert len(rows) == len(exported["files"]) == len(got["label"])
    names = exported["class_names"]
    worst = 0.0
    for r, scores, label, name in zip(rows, got["scores"], got["label"], got["label_name"]):
        assert name == r["label"] and names[label] == r["label"], r["file"]
        for t in r["top"]:
            worst = max(worst, abs(scores[names.index(t["label"])] - t["score"]))
    assert worst < 1e-4, worst
    assert got["meta"]["score_kind"] == rows[0]["score_kind"]


@pytest.mark.parametrize("kind", list(RUNS))
def test_metadata_names_classes_size_and_feature_key(exported, kind):
    run = exported[kind]
    sess = ort.InferenceSession(str(run["path"]), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == exported["class_names"]
    assert meta["input_size"] == "32" and meta["resize"] == meta["resize_rule"] == "nearest"
    assert meta["run_id"] == run["run_id"]
    key = json.loads(meta["feature_key"])
    assert (key["model"], key["size"]) == (RUNS[kind][1], 32)
    assert key["layer"] == ("block4_pool" if kind == "linsvc" else "top_activation")
    assert key["pool"] == ("flatten" if kind == "linsvc" else "avg")
    assert meta["featurecache_version"]
    [inp] = sess.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    assert [o.name for o in sess.get_outputs()] == ["scores", "label", "label_name"]


def test_check_runs_the_file_without_tensorflow_and_agrees(exported):
    proc = run_cli("export", "--check", exported["linsvc"]["path"], "--json", cache_dir=exported["cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["images"] == 24 and r["agree"] == 24 and r["max_score_difference"] < 1e-4
    assert r["tensorflow_imported"] is False and r["sklearn_imported"] is False


def test_check_feeds_the_file_the_pixels_featurecache_decoded(exported, tmp_path):
    """A folder of JPEGs of mixed sizes is keyed `auto`: large JPEGs are decoded at a reduced DCT scale
    (draft) before the resize. --check gives the file those very pixels, so file and predict agree to 1e-4."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "photos" / f"c{c}").mkdir(parents=True)
        for j in range(8):
            side = (96, 80, 40, 128)[j % 4]
            img = (rng.random((side, side, 3)) * 60 + np.linspace(0, 190, side)[:, None, None] * (c + 1) / 2)
            Image.fromarray(img.astype(np.uint8)).save(tmp_path / "photos" / f"c{c}" / f"{j}.jpg", quality=90)
    data = ["--data", tmp_path / "photos", "--size", "32", "--model", "vgg16", "--weights", "random",
            "--layer", "block4_pool", "--head", "linsvc"]
    fit = fit_run(*data, "--extract", cache=tmp_path / "cache")
    record = json.loads((tmp_path / "cache" / "runs" / fit["run_id"] / "run.json").read_text())
    assert record["feature_key"]["resize"] == "auto"
    run_cli("export", "--run", fit["run_id"], "-o", tmp_path / "m.onnx", cache_dir=tmp_path / "cache", check=True)
    meta = {p.key: p.value for p in __import__("onnx").load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["resize"] == "auto" and "bilinear" in meta["resize_rule"]
    proc = run_cli("export", "--check", tmp_path / "m.onnx", "--json", cache_dir=tmp_path / "cache")
    r = json.loads(proc.stdout)
    assert proc.returncode == 0 and r["agree"] == r["images"] > 0 and r["max_score_difference"] < 1e-4, r


# ---- runs on several taps and on fit-time views: one map per tap, each pooled into its block ---------------

# At 32px vgg16's block3_pool is 4x4x256 and block4_pool 2x2x512: max2x2 gives 1024 + 512 columns, read
# from the stored flattened maps at fit time (pooling.py) and computed in the file from the maps.
COMPOSED = {
    "taps_max2x2": ["--model", "vgg16", "--weights", "random", "--size", "32", "--layer", "block3_pool",
                    "--layer", "block4_pool", "--pool", "max2x2", "--head", "linsvc"],
    "avg2x2": ["--model", "vgg16", "--weights", "random", "--size", "32", "--layer", "block3_pool",
               "--pool", "avg2x2", "--head", "logreg"],
}


@pytest.fixture(scope="module")
def composed(exported):
    """The COMPOSED runs fitted in the shared cache (the maps stored once, by the first) and exported."""
    out = {}
    for kind, args in COMPOSED.items():
        run_id = fit_run(*DATA, *args, "--extract", cache=exported["cache"])["run_id"]
        path = exported["root"] / f"{kind}.onnx"
        run_cli("export", "--run", run_id, "-o", path, "--json", cache_dir=exported["cache"], check=True)
        record = json.loads((exported["cache"] / "runs" / run_id / "run.json").read_text())
        out[kind] = {"run_id": run_id, "path": path, "record": record}
    return out


@pytest.mark.parametrize("kind", list(COMPOSED))
def test_a_run_on_several_taps_or_a_view_labels_every_test_image_as_predict_does(exported, composed, kind):
    run = composed[kind]
    pool = COMPOSED[kind][COMPOSED[kind].index("--pool") + 1]
    # the run really is one on fit-time views of stored maps
    assert all(b["stored"] == "flatten" and b["pool"] == pool for b in run["record"]["blocks"])
    _same_as_predict(exported, run)


def test_the_taps_are_pooled_and_joined_in_the_runs_order(composed):
    import onnx

    run = composed["taps_max2x2"]
    blocks = run["record"]["blocks"]
    assert [(b["layer"], b["dims"]) for b in blocks] == [("block3_pool", 1024), ("block4_pool", 512)]
    proto = onnx.load(str(run["path"]))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["blocks"]) == [{"layer": "block3_pool", "pool": "max2x2"},
                                          {"layer": "block4_pool", "pool": "max2x2"}]
    nodes = {n.output[0]: n for n in proto.graph.node}
    join = nodes["features"]
    assert join.op_type == "Concat"
    # each block comes from its own tap: follow each Concat input back to the backbone output it pools
    def tap_of(value):
        while not value.startswith("backbone/tap/"):
            value = nodes[value].input[0]
        return value
    assert [tap_of(v) for v in join.input] == ["backbone/tap/block3_pool", "backbone/tap/block4_pool"]
    assert sum(n.op_type == "MaxPool" for n in proto.graph.node if n.output[0].startswith("pool/")) == 2


def test_check_agrees_on_a_run_on_several_taps(exported, composed):
    proc = run_cli("export", "--check", composed["taps_max2x2"]["path"], "--json", cache_dir=exported["cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["images"] == 24 and r["agree"] == 24 and r["max_score_difference"] < 1e-4, r


def test_a_tta_run_is_still_refused_in_one_line(exported, composed, tmp_path):
    cache = exported["cache"]
    run_id = composed["taps_max2x2"]["run_id"] + "-tta"
    dst = cache / "runs" / run_id
    shutil.copytree(cache / "runs" / composed["taps_max2x2"]["run_id"], dst)
    record = json.loads((dst / "run.json").read_text())
    record.update(run_id=run_id, tta=True, augment=["hflip"])
    (dst / "run.json").write_text(json.dumps(record))
    proc = run_cli("export", "--run", run_id, "-o", tmp_path / "m.onnx", cache_dir=cache)
    assert proc.returncode == 2 and "--tta" in error_line(proc)
    assert not (tmp_path / "m.onnx").exists()


# ---- bad input: one line each, exit 2 ------------------------------------------------------------------

def test_unknown_run_is_one_line(exported, tmp_path):
    proc = run_cli("export", "--run", "no-such-run", "-o", tmp_path / "m.onnx", cache_dir=exported["cache"])
    assert proc.returncode == 2 and "no such run" in error_line(proc)
    assert not (tmp_path / "m.onnx").exists()


def test_existing_output_is_refused_without_force(exported, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    proc = run_cli("export", "--run", exported["linsvc"]["run_id"], "-o", out, cache_dir=exported["cache"])
    assert proc.returncode == 2 and "--force" in error_line(proc)
    assert out.read_bytes() == b"keep me"


def test_a_head_without_converter_names_the_heads_that_export(exported, tmp_path):
    """Every registered head converts (test_every_head_converts), so the run here holds one that does not:
    scikit-learn's NearestCentroid, which skl2onnx has no converter for, saved as a real run would be."""
    from sklearn.neighbors import NearestCentroid
    from sklearn.pipeline import Pipeline

    from featurecache.heads import L2Normalizer

    cache = exported["cache"]
    src = cache / "runs" / exported["linsvc"]["run_id"]
    run_id = exported["linsvc"]["run_id"] + "-centroid"
    dst = cache / "runs" / run_id
    shutil.copytree(src, dst)
    record = json.loads((dst / "run.json").read_text())
    rng = np.random.default_rng(0)
    pipe = Pipeline([("normalize", L2Normalizer()), ("head", NearestCentroid())])
    pipe.fit(rng.random((30, record["dims"]), dtype=np.float32), np.arange(30) % 3)
    joblib.dump(pipe, dst / "head.joblib")
    record.update(run_id=run_id, head="centroid",
                  head_sha256=hashlib.sha256((dst / "head.joblib").read_bytes()).hexdigest())
    (dst / "run.json").write_text(json.dumps(record))
    proc = run_cli("export", "--run", run_id, "-o", tmp_path / "m.onnx", cache_dir=cache)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "NearestCentroid" in line and "heads that export: linsvc" in line and "logreg" in line
    assert not (tmp_path / "m.onnx").exists()


def test_check_on_images_of_another_size_is_one_line(exported, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {k: rng.integers(0, 255, (12, 40, 40), dtype=np.uint8) for k in ("x_train", "x_test")}
    data = tmp_path / "big.npz"
    np.savez(data, **arrays, y_train=np.arange(12) % 3, y_test=np.arange(12) % 3)
    proc = run_cli("export", "--check", exported["linsvc"]["path"], "--data", data, cache_dir=exported["cache"])
    assert proc.returncode == 2
    line = error_line(proc)
    assert "40x40" in line and "32x32" in line


needs_int8 = needs(importlib.util.find_spec("nncf") is not None and importlib.util.find_spec("openvino") is not None,
                   "int8 features need openvino and nncf")


@pytest.fixture(scope="module")
def int8_run(exported):
    """A linsvc run on int8 features (vgg16 block4_pool, calibrated on the 60 training digits), exported."""
    run_id = fit_run(*DATA, *RUNS["linsvc"], "--precision", "int8", "--extract",
                     cache=exported["cache"])["run_id"]
    path = exported["root"] / "int8.onnx"
    proc = run_cli("export", "--run", run_id, "-o", path, "--json", cache_dir=exported["cache"], check=True)
    return {"run_id": run_id, "path": path, "summary": json.loads(proc.stdout)}


@needs_int8
def test_an_int8_run_exports_the_int8_graph_its_features_came_from(exported, int8_run):
    """The file embeds the run's own QDQ graph (no requantising): int8 weights, QuantizeLinear nodes, a third of
    the float file's size; plain ONNX Runtime agrees with `featurecache predict` (which ran it on OpenVINO)."""
    import onnx

    proto = onnx.load(str(int8_run["path"]))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8_run["path"].stat().st_size < 0.5 * exported["linsvc"]["path"].stat().st_size
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8" and json.loads(meta["feature_key"])["precision"].startswith("int8-openvino-")
    proc = run_cli("export", "--check", int8_run["path"], "--json", cache_dir=exported["cache"])
    r = json.loads(proc.stdout)
    # Another runtime's int8 kernels may round a value differently; the check says by how much. The bounds are
    # docs/EXPORT.md's, which are what this run measures: 23 of 24 labels, scores within 4.5e-4.
    assert r["images"] == 24 and r["agree"] >= 23 and r["tensorflow_imported"] is False, r
    assert r["max_score_difference"] <= 5e-4, r
    assert proc.returncode == (0 if r["agree"] == 24 else 1)


@needs_int8
def test_a_precision_other_than_the_runs_is_one_line(exported, int8_run, tmp_path):
    for run_id, asked, fitted in ((exported["linsvc"]["run_id"], "int8", "float32"),
                                  (int8_run["run_id"], "float32", "int8")):
        proc = run_cli("export", "--run", run_id, "--precision", asked, "-o", tmp_path / "m.onnx",
                       cache_dir=exported["cache"])
        assert proc.returncode == 2
        line = error_line(proc)
        assert f"--precision {asked}" in line and f"fitted on {fitted} features" in line
        assert not (tmp_path / "m.onnx").exists()


@needs_int8
def test_an_int8_run_of_the_first_recipe_is_one_line(exported, int8_run, tmp_path):
    """Runs on the first recipe's int8 features (an OpenVINO IR, calibration named without a recipe id)
    cannot export: there is no ONNX graph of them."""
    cache = exported["cache"]
    run_id = int8_run["run_id"] + "-ir"
    dst = cache / "runs" / run_id
    shutil.copytree(cache / "runs" / int8_run["run_id"], dst)
    record = json.loads((dst / "run.json").read_text())
    record["run_id"] = run_id
    record["feature_key"]["precision"] = "int8-openvino-0123456789ab"
    (dst / "run.json").write_text(json.dumps(record))
    proc = run_cli("export", "--run", run_id, "-o", tmp_path / "m.onnx", cache_dir=cache)
    assert proc.returncode == 2 and "earlier featurecache" in error_line(proc)


# int8 runs on several taps: the file holds the graph the taps were extracted with, cut to them; taps
# extracted at different times came from different graphs, which the file runs side by side on its input.
INT8_COMPOSED = {
    "one_graph": ["--layer", "block2_pool", "--layer", "block3_pool"],  # neither stored yet: extracted together
    "two_graphs": ["--layer", "block3_pool", "--layer", "block4_pool"],  # block4_pool from int8_run's own graph
}


@pytest.fixture(scope="module")
def int8_composed(exported, int8_run):
    out = {}
    for kind, layers in INT8_COMPOSED.items():
        run_id = fit_run(*DATA, *feats(32), *layers, "--pool", "max2x2", "--head", "linsvc", "--precision", "int8",
                         "--extract", cache=exported["cache"])["run_id"]
        path = exported["root"] / f"int8-{kind}.onnx"
        run_cli("export", "--run", run_id, "-o", path, cache_dir=exported["cache"], check=True)
        out[kind] = {"run_id": run_id, "path": path}
    return out


@needs_int8
@pytest.mark.parametrize("kind", list(INT8_COMPOSED))
def test_an_int8_run_on_several_taps_exports_the_graphs_its_features_came_from(exported, int8_composed, kind):
    import onnx

    run = int8_composed[kind]
    proto = onnx.load(str(run["path"]))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    parts = {n.output[0].split("/")[1] for n in proto.graph.node if n.output[0].startswith("backbone/part")}
    assert parts == (set() if kind == "one_graph" else {"part0", "part1"})
    proc = run_cli("export", "--check", run["path"], "--json", cache_dir=exported["cache"])
    r = json.loads(proc.stdout)
    assert r["images"] == 24 and r["agree"] >= 22 and r["tensorflow_imported"] is False, r
    assert r["max_score_difference"] < 0.02, r


# ---- the head part alone, for every head (no TensorFlow) ---------------------------------------------

HEAD_CASES = [(h, 3, "l2", None, {}) for h in ("linsvc", "svc", "logreg", "mlp", "ridge", "sgd", "knn", "rf")] + [
    (h, 2, "standard", 4, {}) for h in ("linsvc", "svc", "ridge", "sgd", "logreg")] + [
    ("linsvc", 3, "none", None, {"calibrate": True}), ("linsvc", 2, "l2", None, {"calibrate": True}),
    ("svc", 2, "l2", None, {"calibrate": True})]


@pytest.mark.parametrize("head,k,normalize,pca,options", HEAD_CASES)
def test_every_head_converts(tmp_path, head, k, normalize, pca, options):
    """The sklearn part of the file reproduces featurecache's scores and labels, binary decision heads included."""
    import warnings

    from featurecache.export import exporter as export
    from featurecache.export.runtime import session
    from featurecache.heads import make_pipeline, scores
    from featurecache.runs.predict import label_rows
    from featurecache.runs.record import Run

    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(size=(90, 16))).astype(np.float32)
    y = np.arange(90) % k
    x[y == 1, :4] += 1.0
    pipe = make_pipeline(head, options or None, normalize=normalize, pca=pca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(x.copy(), y)
    names = [f"class {c}" for c in range(k)]
    run = Run("test", tmp_path, head=head, class_names=tuple(names), feature_set="none")
    model, kind, err, _ = export.head_part(run, pipe, 16, tmp_path)
    path = tmp_path / "head.onnx"
    path.write_bytes(model.SerializeToString())
    new = np.abs(rng.normal(size=(40, 16))).astype(np.float32)
    got = session(path).run(["scores", "label", "label_name"], {"head/features": new})
    ref = scores(pipe, new.copy())
    assert kind == ref.kind
    assert np.abs(got[0] - ref.values).max() < 1e-4 * max(1.0, np.abs(ref.values).max())
    rows = label_rows([""] * len(new), pipe, new.copy(), names, top=1)
    assert list(got[2]) == [r["label"] for r in rows]


def test_exportable_heads_lists_every_registered_head():
    from featurecache.export.exporter import exportable_heads
    from featurecache.heads import head_names

    assert exportable_heads() == head_names()


# ---- the hand-written glue, against featurecache's own numpy (no TensorFlow) ------------------------------

@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("mode", list(MODES))
def test_preprocessing_glue_is_featurecache_preprocess(tmp_path, mode, size):
    """Every declared mode: its ONNX form gives its numpy form's values, on odd and even images."""
    from featurecache.export.graph import preprocess_model
    from featurecache.export.runtime import session
    from featurecache.encoding.preprocessing import preprocess

    images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    path = tmp_path / "pre.onnx"
    path.write_bytes(preprocess_model(size, mode, "x").SerializeToString())
    got = session(path).run(["x"], {"images": images})[0]
    np.testing.assert_allclose(got, preprocess(images, mode), rtol=1e-6, atol=1e-5)


# every declared pooling on odd and even maps; a vector tap (7,) passes through the stored poolings only
POOLED = [(str(p), shape) for p in Pooling.every() for shape in [(5, 7, 3), (4, 6, 2), (2, 3, 4), (3, 2, 5), (7,)]
          if len(shape) == 3 or not p.is_view]


@pytest.mark.parametrize("pool,shape", POOLED)
def test_pooling_glue_is_featurecache_pooling(tmp_path, pool, shape):
    """Every declared pooling (a new one is covered by being declared): its ONNX form gives the values of its
    numpy form on the maps (what the encoder stores) and on stored flattened rows (a fit-time view), on odd
    and even maps: 2x2 windows dropping odd edges, grid bins as PyTorch's adaptive pooling, and every
    flatten in Keras's NHWC order, the order the cache stores and the head was fitted on."""
    from featurecache.export.graph import FEATURES, pool_model
    from featurecache.export.runtime import session

    pooling = Pooling.parse(pool)
    maps = np.random.default_rng(1).normal(size=(4, *shape)).astype(np.float32)
    model, dims = pool_model([("tap", shape, pool)])
    path = tmp_path / "pool.onnx"
    path.write_bytes(model.SerializeToString())
    got = session(path).run([FEATURES], {"tap": maps})[0]
    want = pooling.maps(maps)
    assert got.shape == want.shape == (4, dims) == (4, pooling.dims(shape))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(Pooling("flatten").maps(maps), maps.reshape(4, -1))  # NHWC rows, as stored
    np.testing.assert_allclose(pooling.rows(maps.reshape(4, -1), shape), want, rtol=1e-6, atol=1e-6)


def test_blocks_are_concatenated_in_order(tmp_path):
    """Several taps (one of them twice, as two blocks) in one pooling model: columns in the blocks' order."""
    from featurecache.export.graph import FEATURES, pool_model
    from featurecache.export.runtime import session

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 5, 4, 3)).astype(np.float32), rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    blocks = [("a", (5, 4, 3), "max2x2"), ("b", (3, 3, 2), "grid2"), ("a", (5, 4, 3), "avg")]
    model, dims = pool_model(blocks)
    path = tmp_path / "pool.onnx"
    path.write_bytes(model.SerializeToString())
    got = session(path).run([FEATURES], {"a": a, "b": b})[0]
    maps = {"a": a, "b": b}
    want = np.hstack([Pooling(p).rows(maps[t].reshape(3, -1), s) for t, s, p in blocks])
    assert got.shape == want.shape == (3, dims) == (3, 2 * 2 * 3 + 2 * 2 * 2 + 3)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,pool,words", [((7,), "max2x2", "vector"), ((1, 4, 3), "avg2x2", "1x4"),
                                              ((4, 4, 3), "median", "unknown")])
def test_pooling_the_glue_cannot_write_is_one_line(shape, pool, words):
    from featurecache.errors import FeatureCacheError
    from featurecache.export.graph import pool_model

    with pytest.raises(FeatureCacheError, match=words):
        pool_model([("tap", shape, pool)])


def test_force_overwrites_and_the_file_is_whole(exported, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    proc = run_cli("export", "--run", exported["logreg"]["run_id"], "-o", out, "--force", cache_dir=exported["cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes() == exported["logreg"]["path"].read_bytes()  # the same run gives the same bytes
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left behind


def test_block_normaliser_converts(tmp_path):
    """A multi-tap fit's normaliser (each tap's block to unit norm, then the row), where the estimator has blocks."""
    from featurecache.export import exporter as export
    from featurecache.heads import L2Normalizer, make_pipeline, scores
    from featurecache.runs.record import Run

    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(60, 8))).astype(np.float32)
    x[:5, :3] = 0  # a block of norm zero stays zero
    pipe = make_pipeline("logreg").set_params(normalize=L2Normalizer(blocks=(3, 5))).fit(x.copy(), np.arange(60) % 3)
    run = Run("test", tmp_path, head="logreg", class_names=("a", "b", "c"), feature_set="none")
    model, kind, err, _ = export.head_part(run, pipe, 8, tmp_path)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["scores"], {"head/features": x})[0]
    np.testing.assert_allclose(got, scores(pipe, x.copy()).values, atol=1e-5)
