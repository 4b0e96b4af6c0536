"""Name what is in an image: ImageNet-1k top-k from EfficientNet-Lite0's classifier, with its offline weights.

Not a chain of its own: the classifier's softmax is a tap of the backbone (`predictions`, listed by
`featurecache layers --model efficientnet_lite0`), so images reach it through the `Encoder` as they reach
any tap in an extraction: the same decoding (JPEG draft, the pixel-count guard), resize rule and
preprocessing, on any engine, with the same on-error policy. A vector tap passes through pooling as it is.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .encoding import images as imagelib
from .backbones import LITE0_CLASSIFIER
from .encoding.encoder import Encoder, EncoderDescription
from .errors import FeatureCacheError
from .backbones.imagenet_classes import IMAGENET_CLASSES
from .settings import FeatureSpec, RunSettings, default_cache_dir

# The backbones whose classifier is a tap (model -> tap), with the weights that make its classes mean something.
CLASSIFIERS = {"efficientnet_lite0": LITE0_CLASSIFIER}
MODELS = tuple(CLASSIFIERS)
WEIGHTS = "imagenet"
SIZE = 224  # the resolution the weights were trained at


def classifier_spec(model: str = MODELS[0]) -> FeatureSpec:
    """The feature settings whose one vector is `model`'s ImageNet probabilities."""
    if model not in CLASSIFIERS:
        raise FeatureCacheError(f"--model {model}: classify supports {', '.join(MODELS)} (an offline ImageNet "
                                "classifier); use --model efficientnet_lite0")
    return FeatureSpec(model, WEIGHTS, (CLASSIFIERS[model],), size=SIZE)


# The network is made once per process and setting: a caller classifying batch after batch pays it once.
@functools.lru_cache(maxsize=4)
def _encoder(description: EncoderDescription) -> Encoder:
    return description.build()


def classify(items, top: int = 5, run: RunSettings | None = None, model: str = MODELS[0],
             max_pixels: int = imagelib.MAX_PIXELS) -> list[list[tuple[int, str, float]]]:
    """Per item, the `top` most likely ImageNet classes as (index, label, probability), best first.

    Items are image files, encoded bytes or uint8 pixel arrays (grey, RGB or RGBA); a single one also
    works. `run` gives the engine, batch size, cache folder (converted graphs) and on-error policy
    (default: auto, 64, $FEATURECACHE_DIR or ./cache, fail); under `skip` an unreadable item gets an empty
    list and its reason is said through `run.say`. A file declaring more than `max_pixels` pixels is
    refused before it is decoded.
    """
    if not 1 <= top <= len(IMAGENET_CLASSES):
        raise FeatureCacheError(f"top={top}: must be between 1 and {len(IMAGENET_CLASSES)}")
    spec = classifier_spec(model)
    single = isinstance(items, (str, os.PathLike, bytes)) or (isinstance(items, np.ndarray) and items.ndim < 4)
    items = [items] if single else list(items)
    if not items:
        return []
    run = run or RunSettings(default_cache_dir())
    encoder = _encoder(EncoderDescription(spec, str(Path(run.cache_dir).absolute()), run.engine, run.on_error,
                                          max_pixels))
    encoder.log = run.say  # the engine's notices (a graph converted once) go where this run's messages go
    names = [None if isinstance(item, (str, os.PathLike)) else f"image {k}" for k, item in enumerate(items)]
    out: list[list[tuple[int, str, float]]] = [[] for _ in items]
    for start in range(0, len(items), run.batch_size):
        keys = list(range(start, min(start + run.batch_size, len(items))))
        encoded = encoder.encode([items[k] for k in keys], [names[k] for k in keys], keys)
        for why in encoded.skipped.values():
            run.say(f"skipped: {why}")
        for k, probs in zip(encoded.keys, encoded.vectors.get(spec.layers[0], [])):
            best = np.argsort(-probs, kind="stable")[:top]
            out[k] = [(int(i), IMAGENET_CLASSES[i], float(probs[i])) for i in best]
    return out
