"""`--engine auto` that measures: remembered per machine in cache/engines/choice.json, measured again when
the machine changes or the record is unreadable; a visible GPU wins; --engine still overrides."""

import json
import sys
import types

import numpy as np
import pytest

from conftest import needs
from featurecache import engines
from featurecache.engines import choice
from featurecache.engines.graphs import Graph
from featurecache.extraction.plan import describe

GRAPH = Graph("vgg16", "w0", 32, ("block5_pool",))
RATES = {"onnxruntime": 30.0, "openvino": 40.0, "tensorflow": 20.0}


class Rates:
    """A stand-in for timing the engines: counts the measurements."""

    def __init__(self, rates=RATES):
        self.rates, self.calls = dict(rates), 0

    def __call__(self, engine):
        self.calls += 1
        return self.rates[engine]


def pick(cache, rate, measure=True, log=None):
    return choice.pick(cache, GRAPH, list(RATES), rate, measure, "onnxruntime", log=log)


def test_measured_once_written_and_reused(tmp_path):
    said, rate = [], Rates()
    assert pick(tmp_path, rate, log=said.append) == "openvino" and rate.calls == 3 * choice.ROUNDS
    record = json.loads((tmp_path / "engines" / "choice.json").read_text())
    assert record["machine"] == choice.machine() and record["machine_id"] == choice.machine_id()
    (entry,) = record["choices"].values()
    assert entry["engine"] == "openvino" and entry["images_per_second"] == RATES
    assert any("auto measured vgg16 32px" in m and "using openvino" in m for m in said)
    said.clear()
    assert pick(tmp_path, rate, log=said.append) == "openvino"
    assert rate.calls == 3 * choice.ROUNDS and not said  # reused: no second measurement, nothing said
    again = json.loads((tmp_path / "engines" / "choice.json").read_text())
    assert next(iter(again["choices"].values()))["measured_at"] == entry["measured_at"]
    assert choice.remembered(tmp_path, GRAPH)["engine"] == "openvino"


def test_a_changed_machine_is_measured_again(tmp_path, monkeypatch):
    pick(tmp_path, Rates())
    real = choice.machine()
    monkeypatch.setattr(choice, "machine", lambda: {**real, "libraries": {**real["libraries"], "openvino": "99.0"}})
    said, rate = [], Rates({**RATES, "onnxruntime": 50.0})
    assert pick(tmp_path, rate, log=said.append) == "onnxruntime" and rate.calls == 3 * choice.ROUNDS
    assert any("changed since" in m and "measuring the engines again" in m for m in said)
    record = json.loads((tmp_path / "engines" / "choice.json").read_text())
    assert record["machine"]["libraries"]["openvino"] == "99.0"


@pytest.mark.parametrize("text", ["{not json", '{"format": 1, "choices": []}', "[]"])
def test_a_corrupt_record_is_measured_again_with_a_notice(tmp_path, text):
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "choice.json").write_text(text)
    said, rate = [], Rates()
    assert pick(tmp_path, rate, log=said.append) == "openvino" and rate.calls == 3 * choice.ROUNDS
    assert any("is unreadable" in m and "measuring the engines again" in m for m in said)
    assert json.loads((tmp_path / "engines" / "choice.json").read_text())["format"] == choice.FORMAT


def test_small_jobs_do_not_measure(tmp_path):
    rate = Rates()
    assert pick(tmp_path, rate, measure=False) == "onnxruntime" and rate.calls == 0  # the fixed order
    pick(tmp_path, rate)
    assert pick(tmp_path, rate, measure=False) == "openvino" and rate.calls == 3 * choice.ROUNDS  # what was measured


def test_an_engine_that_cannot_run_is_left_out(tmp_path):
    rate = Rates({**RATES, "openvino": None})
    assert pick(tmp_path, rate) == "onnxruntime"


def stub_build(monkeypatch):
    built = []

    def build(engine, option, model, graph, cache_dir, precision, calibration_images, log, device="cpu"):
        built.append((engine, device))
        return engines.Forward(engine, graph.taps, lambda x: [x], device)

    monkeypatch.setattr(engines, "_build", build)
    return built


