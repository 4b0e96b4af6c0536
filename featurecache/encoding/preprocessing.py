"""Preprocessing: uint8 RGB pixels -> a network's float input, each mode declared once with both its forms.

The modes are those of `keras.applications.imagenet_utils`, plus `scale01`: caffe (BGR minus the ImageNet
mean: VGG, ResNet), tf (scaled to -1..1), torch (0..1, then standardised per channel: DenseNet), none
(0..255 as floats: models that rescale inside) and scale01 (divided by 255, the classic blog's setup,
whatever the model). A backbone names its mode (`backbones.Backbone.preprocess`); `--preprocess` picks it
(`auto`) or scale01.

A mode is a channel order and a list of elementwise steps, so its numpy form (`preprocess`, which every
engine's input goes through, outside the graph) and its ONNX form (`onnx_nodes`, the glue before an
exported backbone) are both read from the one declaration in `MODES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FeatureCacheError

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
OPTIONS = ("auto", "scale01")  # --preprocess: the model's own mode, or scale01 whatever the model


@dataclass(frozen=True)
class Mode:
    bgr: bool = False  # RGB -> BGR first (caffe)
    steps: tuple = ()  # ("sub" | "div", constant): applied in order to the float32 pixels


MODES: dict[str, Mode] = {
    "caffe": Mode(bgr=True, steps=(("sub", CAFFE_MEAN_BGR),)),
    "tf": Mode(steps=(("div", 127.5), ("sub", 1.0))),
    "torch": Mode(steps=(("div", 255.0), ("sub", TORCH_MEAN), ("div", TORCH_STD))),
    "scale01": Mode(steps=(("div", 255.0),)),
    "none": Mode(),
}


def _mode(mode: str) -> Mode:
    try:
        return MODES[mode]
    except KeyError:
        raise FeatureCacheError(f"--preprocess {mode}: unknown; use one of {', '.join(OPTIONS)}") from None


def preprocess(batch: np.ndarray, mode: str) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) -> float32 network input (the numpy form)."""
    m = _mode(mode)
    x = batch.astype(np.float32)
    if m.bgr:
        x = x[..., ::-1]
    for op, value in m.steps:
        x = x - value if op == "sub" else x / value
    return x


def onnx_nodes(mode: str, src: str, out: str) -> tuple[list, list]:
    """(nodes, initialisers) taking uint8 NHWC RGB `src` to float32 `out` as `preprocess` does (the ONNX form)."""
    from onnx import TensorProto, helper, numpy_helper

    m = _mode(mode)
    nodes = [helper.make_node("Cast", [src], ["pre/x"], to=TensorProto.FLOAT)]
    inits, x = [], "pre/x"
    if m.bgr:
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), "pre/bgr/idx"))
        nodes.append(helper.make_node("Gather", [x, "pre/bgr/idx"], ["pre/bgr"], axis=3))
        x = "pre/bgr"
    for k, (op, value) in enumerate(m.steps):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), f"pre/{k}/c"))
        nodes.append(helper.make_node("Sub" if op == "sub" else "Div", [x, f"pre/{k}/c"], [f"pre/{k}"]))
        x = f"pre/{k}"
    nodes.append(helper.make_node("Identity", [x], [out]))
    return nodes, inits


def preprocess_mode(backbone, option: str) -> str:
    """The mode `--preprocess option` means for `backbone` (a backbones.Backbone)."""
    if option == "auto":
        return backbone.preprocess
    if option == "scale01":
        return "scale01"
    raise FeatureCacheError(f"--preprocess {option}: unknown; use one of {', '.join(OPTIONS)}")
