"""`featurecache classify`: EfficientNet-Lite0's ImageNet classifier read as a tap, through the encoder and its
engines (tests/backbones/test_efficientnet_lite.py holds the known answers through the Python face)."""

import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import error_line, require, run_cli, run_python
from featurecache.classify import classify
from featurecache.settings import RunSettings


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The known answers as files: coffee as a JPEG at twice its size (decoded at draft scale), chelsea as a PNG."""
    root = tmp_path_factory.mktemp("photos")
    coffee = Image.fromarray(skimage.data.coffee())
    coffee.resize((coffee.width * 2, coffee.height * 2), Image.Resampling.BICUBIC).save(root / "coffee.jpg", quality=92)
    Image.fromarray(skimage.data.chelsea()).save(root / "chelsea.png")
    return [root / "coffee.jpg", root / "chelsea.png"]


def top_lines(stdout: str) -> dict[str, str]:
    """file -> the first class line printed under it."""
    lines, out = stdout.splitlines(), {}
    for k, line in enumerate(lines):
        if not line.startswith(" ") and k + 1 < len(lines):
            out[line] = lines[k + 1].split(maxsplit=2)[1:]
    return out


def test_cli_classifies_on_onnxruntime(photos, tmp_path):
    require("onnxruntime", "onnxruntime is not installed")
    cache = tmp_path / "cache"
    proc = run_cli("classify", *photos, "--engine", "onnxruntime", "--top", "3", cache_dir=cache, check=True)
    assert top_lines(proc.stdout) == {str(photos[0]): ["967", "espresso"], str(photos[1]): ["285", "Egyptian cat"]}
    assert len(proc.stdout.splitlines()) == 2 * 4
    assert any((cache / "engines").glob("*/model.onnx"))  # the classifier ran as a converted graph
    # Once converted, classifying is the engine's work alone: neither Keras nor TensorFlow is imported.
    code = ("import sys\nfrom featurecache.classify import classify\nfrom featurecache.settings import RunSettings\n"
            f"r = classify({str(photos[1])!r}, 1, RunSettings({str(cache)!r}, engine='onnxruntime'))\n"
            "print(r[0][0][0], 'tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    assert run_python(code).split() == ["285", "False", "False"]


def test_cli_on_error_skip_leaves_an_unreadable_file_out(photos, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    cache = tmp_path / "cache"
    failed = run_cli("classify", bad, photos[1], "--engine", "onnxruntime", cache_dir=cache)
    assert failed.returncode == 2 and "notes.jpg" in error_line(failed) and failed.stdout == ""
    proc = run_cli("classify", bad, photos[1], "--engine", "onnxruntime", "--on-error", "skip", cache_dir=cache,
                   check=True)
    assert proc.stdout.splitlines()[:2] == [str(bad), "  skipped (unreadable: see the message above)"]
    assert top_lines(proc.stdout)[str(photos[1])] == ["285", "Egyptian cat"]
    assert "skipped: " in proc.stderr and "notes.jpg" in proc.stderr


def test_cli_refuses_a_model_without_a_classifier(photos, tmp_path):
    proc = run_cli("classify", photos[1], "--model", "vgg16", cache_dir=tmp_path)
    assert proc.returncode == 2 and "--model" in proc.stderr and "efficientnet_lite0" in proc.stderr


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engines_give_tensorflows_probabilities(engine, tmp_path):
    """The classifier tap (global average pooling, dropout, dense, softmax) converts to every engine."""
    require(engine, f"{engine} is not installed")
    images = [skimage.data.coffee(), skimage.data.chelsea(), skimage.data.astronaut()]
    want = classify(images, 1000, RunSettings(tmp_path, engine="tensorflow"))
    got = classify(images, 1000, RunSettings(tmp_path, engine=engine))
    for w, g in zip(want, got):
        w, g = dict((i, p) for i, _, p in w), dict((i, p) for i, _, p in g)
        np.testing.assert_allclose([g[i] for i in range(1000)], [w[i] for i in range(1000)], atol=2e-6)


def test_layers_lists_the_classifier_tap(tmp_path):
    import json

    layers = json.loads(run_cli("layers", "--model", "efficientnet_lite0", "--json", cache_dir=tmp_path,
                                check=True).stdout)["layers"]
    by_name = {row["name"]: row for row in layers}
    assert by_name["predictions"]["shape"] == [1000] and layers[-1]["name"] == "predictions"
    assert by_name["top_activation"]["default"]  # the default tap stays the last conv map
