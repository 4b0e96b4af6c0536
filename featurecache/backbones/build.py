"""Making a headless Keras model for a (backbone, weights, input size): the one place TF is imported."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ..errors import FeatureCacheError
from . import Backbone
from .weights import Weights


def build_model(backbone: Backbone, weights: Weights, size: int):
    """The backbone without its classifier (EfficientNet-Lite0 keeps its own as a tap), input
    (size, size, 3), weights loaded, frozen."""
    import keras

    backbone.check_size(size)
    # Fresh name counters: auto-named layers (MobileNetV3's activation_17...) must not depend on
    # what this process built before, or layer taps would change names between runs.
    keras.backend.clear_session()
    keras.utils.set_random_seed(weights.seed)
    shape = (size, size, 3)
    if backbone.name == "efficientnet_lite0":
        from .efficientnet_lite import efficientnet_lite0

        path = weights.path if weights.kind == "file" else None
        # With its classifier: `predictions` (ImageNet softmax) is a tap like any other (featurecache
        # classify reads it); a graph holds only the layers its taps reach, so other taps pay nothing.
        model = efficientnet_lite0(input_shape=shape, include_top=True, weights=path, seed=weights.seed)
    else:
        model = _keras_application(keras, backbone, weights, shape)
        if weights.kind == "file":
            _load_file(model, backbone, weights)
    model.trainable = False
    return model


def _keras_application(keras, backbone: Backbone, weights: Weights, shape):
    cls = getattr(keras.applications, backbone.keras_class)
    if weights.kind != "imagenet":
        return cls(include_top=False, weights=None, input_shape=shape)
    try:
        return cls(include_top=False, weights="imagenet", input_shape=shape)
    except Exception as e:  # urllib/HTTP/OS errors all mean the same thing to the user
        offline = [f"--model {n} --weights {w}" for n, w in _offline_choices()]
        raise FeatureCacheError(
            f"--weights imagenet: could not get Keras's ImageNet weights for {backbone.name} "
            f"({type(e).__name__}: no network?); offline alternatives: {'; '.join(offline)}") from e


def _offline_choices():
    from . import BACKBONES

    return [(b.name, w.name) for b in BACKBONES.values() for w in b.offline]


def _load_file(model, backbone: Backbone, weights: Weights) -> None:
    from .vgg16_hed import load_hed_into

    if weights.label == "hed-bsds":
        load_hed_into(model, weights.path)
        return
    try:
        model.load_weights(str(weights.path))
    except Exception as e:
        raise FeatureCacheError(
            f"--weights {weights.path}: cannot load into headless {backbone.name} ({str(e).splitlines()[0][:160]}); "
            "give a Keras weights file saved from the same architecture without its top") from e
