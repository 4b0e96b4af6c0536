"""`featurecache export`: one ONNX file per run that plain ONNX Runtime runs, image in, label out (issue 17)."""

import hashlib
import json
import shutil
import subprocess
import sys

import joblib
import numpy as np
import pytest
from PIL import Image

from conftest import error_line, run_cli

pytest.importorskip("skl2onnx")
ort = pytest.importorskip("onnxruntime")

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
    proc = run_cli("fit", *DATA, *RUNS[kind], "--json", "-q", "--extract", cache_dir=cache, check=True)
    return json.loads(proc.stdout)["run_id"]


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
    proc = subprocess.run([sys.executable, "-c", PLAIN_ORT, str(path), *map(str, files)], capture_output=True,
                          text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind", list(RUNS))
def test_the_file_alone_labels_every_test_image_as_predict_does(exported, kind):
    run = exported[kind]
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
    assert meta["input_size"] == "32" and meta["resize"] == "nearest" and meta["run_id"] == run["run_id"]
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


def test_int8_is_refused_in_one_line(exported, tmp_path):
    proc = run_cli("export", "--run", exported["linsvc"]["run_id"], "--precision", "int8", "-o", tmp_path / "m.onnx",
                   cache_dir=exported["cache"])
    assert proc.returncode == 2 and "int8" in error_line(proc)


# ---- the head part alone, for every head (no TensorFlow) ---------------------------------------------

HEAD_CASES = [(h, 3, "l2", None, {}) for h in ("linsvc", "svc", "logreg", "mlp", "ridge", "sgd", "knn", "rf")] + [
    (h, 2, "standard", 4, {}) for h in ("linsvc", "svc", "ridge", "sgd", "logreg")] + [
    ("linsvc", 3, "none", None, {"calibrate": True}), ("linsvc", 2, "l2", None, {"calibrate": True}),
    ("svc", 2, "l2", None, {"calibrate": True})]


@pytest.mark.parametrize("head,k,normalize,pca,options", HEAD_CASES)
def test_every_head_converts(tmp_path, head, k, normalize, pca, options):
    """The sklearn part of the file reproduces featurecache's scores and labels, binary decision heads included."""
    import warnings

    from featurecache import export
    from featurecache.export_runtime import session
    from featurecache.heads import make_pipeline, scores
    from featurecache.predict import label_rows

    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(size=(90, 16))).astype(np.float32)
    y = np.arange(90) % k
    x[y == 1, :4] += 1.0
    pipe = make_pipeline(head, options or None, normalize=normalize, pca=pca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(x.copy(), y)
    names = [f"class {c}" for c in range(k)]
    record = {"run_id": "test", "head": head, "class_names": names, "feature_set": "none"}
    model, kind, err, _ = export.head_part(record, pipe, 16, tmp_path)
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
    from featurecache.export import exportable_heads
    from featurecache.heads import head_names

    assert exportable_heads() == head_names()


# ---- the hand-written glue, against featurecache's own numpy (no TensorFlow) ------------------------------

@pytest.mark.parametrize("mode", ["caffe", "tf", "torch", "scale01", "none"])
def test_preprocessing_glue_is_featurecache_preprocess(tmp_path, mode):
    from featurecache.backbones import preprocess
    from featurecache.export_graph import preprocess_model
    from featurecache.export_runtime import session

    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "pre.onnx"
    path.write_bytes(preprocess_model(8, mode, "x").SerializeToString())
    got = session(path).run(["x"], {"images": images})[0]
    np.testing.assert_allclose(got, preprocess(images, mode), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("pool", ["flatten", "avg", "max"])
@pytest.mark.parametrize("shape", [(3, 2, 5), (7,)])
def test_pooling_glue_is_featurecache_pool_maps(tmp_path, pool, shape):
    """flatten must keep Keras's NHWC order: the order the cache stores and the head was fitted on."""
    from featurecache.export_graph import FEATURES, pool_model
    from featurecache.export_runtime import session
    from featurecache.taps import pool_maps

    maps = np.random.default_rng(0).normal(size=(4, *shape)).astype(np.float32)
    model, dims = pool_model("tap", shape, pool)
    path = tmp_path / "pool.onnx"
    path.write_bytes(model.SerializeToString())
    got = session(path).run([FEATURES], {"tap": maps})[0]
    want = pool_maps(maps, pool)
    assert got.shape == want.shape == (4, dims)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_force_overwrites_and_the_file_is_whole(exported, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    proc = run_cli("export", "--run", exported["logreg"]["run_id"], "-o", out, "--force", cache_dir=exported["cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes() == exported["logreg"]["path"].read_bytes()  # the same run gives the same bytes
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left behind


def test_block_normaliser_converts(tmp_path):
    """A multi-tap fit's normaliser (each tap's block to unit norm, then the row), where the estimator has blocks."""
    import inspect

    from featurecache import export
    from featurecache.heads import L2Normalizer, make_pipeline, scores

    if "blocks" not in inspect.signature(L2Normalizer).parameters:
        pytest.skip("L2Normalizer has no blocks here")
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(60, 8))).astype(np.float32)
    x[:5, :3] = 0  # a block of norm zero stays zero
    pipe = make_pipeline("logreg").set_params(normalize=L2Normalizer(blocks=(3, 5))).fit(x.copy(), np.arange(60) % 3)
    record = {"run_id": "test", "head": "logreg", "class_names": ["a", "b", "c"], "feature_set": "none"}
    model, kind, err, _ = export.head_part(record, pipe, 8, tmp_path)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["scores"], {"head/features": x})[0]
    np.testing.assert_allclose(got, scores(pipe, x.copy()).values, atol=1e-5)