def test_auto_takes_a_visible_gpu_and_the_cpu_path_is_unchanged_without(tmp_path, monkeypatch):
    built = stub_build(monkeypatch)
    monkeypatch.setattr(choice, "gpu_engine", lambda installed: "onnxruntime")
    monkeypatch.setattr(choice, "pick", lambda *a, **k: pytest.fail("a GPU needs no measurement"))
    fwd = engines.make_forward("auto", None, GRAPH, tmp_path, measure=True)
    assert (fwd.engine, fwd.device) == ("onnxruntime", "gpu") and built == [("onnxruntime", "gpu")]
    built.clear()
    monkeypatch.setattr(choice, "gpu_engine", lambda installed: None)
    monkeypatch.setattr(choice, "pick", lambda *a, **k: "openvino")
    fwd = engines.make_forward("auto", None, GRAPH, tmp_path)
    assert (fwd.engine, fwd.device) == ("openvino", "cpu") and built == [("openvino", "cpu")]


def test_a_named_engine_overrides_auto(tmp_path, monkeypatch):
    built = stub_build(monkeypatch)
    monkeypatch.setattr(choice, "gpu_engine", lambda installed: pytest.fail("--engine named: no GPU look-up"))
    monkeypatch.setattr(choice, "pick", lambda *a, **k: pytest.fail("--engine named: no measurement"))
    assert engines.make_forward("tensorflow", None, GRAPH, tmp_path, measure=True).engine == "tensorflow"
    assert built == [("tensorflow", "cpu")]


def test_gpu_visibility(monkeypatch):
    fake = types.SimpleNamespace(get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    monkeypatch.setattr(choice, "nvidia_present", lambda: False)
    assert choice.gpu_engine(lambda e: True) is None  # no driver: nothing imported, the CPU path
    monkeypatch.setattr(choice, "nvidia_present", lambda: True)
    assert choice.gpu_engine(lambda e: True) == "onnxruntime"
    fake.get_available_providers = lambda: ["CPUExecutionProvider"]
    tf = types.SimpleNamespace(config=types.SimpleNamespace(list_physical_devices=lambda kind: []))
    monkeypatch.setitem(sys.modules, "tensorflow", tf)
    assert choice.gpu_engine(lambda e: True) is None  # a driver, but no runtime that sees the GPU
    tf.config.list_physical_devices = lambda kind: ["/physical_device:GPU:0"]
    assert choice.gpu_engine(lambda e: True) == "tensorflow"


def test_plan_shows_the_measured_table():
    out = {"model": "vgg16", "weights": "random", "size": 32, "precision": "float32", "images": 10, "to_compute": 0,
           "layers": [], "bytes_to_add": 0, "bytes_after": 0,
           "engines_measured": {"engine": "openvino", "images_per_second": RATES, "measured_at": 0.0},
           "precisions": [{"precision": "bf16", "available": True, "why": "bfloat16 arithmetic on OpenVINO"}]}
    text = describe(out)
    assert "openvino 40.0 images/s, onnxruntime 30.0 images/s, tensorflow 20.0 images/s; auto runs openvino" in text
    assert "--precision bf16: available" in text


@needs(engines.installed("onnxruntime"), "onnxruntime not installed")
def test_a_real_measurement_on_the_users_graph(tmp_path):
    """The real thing, small: vgg16 (random) at 32px to block1_pool on every installed engine."""
    from featurecache.api import FeatureSpec, RunSettings, make_encoder

    said = []
    enc = make_encoder(FeatureSpec("vgg16", "random", ("block1_pool",), size=32),
                       RunSettings(tmp_path, "auto", log=said.append))
    enc.measure = True
    x = np.zeros((2, 32, 32, 3), np.uint8)
    enc.encode_pixels(x)
    (entry,) = json.loads((tmp_path / "engines" / "choice.json").read_text())["choices"].values()
    installed = {e for e in engines.ENGINES if engines.installed(e)}
    assert set(entry["images_per_second"]) == installed and enc.engine == entry["engine"]
    assert any("auto measured" in m for m in said)


def test_reading_a_set_or_loading_a_graph_records_a_use(tmp_path, monkeypatch):
    """`cache prune` goes by last use: a feature set read (fit, predict, serve) or a converted graph loaded
    marks its folder (store.touch_used), so what is in use is not the least recently used."""
    from featurecache.engines import graphs
    from featurecache.fingerprint import key_id
    from featurecache.store.sets import USED_MARKER, FeatureStore

    fs = FeatureStore(tmp_path).open(key_id({"k": 1}), {"k": 1}, 4)
    with fs.lock():
        fs.append([f"{i:032x}" for i in range(3)], np.ones((3, 4), np.float32))
    assert not (fs.folder / USED_MARKER).exists()
    fs.gather([f"{i:032x}" for i in range(3)])
    assert (fs.folder / USED_MARKER).exists()
    folder = GRAPH.folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"onnx")
    assert graphs.convert("onnxruntime", None, GRAPH, tmp_path) == folder / "model.onnx"
    assert (folder / USED_MARKER).exists()
