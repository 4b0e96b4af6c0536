"""Real offline weights (HED VGG16 trunk, EfficientNet-Lite0) as backbones, and the weights part of the key."""

import shutil

import numpy as np
import pytest

from conftest import run_python
from featurecache.api import DataOptions, RunSettings, dataset_features
from featurecache.backbones import BACKBONES, get_backbone
from featurecache.backbones.build import build_model
from featurecache.backbones.vgg16_hed import VGG16_CONVS, read_hed_convs
from featurecache.backbones.weights import offline_path, resolve_weights
from featurecache.errors import FeatureCacheError
from featurecache.extraction.extract import FeatureSpec, resolve


def test_models_cover_the_keras_families():
    for name in ("vgg16", "vgg19", "resnet50", "resnet50v2", "inceptionv3", "xception", "mobilenet",
                 "mobilenetv2", "mobilenetv3small", "densenet121", "efficientnetb0", "efficientnetb7",
                 "efficientnetv2s", "convnext_tiny", "efficientnet_lite0"):
        assert name in BACKBONES
    assert get_backbone("inceptionv3").min_size == 75


def test_hed_weights_fill_every_vgg16_conv():
    vgg = get_backbone("vgg16")
    w = resolve_weights(vgg, "hed-bsds")
    model = build_model(vgg, w, 32)
    stored = read_hed_convs(w.path)
    assert sorted(stored) == sorted(VGG16_CONVS)
    for name, (kernel, bias) in stored.items():
        got_k, got_b = model.get_layer(name).get_weights()
        assert np.array_equal(got_k, kernel) and np.array_equal(got_b, bias), name


def test_weights_id_follows_file_content(tmp_path):
    vgg = get_backbone("vgg16")
    src = offline_path(vgg.offline[0])
    copy = tmp_path / "hed.weights.h5"
    shutil.copy(src, copy)
    a = resolve_weights(vgg, str(copy), cache_dir=tmp_path)
    assert a.id == resolve_weights(vgg, str(copy), cache_dir=tmp_path).id  # memoized, same answer
    with open(copy, "r+b") as f:
        f.seek(-16, 2)
        f.write(b"0123456789abcdef")
    b = resolve_weights(vgg, str(copy), cache_dir=tmp_path)
    assert a.id != b.id
    key = lambda w: resolve(FeatureSpec("vgg16", w, size=32), 8, tmp_path).set_ids  # noqa: E731
    assert key("hed-bsds") != key("random") and key("random") == key("random")


def test_offline_weights_resolve_without_tensorflow(tmp_path):
    code = ("import sys; from featurecache.backbones import get_backbone\n"
            "from featurecache.backbones.weights import resolve_weights\n"
            "for m, w in (('vgg16', 'hed-bsds'), ('efficientnet_lite0', 'imagenet')):\n"
            f"    assert resolve_weights(get_backbone(m), w, cache_dir=Path({str(tmp_path)!r})).path.is_file()\n"
            "print('tensorflow' in sys.modules)")
    assert run_python("from pathlib import Path\n" + code).strip() == "False"


def test_keras_weights_file_path(tmp_path):
    vgg = get_backbone("vgg16")
    model = build_model(vgg, resolve_weights(vgg, "random", seed=5), 32)
    path = tmp_path / "mine.weights.h5"
    model.save_weights(path)
    loaded = build_model(vgg, resolve_weights(vgg, str(path)), 32)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        assert np.array_equal(a, b)
    bad = tmp_path / "other.weights.h5"
    build_model(get_backbone("mobilenet"), resolve_weights(get_backbone("mobilenet"), "random"), 32).save_weights(bad)
    with pytest.raises(FeatureCacheError, match="cannot load into headless vgg16"):
        build_model(vgg, resolve_weights(vgg, str(bad)), 32)


def test_efficientnet_lite0_extracts_named_taps(cache):
    ds = DataOptions("digits", max_train=40, max_test=20).load()
    spec = FeatureSpec("efficientnet_lite0", "imagenet", ("block5c_add",), pool="avg")
    res, x_train, _ = dataset_features(ds, spec, RunSettings(cache, progress=False), compute=True)
    assert res.size == 32 and res.preprocess_mode == "tf" and x_train.shape == (40, 112)
    assert res.weights.id.startswith("imagenet-")  # the shipped .pth, identified by its content hash
    with pytest.raises(FeatureCacheError, match="--weights hed-bsds: not a file"):
        resolve(FeatureSpec("efficientnet_lite0", "hed-bsds"), 8, cache)


def test_hed_features_beat_random_features_on_fashion_mnist(fashion_small):
    """The weights are real: same network, same head, pretrained trunk wins clearly (83.8% vs 76.5% here)."""
    from featurecache.heads import make_pipeline

    ds = fashion_small["ds"]
    acc = {}
    for weights in ("hed-bsds", "random"):
        spec = FeatureSpec("vgg16", weights, ("block3_pool",), size=32)
        run = RunSettings(fashion_small["cache"], progress=False)
        _, x_train, x_test = dataset_features(ds, spec, run, compute=True)
        head = make_pipeline("linsvc", {}, "l2", None).fit(x_train, ds.train.labels)
        acc[weights] = head.score(x_test, ds.test.labels)
    assert acc["hed-bsds"] >= acc["random"] + 0.04, acc
    assert acc["hed-bsds"] > 0.78, acc


def test_stage_lists_name_real_taps():
    from featurecache.backbones.efficientnet_lite import stage_outputs as lite0_stages
    from featurecache.runs.sweep import stage_outputs
    from featurecache.encoding.taps import catalogue

    assert get_backbone("efficientnet_lite0").stages == lite0_stages()
    vgg = get_backbone("vgg16")
    names = [t.name for t in catalogue(vgg, 64, None)]
    assert set(vgg.stages) <= set(names)
    # The shape rule used for models without a list: one tap per resolution, deepest last.
    assert stage_outputs(catalogue(get_backbone("mobilenetv2"), 64, None))[-1] == "out_relu"
