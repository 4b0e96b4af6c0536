"""--precision bf16: OpenVINO's bfloat16 inference precision, a feature set of its own, on CPUs that have it."""

import importlib.util

import numpy as np
import pytest

from conftest import needs, write_digit_folder
from featurecache import engines
from featurecache.api import RunSettings, make_encoder
from featurecache.engines import choice
from featurecache.errors import FeatureCacheError
from featurecache.settings import FeatureSpec, Precision, resolve

SPEC = FeatureSpec("vgg16", "random", ("block4_pool",), size=32)
# openvino and nncf are featurecache's own dependencies: skipped only on a partial install, failed under CI.
needs_openvino = needs(engines.installed("openvino"), "openvino not installed")
needs_nncf = needs(importlib.util.find_spec("nncf") is not None, "int8 needs nncf")


def test_bf16_is_its_own_set_and_old_spellings_stay(tmp_path):
    assert Precision().key() == "fp32" and Precision("bf16").key() == "bf16-openvino"
    assert Precision.parse("bf16") == Precision.parse("bf16-openvino") == Precision("bf16")
    assert Precision.parse("fp32") == Precision() and Precision.parse("int8-openvino-abc") == Precision("int8", "abc")
    f32 = resolve(SPEC, None, tmp_path)
    b16 = resolve(FeatureSpec(**{**SPEC.__dict__, "precision": "bf16"}), None, tmp_path)
    assert b16.keys["block4_pool"]["precision"] == "bf16-openvino"
    assert f32.keys["block4_pool"]["precision"] == "fp32" and f32.set_ids != b16.set_ids


def test_bf16_on_a_cpu_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(choice, "has_bf16", lambda: False)
    with pytest.raises(FeatureCacheError) as e:
        engines.choose("auto", "bf16")
    assert str(e.value) == ("--precision bf16: this CPU has neither AVX512_BF16 nor AMX (no bfloat16 arithmetic); "
                            "use --precision float32, or int8")


def test_bf16_runs_on_openvino_only(monkeypatch):
    monkeypatch.setattr(choice, "has_bf16", lambda: True)
    with pytest.raises(FeatureCacheError, match="--engine onnxruntime: --precision bf16 runs on openvino only"):
        engines.choose("onnxruntime", "bf16")


def test_has_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(choice, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert choice.has_bf16()
    monkeypatch.setattr(choice, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not choice.has_bf16()


@needs_openvino
# A skip CI may keep: bf16 arithmetic is the CPU's (AVX512_BF16 or AMX), which no package installs; -rs shows it.
@pytest.mark.skipif(not choice.has_bf16(), reason="this CPU has no AVX512_BF16 or AMX")
def test_a_real_bf16_extraction_is_within_the_readmes_bound_of_float32(tmp_path):
    """README: bf16 "vgg16 vectors within 0.5% of the feature scale" (0.41% measured on block4_pool at 64 px,
    docs/BENCHMARKS.md). The claim's setting: pretrained HED-VGG16, real images (digits at 32 px), block4_pool.
    Random weights, as the test used before, give a larger error (0.7% by a numpy emulation of bf16 rounding,
    against 0.46% for these weights; the emulation over-states the measured 0.41% by about a tenth). Written on
    a CPU without bf16, where it skips: its first run on a bf16 CPU is its first real measurement."""
    paths = write_digit_folder(tmp_path / "digits", 4, classes=(0, 3, 8))
    spec = FeatureSpec("vgg16", "hed-bsds", ("block4_pool",), size=32, resize="nearest")
    want = make_encoder(spec, RunSettings(tmp_path, engine="openvino"))([str(p) for p in paths])["block4_pool"]
    enc = make_encoder(FeatureSpec(**{**spec.__dict__, "precision": "bf16"}), RunSettings(tmp_path, engine="auto"))
    got = enc([str(p) for p in paths])["block4_pool"]
    assert enc.engine == "openvino"
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < err < 0.005, err  # rounded (bf16 really ran), yet within the README's 0.5% of the feature scale


@needs_openvino
@needs_nncf
def test_a_taps_int8_vectors_do_not_depend_on_the_other_taps_requested(tmp_path):
    """Each tap set has its own int8 graph (calibrated on the same images): block4_pool alone and block4_pool
    beside block5_pool (where its output also feeds block5's quantised convolutions) give the same vectors."""
    from featurecache.backbones import get_backbone
    from featurecache.backbones.build import build_model
    from featurecache.backbones.weights import resolve_weights
    from featurecache.encoding.preprocessing import preprocess
    from featurecache.engines import make_forward
    from featurecache.engines.graphs import Graph

    backbone = get_backbone("vgg16")
    weights = resolve_weights(backbone, "random")
    model = build_model(backbone, weights, 32)
    rng = np.random.default_rng(0)
    calib = preprocess(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), backbone.preprocess)
    x = preprocess(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), backbone.preprocess)
    out = {}
    for taps in (("block4_pool",), ("block4_pool", "block5_pool")):
        fwd = make_forward("openvino", model, Graph("vgg16", weights.id, 32, taps), tmp_path, Precision("int8", "qdq-t"),
                           lambda: calib)
        out[taps] = fwd(x)[0]
    alone, beside = out[("block4_pool",)], out[("block4_pool", "block5_pool")]
    assert np.abs(alone - beside).max() <= 1e-5 * np.abs(alone).max()


