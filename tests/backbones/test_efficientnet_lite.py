"""EfficientNet-Lite0 in Keras with the offline PyTorch weights: reader, loader, known answers."""

import collections
import io
import os
import pickle
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import skimage.data
import sklearn.datasets
from PIL import Image

from featurecache.backbones import efficientnet_lite as lite
from featurecache.backbones.torch_pickle import load_state_dict
from featurecache.classify import classify
from featurecache.errors import FeatureCacheError
from featurecache.settings import RunSettings

PTH = lite.default_weights_path()


@pytest.fixture(scope="module")
def state():
    return load_state_dict(PTH)


@pytest.fixture(scope="module")
def pretrained():
    return lite.efficientnet_lite0(include_top=True, weights=PTH, classifier_activation=None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """classify's settings, with a cache of this module's own for the converted graphs."""
    return RunSettings(tmp_path_factory.mktemp("classify-cache"))


@pytest.fixture(scope="module")
def small_headless():
    """A 32x32 headless model the loading tests may overwrite."""
    return lite.efficientnet_lite0((32, 32, 3))


# ---- a hand-written zip checkpoint, as torch.save writes it, without torch ----------------------

class _Global:
    """Pickled as a bare GLOBAL opcode, so the file names torch's functions without importing torch."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise AssertionError("only ever pickled")


class _Storage:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return _Global("torch._utils", "_rebuild_tensor_v2"), self.args


class _TorchPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[_Global] = lambda self, g: self.write(pickle.GLOBAL + f"{g.module}\n{g.name}\n".encode())

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            kind = {"float32": "FloatStorage", "int64": "LongStorage"}[obj.array.dtype.name]
            return "storage", _Global("torch", kind), obj.key, "cpu", obj.array.size
        return None


def write_zip_pth(path, tensors=None, storages=(), data_pkl=None):
    """`tensors`: name -> array (contiguous) or _Tensor over `storages`; or raw `data_pkl` bytes."""
    refs, storages = collections.OrderedDict(), list(storages)
    for name, t in (tensors or {}).items():
        if isinstance(t, np.ndarray):
            storages.append(_Storage(str(len(storages)), t.ravel()))
            t = _Tensor(storages[-1], 0, t.shape, [int(np.prod(t.shape[i + 1:])) for i in range(t.ndim)])
        refs[name] = t
    if data_pkl is None:
        buf = io.BytesIO()
        _TorchPickler(buf, protocol=2).dump(refs)
        data_pkl = buf.getvalue()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for s in storages:
            zf.writestr(f"archive/data/{s.key}", s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())
    return path


# ---- the state-dict reader ------------------------------------------------------------------

def test_reader_returns_the_checkpoint(state):
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.1._depthwise_conv.weight"].shape == (96, 1, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.bias"].shape == (1000,)
    counter = state["_bn1.num_batches_tracked"]
    assert counter.shape == () and counter.dtype == np.int64
    floats = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    assert len(floats) == 247 and all(v.dtype == np.float32 for v in floats)
    assert sum(v.size for v in floats) == 4_694_024
    assert np.all(state["_bn0.running_var"] >= 0)  # some channels are dead: exactly 0


def test_reader_zip_format_with_strided_views(tmp_path):
    base = np.arange(24, dtype=np.float32)
    storage = _Storage("s", base)
    path = write_zip_pth(tmp_path / "zip.pth", {
        "plain": np.arange(6, dtype=np.int64).reshape(2, 3),
        "transposed": _Tensor(storage, 2, (3, 4), (1, 3)),  # a .t() view at an offset
        "empty": _Tensor(storage, 0, (0, 5), (5, 1)),
    }, storages=[storage])
    sd = load_state_dict(path)
    np.testing.assert_array_equal(sd["plain"], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(sd["transposed"], base[2:14].reshape(4, 3).T)
    assert sd["empty"].shape == (0, 5)
    assert sd["transposed"].flags.writeable


@pytest.mark.parametrize("cut", [0.5, 0.999, 100 / 18_826_032])
def test_truncated_checkpoint_names_the_file(tmp_path, cut):
    data = PTH.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(FeatureCacheError, match="truncated.pth"):
        load_state_dict(bad)


def test_corrupt_zip_and_garbage_name_the_file(tmp_path):
    good = write_zip_pth(tmp_path / "good.pth", {"w": np.ones(3, np.float32)})
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:-40])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    for path in (cut, junk):
        with pytest.raises(FeatureCacheError, match=path.name):
            load_state_dict(path)
    with pytest.raises(FeatureCacheError, match="missing.pth"):
        load_state_dict(tmp_path / "missing.pth")


def test_view_past_its_storage_is_refused(tmp_path):
    storage = _Storage("s", np.zeros(4, np.float32))
    path = write_zip_pth(tmp_path / "oob.pth", {"w": _Tensor(storage, 2, (100,), (1,))}, storages=[storage])
    with pytest.raises(FeatureCacheError, match="oob.pth.*past its storage"):
        load_state_dict(path)


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_pickle_calling_other_globals_is_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = tmp_path / "evil.pth"
    if kind == "zip":
        write_zip_pth(path, data_pkl=evil)
    else:
        path.write_bytes(evil)
    with pytest.raises(FeatureCacheError, match=r"evil.pth.*os\.system"):
        load_state_dict(path)
    assert not marker.exists()


# ---- the Keras model and the weight mapping ------------------------------------------------

def test_every_keras_weight_is_its_checkpoint_tensor(pretrained, state):
    names, used = lite.torch_names(), set()
    for layer in (layer for layer in pretrained.layers if layer.weights):
        prefix = names[layer.name]
        got = [np.asarray(w) for w in layer.weights]
        if layer.__class__.__name__ == "BatchNormalization":
            want = [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
        elif layer.__class__.__name__ == "DepthwiseConv2D":
            want = [state[f"{prefix}.weight"].transpose(2, 3, 0, 1)]
        elif layer.__class__.__name__ == "Conv2D":
            want = [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
        else:
            want = [state[f"{prefix}.weight"].T, state[f"{prefix}.bias"]]
        assert len(got) == len(want), layer.name
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w, err_msg=layer.name)
        used.add(prefix)
    assert used == {k.rsplit(".", 1)[0] for k in state}
    assert pretrained.count_params() == 4_694_024


def test_headless_model_skips_only_the_classifier(small_headless, pretrained):
    lite.load_torch_weights(small_headless, PTH)  # would raise on any leftover besides _fc
    assert "predictions" not in [layer.name for layer in small_headless.layers]
    full = {layer.name: layer for layer in pretrained.layers}
    loaded = [layer for layer in small_headless.layers if layer.weights]
    assert len(loaded) == len([layer for layer in pretrained.layers if layer.weights]) - 1  # all but the classifier
    for layer in loaded:  # every other weight is the checkpoint's, as in the full model
        for got, want in zip(layer.get_weights(), full[layer.name].get_weights()):
            np.testing.assert_array_equal(got, want)


def test_checkpoint_with_missing_or_extra_tensors_fails(tmp_path, state, small_headless):
    floats = {k: v for k, v in state.items() if v.dtype == np.float32}
    missing = dict(floats)
    del missing["_blocks.7._bn1.running_var"]
    with pytest.raises(FeatureCacheError, match=r"missing.pth: no tensor _blocks\.7\._bn1\.running_var"):
        lite.load_torch_weights(small_headless, write_zip_pth(tmp_path / "missing.pth", missing))
    extra = dict(floats, **{"_blocks.16._bn1.weight": np.ones(4, np.float32)})
    with pytest.raises(FeatureCacheError, match=r"extra.pth: 1 tensors have no Keras weight"):
        lite.load_torch_weights(small_headless, write_zip_pth(tmp_path / "extra.pth", extra))
    wrong = dict(floats, **{"_fc.bias": np.ones(10, np.float32)})
    top = lite.efficientnet_lite0((32, 32, 3), include_top=True)
    with pytest.raises(FeatureCacheError, match=r"wrong.pth: layer predictions needs shapes"):
        lite.load_torch_weights(top, write_zip_pth(tmp_path / "wrong.pth", wrong))


def test_random_weights_depend_only_on_the_seed():
    first, again, other = (lite.efficientnet_lite0((32, 32, 3), seed=s) for s in (0, 0, 1))
    for a, b in zip(first.weights, again.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernels = [(np.asarray(a), np.asarray(c)) for a, c in zip(first.weights, other.weights)
               if "kernel" in a.path]
    assert len(kernels) == 49 and all(not np.array_equal(a, c) for a, c in kernels)
    # Same-shaped layers must not share one draw.
    b, c = (np.asarray(first.get_layer(f"block4{x}_expand_conv").kernel) for x in "bc")
    assert b.shape == c.shape and not np.array_equal(b, c)


def test_the_classifier_leaves_the_random_backbone_as_it_was():
    """featurecache builds Lite0 with its classifier (the `predictions` tap): the random weights of every
    other layer, which random-weight feature sets are keyed by, stay those of the headless model."""
    headless, full = lite.efficientnet_lite0((32, 32, 3), seed=2), lite.efficientnet_lite0((32, 32, 3), True, seed=2)
    assert [l.name for l in full.layers][-3:] == ["avg_pool", "top_dropout", "predictions"]
    for layer in headless.layers:
        for a, b in zip(layer.get_weights(), full.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b, err_msg=layer.name)


@pytest.mark.parametrize("input_shape,size,spatial", [
    ((32, 32, 3), (32, 32), (1, 1)),
    ((64, 64, 3), (64, 64), (2, 2)),
    ((None, None, 3), (97, 131), (4, 5)),
])
def test_headless_model_takes_small_and_odd_sizes(input_shape, size, spatial):
    model = lite.efficientnet_lite0(input_shape)
    assert model.name == "efficientnet_lite0" and model.layers[-1].name == "top_activation"
    x = np.zeros((2, *size, 3), np.float32)
    assert model.predict(x, verbose=0).shape == (2, *spatial, 1280)
    for name in lite.stage_outputs():
        model.get_layer(name)


def test_stage_outputs_at_224(pretrained):
    shapes = {n: tuple(pretrained.get_layer(n).output.shape[1:]) for n in lite.stage_outputs()}
    assert shapes == {
        "block1a_project_bn": (112, 112, 16), "block2b_add": (56, 56, 24), "block3b_add": (28, 28, 40),
        "block4c_add": (14, 14, 80), "block5c_add": (14, 14, 112), "block6d_add": (7, 7, 192),
        "block7a_project_bn": (7, 7, 320), "top_activation": (7, 7, 1280)}
    assert len([l for l in pretrained.layers if l.name.endswith("_add")]) == 9


def test_too_small_input_is_refused():
    with pytest.raises(FeatureCacheError, match=r"input_shape \(16, 16, 3\)"):
        lite.efficientnet_lite0((16, 16, 3))


def test_preprocess_input_is_tf_mode():
    assert lite.PREPROCESS_MODE == "tf"
    np.testing.assert_allclose(lite.preprocess_input(np.array([0, 127.5, 255])), [-1, 0, 1])
    assert lite.preprocess_input(np.zeros(2, np.uint8)).dtype == np.float32


# ---- known answers with the real weights ---------------------------------------------------

def test_known_answers(tmp_path, run):
    chelsea = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(chelsea)
    flower = sklearn.datasets.load_sample_image("flower.jpg")
    results = classify([skimage.data.coffee(), chelsea, flower], top=3, run=run)
    assert [r[0][:2] for r in results] == [(967, "espresso"), (285, "Egyptian cat"), (985, "daisy")]
    assert all(len(r) == 3 and r[0][2] >= r[1][2] >= r[2][2] for r in results)
    assert classify(str(chelsea), top=1, run=run)[0][0][0] == 285


def test_pretrained_logits_match_classify(pretrained, run):
    x = np.asarray(Image.fromarray(skimage.data.coffee()).resize((224, 224), Image.BILINEAR))
    logits = pretrained.predict(lite.preprocess_input(x[None]), verbose=0)[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    index, _, p = classify(skimage.data.coffee(), top=1, run=run)[0][0]
    assert index == int(np.argmax(logits)) and p == pytest.approx(probs[index], abs=1e-5)


def test_classify_names_a_non_image_file(tmp_path, run):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(FeatureCacheError, match="notes.txt"):
        classify([text], run=run)
    with pytest.raises(FeatureCacheError, match="top=0"):
        classify([text], top=0, run=run)


def test_classify_refuses_a_decompression_bomb_before_decoding(tmp_path, run):
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = tmp_path / "bomb.png"  # declares 30000x30000 in its header, holds a few bytes
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    with pytest.raises(FeatureCacheError, match="bomb.png: declares .*over the limit"):
        classify([bomb], run=run)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(small)
    with pytest.raises(FeatureCacheError, match=r"small.png: declares 50x40 pixels, over the limit of 1,000"):
        classify([small], run=run, max_pixels=1000)  # the same guard as extraction's, with its limit
