"""Keras functional model -> ONNX graph of the requested taps, written from the layers' own weights.

A small hand exporter rather than tf2onnx: the backbones are plain conv / depthwise / BN / ReLU /
pool / add nets, tf2onnx does not follow Keras 3 and TF 2.21, and writing the graph ourselves lets us
fix the layout (NCHW inside, NHWC in and out, as the rest of featurecache expects) and TF's "same"
padding (extra pixel after, not before) exactly. Only the layers the taps depend on are emitted.
A layer type it does not know raises `Unsupported`; the caller falls back to TensorFlow or says so.
"""

from __future__ import annotations

import numpy as np

FORMAT = 1  # bump when the graph this writes for the same model changes
OPSET = 17
INPUT = "input"


class Unsupported(Exception):
    """The model holds a layer (or a layer option) this exporter cannot write."""


def _inputs(layer) -> list:
    node = layer._inbound_nodes[0]
    return [t._keras_history.operation for t in node.input_tensors]


def _shape(tensor) -> tuple:
    return tuple(tensor.shape)[1:]


def _same_pads(size_in: tuple, kernel: tuple, strides: tuple, dilation=(1, 1)) -> list[int]:
    """TF's SAME rule: total padding split with the odd pixel after (ONNX's SAME_UPPER, made explicit)."""
    before, after = [], []
    for n, k, s, d in zip(size_in, kernel, strides, dilation):
        k = (k - 1) * d + 1
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        before.append(total // 2)
        after.append(total - total // 2)
    return before + after


class _Graph:
    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _activation(g: _Graph, name: str, x: str, act: str) -> str:
    if act == "linear":
        return x
    if act == "relu":
        return g.node("Relu", [x], name)
    if act == "softmax":
        return g.node("Softmax", [x], name, axis=-1)
    raise Unsupported(f"activation {act}")


def _dense(g: _Graph, layer, x: str) -> str:
    """A classifier on a pooled vector (EfficientNet-Lite0's `predictions` tap): (N, in) @ (in, out) + b."""
    if len(_shape(layer.input)) != 1:
        raise Unsupported(f"Dense on a {len(_shape(layer.input))}-D input")
    cfg, w = layer.get_config(), layer.get_weights()
    ins = [x, g.const(f"{layer.name}/W", w[0].astype(np.float32))]
    if cfg.get("use_bias"):
        ins.append(g.const(f"{layer.name}/B", w[1].astype(np.float32)))
    act = cfg.get("activation", "linear")
    out = g.node("Gemm", ins, layer.name if act == "linear" else f"{layer.name}/gemm")
    return _activation(g, layer.name, out, act)


def _conv(g: _Graph, layer, x: str, depthwise: bool) -> str:
    cfg = layer.get_config()
    w = layer.get_weights()
    kernel = w[0]
    if depthwise:  # (kh, kw, C, mult) -> (C*mult, 1, kh, kw), one group per input channel
        kh, kw, c, mult = kernel.shape
        onnx_w = kernel.transpose(2, 3, 0, 1).reshape(c * mult, 1, kh, kw)
        group = c
    else:  # (kh, kw, in, out) -> (out, in, kh, kw)
        if cfg.get("groups", 1) != 1:
            raise Unsupported("grouped Conv2D")
        onnx_w = kernel.transpose(3, 2, 0, 1)
        group = 1
    strides, dilation = tuple(cfg["strides"]), tuple(cfg["dilation_rate"])
    size_in = _shape(layer.input)[:2]
    if cfg["padding"] == "same":
        pads = _same_pads(size_in, onnx_w.shape[2:], strides, dilation)
    elif cfg["padding"] == "valid":
        pads = [0, 0, 0, 0]
    else:
        raise Unsupported(f"padding {cfg['padding']}")
    ins = [x, g.const(f"{layer.name}/W", np.ascontiguousarray(onnx_w, np.float32))]
    if cfg.get("use_bias"):
        ins.append(g.const(f"{layer.name}/B", w[1].astype(np.float32)))
    act = cfg.get("activation", "linear")
    out = g.node("Conv", ins, layer.name if act == "linear" else f"{layer.name}/conv", group=group,
                 strides=list(strides), dilations=list(dilation), pads=pads, kernel_shape=list(onnx_w.shape[2:]))
    return _activation(g, layer.name, out, act)


def _batchnorm(g: _Graph, layer, x: str) -> str:
    cfg = layer.get_config()
    if cfg["axis"] not in (-1, 3, [-1], [3]):
        raise Unsupported(f"BatchNormalization on axis {cfg['axis']}")
    w = iter(layer.get_weights())
    c = _shape(layer.output)[-1]
    gamma = next(w) if cfg["scale"] else np.ones(c, np.float32)
    beta = next(w) if cfg["center"] else np.zeros(c, np.float32)
    mean, var = next(w), next(w)
    ins = [x] + [g.const(f"{layer.name}/{k}", v.astype(np.float32))
                 for k, v in (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var))]
    return g.node("BatchNormalization", ins, layer.name, epsilon=float(cfg["epsilon"]))


def _relu(g: _Graph, layer, x: str) -> str:
    cfg = layer.get_config()
    if cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
        raise Unsupported("leaky or thresholded ReLU")
    if cfg.get("max_value") is None:
        return g.node("Relu", [x], layer.name)
    return g.node("Clip", [x, g.const(f"{layer.name}/min", np.float32(0)),
                           g.const(f"{layer.name}/max", np.float32(cfg["max_value"]))], layer.name)


def _pool(g: _Graph, layer, x: str, op: str) -> str:
    cfg = layer.get_config()
    kernel, strides = tuple(cfg["pool_size"]), tuple(cfg["strides"] or cfg["pool_size"])
    pads = _same_pads(_shape(layer.input)[:2], kernel, strides) if cfg["padding"] == "same" else [0, 0, 0, 0]
    return g.node(op, [x], layer.name, kernel_shape=list(kernel), strides=list(strides), pads=pads)


def _zero_pad(g: _Graph, layer, x: str) -> str:
    (top, bottom), (left, right) = layer.get_config()["padding"]
    pads = g.const(f"{layer.name}/pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
    return g.node("Pad", [x, pads], layer.name)


def _emit(g: _Graph, layer, ins: list[str]) -> str:
    kind = type(layer).__name__
    if kind == "Conv2D":
        return _conv(g, layer, ins[0], depthwise=False)
    if kind == "DepthwiseConv2D":
        return _conv(g, layer, ins[0], depthwise=True)
    if kind == "BatchNormalization":
        return _batchnorm(g, layer, ins[0])
    if kind == "ReLU":
        return _relu(g, layer, ins[0])
    if kind == "Activation":
        return _activation(g, layer.name, ins[0], layer.get_config()["activation"]) if \
            layer.get_config()["activation"] != "linear" else g.node("Identity", ins, layer.name)
    if kind == "MaxPooling2D":
        return _pool(g, layer, ins[0], "MaxPool")
    if kind == "AveragePooling2D":
        return _pool(g, layer, ins[0], "AveragePool")
    if kind == "GlobalAveragePooling2D":
        if layer.get_config().get("keepdims"):
            raise Unsupported("GlobalAveragePooling2D keepdims")
        return g.node("Flatten", [g.node("GlobalAveragePool", ins, f"{layer.name}/gap")], layer.name)
    if kind == "ZeroPadding2D":
        return _zero_pad(g, layer, ins[0])
    if kind == "Dense":
        return _dense(g, layer, ins[0])
    if kind == "Dropout":  # an identity at inference, the only way featurecache runs a network
        return g.node("Identity", ins, layer.name)
    if kind == "Add":
        out = ins[0]
        for k, other in enumerate(ins[1:], 1):
            out = g.node("Add", [out, other], layer.name if k == len(ins) - 1 else f"{layer.name}/{k}")
        return out
    raise Unsupported(f"layer {layer.name} ({kind})")


def output_name(tap: str) -> str:
    return f"tap/{tap}"


def export(model, taps: list[str]):
    """An onnx.ModelProto: input `input` (N, H, W, 3) float32, one NHWC output `tap/<name>` per tap."""
    from onnx import TensorProto, checker, helper

    g = _Graph()
    names: dict[str, str] = {}  # layer name -> ONNX value holding its NCHW output
    size = _shape(model.inputs[0])

    def visit(layer) -> str:
        if layer.name in names:
            return names[layer.name]
        if type(layer).__name__ == "InputLayer":
            out = g.node("Transpose", [INPUT], "input/nchw", perm=[0, 3, 1, 2])
        else:
            parents = _inputs(layer)
            out = _emit(g, layer, [visit(p) for p in parents])
        names[layer.name] = out
        return out

    outputs = []
    for tap in taps:
        layer = model.get_layer(tap)
        value = visit(layer)
        shape = _shape(layer.output)
        out = (g.node("Transpose", [value], output_name(tap), perm=[0, 2, 3, 1]) if len(shape) == 3
               else g.node("Identity", [value], output_name(tap)))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", *shape]))
    graph = helper.make_graph(g.nodes, "featurecache", [helper.make_tensor_value_info(
        INPUT, TensorProto.FLOAT, ["N", *size])], outputs, initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="featurecache")
    proto.ir_version = 8  # readable by onnxruntime and OpenVINO releases of the last years
    checker.check_model(proto)
    return proto