def test_the_int8_recipe_is_in_the_key(tmp_path, monkeypatch):
    """A changed recipe (settings.INT8_RECIPE) names other int8 sets; the first recipe's calibration names
    (no recipe id) still parse, and are told apart from the current recipe's."""
    from featurecache import settings
    from featurecache.settings import is_current

    ids = [f"{k:064x}" for k in range(500)]
    _, name = settings.calibration_sample(ids)
    assert name.startswith(settings.int8_recipe_id() + "-") and is_current(name) and not is_current("0123456789ab")
    before = settings.calibrated(FeatureSpec(**{**SPEC.__dict__, "precision": "int8"}), ids)
    monkeypatch.setitem(settings.INT8_RECIPE, "samples", 1000)
    after = settings.calibrated(FeatureSpec(**{**SPEC.__dict__, "precision": "int8"}), ids)
    assert before.calibration != after.calibration
    assert resolve(before, None, tmp_path).set_ids != resolve(after, None, tmp_path).set_ids
    assert Precision.parse(Precision("int8", before.calibration).key()) == Precision("int8", before.calibration)


@needs_openvino
@needs_nncf
def test_plan_weighs_int8_on_the_evidence_at_hand(tmp_path):
    """`plan` times the cached float32 and int8 graphs of these taps now, and pairs the runs in the cache that
    differ only in precision: their test accuracies and the difference in points."""
    import json

    from conftest import fit_run, run_cli

    args = ["--data", "digits", "--max-train", "80", "--max-test", "40", "--model", "vgg16", "--weights", "random",
            "--layer", "block4_pool", "--engine", "openvino"]
    before = json.loads(run_cli("plan", *args, "--json", cache_dir=tmp_path, check=True).stdout)
    [row] = [p for p in before["precisions"] if p["precision"] == "int8"]
    assert "accuracy" not in row and "speed" not in row  # no int8 graph and no runs yet: nothing claimed
    acc = {}
    for p in ("float32", "int8"):
        acc[p] = fit_run(*args, "--precision", p, "--head", "linsvc", "--extract", cache=tmp_path)["test_accuracy"]
    after = json.loads(run_cli("plan", *args, "--json", cache_dir=tmp_path, check=True).stdout)
    [row] = [p for p in after["precisions"] if p["precision"] == "int8"]
    assert row["speed"]["images_per_second"] > 0 and row["speed"]["float32"] > 0
    assert row["speed"]["ratio"] == round(row["speed"]["images_per_second"] / row["speed"]["float32"], 2)
    [pair] = row["accuracy"]
    assert (pair["float32"], pair["int8"]) == (acc["float32"], acc["int8"])
    assert pair["delta_points"] == round(100 * (acc["int8"] - acc["float32"]), 2) and pair["head"] == "linsvc"
    text = run_cli("plan", *args, cache_dir=tmp_path, check=True).stdout
    assert "accuracy on your runs: linsvc" in text and "speed measured now on openvino" in text
