"""The pieces of an exported model and how they are joined (see featurecache/export/exporter.py).

    images uint8 (N,S,S,3) -> [glue: Cast, preprocessing] -> backbone to the taps (our Keras->ONNX exporter,
      or the run's int8 QDQ graph) -> [glue per tap: flatten | avg | max as featurecache stores it, or a
      fit-time view max2x2 | avg2x2 | gridN; blocks concatenated in the run's order] -> features (N, D)
      -> normaliser, PCA, head (skl2onnx; FastLinearSVC and L2Normalizer registered below)
      -> [glue: scores as `featurecache predict` reports them, top label, its name]

Only the glue is written here by hand; the pieces are joined with `onnx.compose.merge_models`.
"""

from __future__ import annotations

import warnings

import numpy as np

OPSET = 17  # the backbone exporter's opset; every piece is written for it
ML_OPSET = 3
IR_VERSION = 8  # what the backbone exporter writes: readable by ONNX Runtime releases of the last years
FEATURES = "features"


class NoConverter(Exception):
    """The pipeline holds an estimator no registered converter writes as ONNX."""


def _model(nodes, inputs, outputs, inits, name: str, ml: bool = False):
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("ai.onnx.ml", ML_OPSET)] if ml else [])
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="featurecache")
    proto.ir_version = IR_VERSION
    return proto


def _const(name: str, value):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(value), name)


# ---- glue before the backbone: uint8 NHWC -> the network's float input -------------------------------

def preprocess_model(size: int, mode: str, out: str):
    """uint8 (N, size, size, 3) RGB `images` -> float32 `out`: featurecache.encoding.preprocessing's ONNX form of `mode`."""
    from onnx import TensorProto, helper

    from ..encoding.preprocessing import onnx_nodes

    nodes, inits = onnx_nodes(mode, "images", out)
    return _model(nodes, [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3])],
                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", size, size, 3])], inits, "preprocess")


# ---- glue after the backbone: each tap's NHWC map -> its block of the run's vector ---------------------

def pool_model(blocks, out: str = FEATURES):
    """The run's rows in ONNX, from its taps' maps: `blocks` is [(tap value, NHWC shape, pool)] in the run's
    column order; each tap's map is pooled by featurecache.encoding.pooling's ONNX form of its pooling (the form the
    encoder and fit-time views run in numpy), and the blocks are concatenated (axis 1) into `out`.
    Returns (model, dims). Maps stay NHWC, so every flatten keeps Keras's (H, W, C) order."""
    from onnx import TensorProto, helper

    from ..encoding.pooling import Pooling

    nodes, inits, dims, parts, inputs = [], [], 0, [], {}
    for i, (tap, shape, pool) in enumerate(blocks):
        inputs.setdefault(tap, tuple(int(d) for d in shape))
        part = out if len(blocks) == 1 else f"pool/{i}/out"
        dims += Pooling.parse(pool).onnx(nodes, inits, f"pool/{i}", tap, inputs[tap], part)
        parts.append(part)
    if len(blocks) > 1:
        nodes.append(helper.make_node("Concat", parts, [out], axis=1))
    return _model(nodes, [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["N", *s]) for t, s in inputs.items()],
                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", dims])], inits, "pool"), dims


def pooled(backbone, blocks: list[tuple[str, str]], prefix: str):
    """(backbone joined to the pooling of `blocks`: input `prefix`+onnx_export.INPUT -> FEATURES, dims).
    `backbone` has one NHWC output per tap, named by onnx_export.output_name."""
    from ..engines.onnx_export import output_name

    shapes = {o.name: tuple(d.dim_value for d in o.type.tensor_type.shape.dim[1:]) for o in backbone.graph.output}
    taps = [prefix + output_name(t) for t in dict.fromkeys(t for t, _ in blocks)]
    pool, dims = pool_model([(prefix + output_name(t), shapes[output_name(t)], p) for t, p in blocks])
    return merge(prefixed(backbone, prefix), pool, [(t, t) for t in taps], outputs=[FEATURES]), dims


def side_by_side(parts: list, input_name: str):
    """One model running `parts` (models whose one input is `input_name`) on that input, each part's
    outputs under their own names (no two parts share one)."""
    from onnx import ValueInfoProto, compose, helper

    nodes, inits, infos, outputs, opsets = [], [], [], [], {}
    for i, proto in enumerate(parts):
        p = f"part{i}/"
        part = compose.add_prefix(proto, p)
        nodes.append(helper.make_node("Identity", [input_name], [p + input_name]))
        nodes += part.graph.node
        inits += part.graph.initializer
        infos += part.graph.value_info
        for o in part.graph.output:
            out = ValueInfoProto()
            out.CopyFrom(o)
            out.name = o.name[len(p):]
            nodes.append(helper.make_node("Identity", [o.name], [out.name]))
            outputs.append(out)
        for o in proto.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    graph = helper.make_graph(nodes, "backbone", [parts[0].graph.input[0]], outputs, initializer=inits,
                              value_info=infos)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              producer_name="featurecache")
    proto.ir_version = IR_VERSION
    return proto


# ---- the scikit-learn part: skl2onnx, with converters for featurecache's own estimators ------------------

def _l2_shape(operator):
    operator.outputs[0].type = operator.inputs[0].type.__class__(operator.inputs[0].type.shape)


def _l2_convert(scope, operator, container):
    """L2Normalizer: x / |x| per row; with `blocks`, each column block to unit norm first, then the row.
    Rows (and blocks) of norm 0 are left as they are, as the estimator does."""
    from onnx import TensorProto

    x, y = operator.inputs[0].full_name, operator.outputs[0].full_name
    n = scope.get_unique_variable_name
    axes, zero, one = n("axes"), n("zero"), n("one")
    container.add_initializer(axes, TensorProto.INT64, [1], [1])
    container.add_initializer(zero, TensorProto.FLOAT, [], [0.0])
    container.add_initializer(one, TensorProto.FLOAT, [], [1.0])

    def normalise(src: str, dst: str) -> None:
        sq, ssum, norm, is0, safe = (n(v) for v in ("sq", "ssum", "norm", "is0", "safe"))
        container.add_node("Mul", [src, src], sq, name=n("l2_mul"))
        container.add_node("ReduceSum", [sq, axes], ssum, keepdims=1, name=n("l2_sum"))
        container.add_node("Sqrt", [ssum], norm, name=n("l2_sqrt"))
        container.add_node("Equal", [norm, zero], is0, name=n("l2_eq"))
        container.add_node("Where", [is0, one, norm], safe, name=n("l2_where"))
        container.add_node("Div", [src, safe], dst, name=n("l2_div"))

    blocks = [int(b) for b in (getattr(operator.raw_operator, "blocks", None) or ())]
    if len(blocks) <= 1:
        normalise(x, y)
        return
    sizes, parts = n("blocks"), [n("block") for _ in blocks]
    container.add_initializer(sizes, TensorProto.INT64, [len(blocks)], blocks)
    container.add_node("Split", [x, sizes], parts, axis=1, name=n("l2_split"))
    done = [n("block_l2") for _ in blocks]
    for src, dst in zip(parts, done):
        normalise(src, dst)
    joined = n("blocks_l2")
    container.add_node("Concat", done, joined, axis=1, name=n("l2_concat"))
    normalise(joined, y)  # then the whole row, as the estimator does


def _linear_svc_standin(fast):
    """scikit-learn's LinearSVC with FastLinearSVC's fitted parameters: same decision_function."""
    from sklearn.svm import LinearSVC

    svc = LinearSVC()
    svc.coef_ = np.asarray(fast.coef_, np.float64)
    svc.intercept_ = np.asarray(fast.intercept_, np.float64)
    svc.classes_ = fast.classes_
    svc.n_features_in_ = fast.coef_.shape[1]
    return svc


def _fast_svc_convert(scope, operator, container):
    """FastLinearSVC through skl2onnx's own LinearSVC converter (a calibration wrapper asks for raw scores)."""
    from skl2onnx.operator_converters.linear_classifier import convert_sklearn_linear_classifier

    fast = operator.raw_operator
    raw = {"raw_scores": container.get_options(fast, dict(raw_scores=False))["raw_scores"]}
    operator.raw_operator = _linear_svc_standin(fast)
    container.add_options(id(operator.raw_operator), raw)
    scope.add_options(id(operator.raw_operator), raw)
    convert_sklearn_linear_classifier(scope, operator, container)


_REGISTERED = False


def register() -> None:
    """Teach skl2onnx featurecache's two estimators (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes

    from .. import heads

    update_registered_converter(heads.FastLinearSVC, "FeaturecacheFastLinearSVC",
                                calculate_linear_classifier_output_shapes, _fast_svc_convert,
                                options={"zipmap": [True, False, "columns"], "nocl": [True, False],
                                         "output_class_labels": [False, True], "raw_scores": [True, False]})
    update_registered_converter(heads.L2Normalizer, "FeaturecacheL2Normalizer", _l2_shape, _l2_convert)
    _REGISTERED = True


def convertible(estimator) -> bool:
    """Whether skl2onnx (with our registrations) has a converter for this estimator, wrappers included."""
    register()
    from skl2onnx._supported_operators import sklearn_operator_name_map

    inner = getattr(estimator, "estimator", None)  # CalibratedClassifierCV converts its base estimator too
    return type(estimator) in sklearn_operator_name_map and (inner is None or convertible(inner))


def sklearn_model(pipeline, dims: int):
    """The fitted pipeline (normaliser, PCA, head) as ONNX: input `features` (N, dims), skl2onnx's outputs."""
    register()
    from sklearn.pipeline import Pipeline
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    steps = [(n, s) for n, s in getattr(pipeline, "steps", [("head", pipeline)]) if s not in (None, "passthrough")]
    for name, step in steps:
        if not convertible(step):
            raise NoConverter(f"{name} step {type(step).__name__}")
    model = Pipeline(steps) if len(steps) > 1 else steps[0][1]
    head = steps[-1][1]
    kwargs = dict(initial_types=[(FEATURES, FloatTensorType([None, dims]))],
                  target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET})
    with warnings.catch_warnings():  # skl2onnx reads SVC's probA_/probB_, deprecated in scikit-learn 1.9
        warnings.simplefilter("ignore", FutureWarning)
        try:
            proto = convert_sklearn(model, options={id(head): {"zipmap": False}}, **kwargs)
        except NameError as e:  # a converter without the zipmap option returns plain tensors already
            if "zipmap" not in str(e):
                raise
            proto = convert_sklearn(model, **kwargs)
    proto.ir_version = IR_VERSION
    return proto


# ---- glue after the head: scores as featurecache reports them, the top label and its name -----------

def post_model(raw: str, raw_cols: int, adapter: tuple[int, float] | None, classes: list[int],
               class_names: list[str]):
    """skl2onnx's score tensor -> `scores` (N, K), `label` (N,) int64 and `label_name` (N,) strings.

    adapter None: the tensor already is featurecache's scores. (col, sign): a binary decision head,
    d = sign * raw[:, col], and featurecache's scores are [-d, d] (featurecache.heads.scores).
    """
    from onnx import TensorProto, helper

    nodes, inits = [], []
    if adapter is None:
        nodes.append(helper.make_node("Identity", [raw], ["scores"]))
    else:
        col, sign = adapter
        inits += [_const("post/start", np.array([col], np.int64)), _const("post/end", np.array([col + 1], np.int64)),
                  _const("post/axis", np.array([1], np.int64)), _const("post/sign", np.float32(sign))]
        nodes += [helper.make_node("Slice", [raw, "post/start", "post/end", "post/axis"], ["post/col"]),
                  helper.make_node("Mul", ["post/col", "post/sign"], ["post/d"]),
                  helper.make_node("Neg", ["post/d"], ["post/negd"]),
                  helper.make_node("Concat", ["post/negd", "post/d"], ["scores"], axis=1)]
    inits += [_const("post/classes", np.asarray(classes, np.int64)),
              _const("post/names", np.array(class_names, dtype=object))]
    nodes += [helper.make_node("ArgMax", ["scores"], ["post/top"], axis=1, keepdims=0),  # first of ties, as argsort
              helper.make_node("Gather", ["post/classes", "post/top"], ["label"], axis=0),
              helper.make_node("Gather", ["post/names", "label"], ["label_name"], axis=0)]
    k = len(classes)
    return _model(nodes, [helper.make_tensor_value_info(raw, TensorProto.FLOAT, ["N", raw_cols])],
                  [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k]),
                   helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                   helper.make_tensor_value_info("label_name", TensorProto.STRING, ["N"])], inits, "post")


def score_output(proto) -> str:
    """skl2onnx's per-class score tensor (named probabilities whatever the head's kind)."""
    names = [o.name for o in proto.graph.output]
    return next((n for n in names if "prob" in n or "score" in n), names[-1])


def choose_adapter(raw: np.ndarray, reference: np.ndarray, kind: str, tol: float):
    """How skl2onnx's scores become featurecache's: None (as they are) or (col, sign) for binary decisions.

    skl2onnx's conventions for two-class decision heads differ by estimator (SVC gives [d, -d], SGD
    [-d, d], LinearSVC and Ridge (N, 1) d), so the export picks the reading that reproduces
    `featurecache.heads.scores` on probe rows, and the caller refuses the file if none does.
    """
    if kind == "decision" and reference.shape[1] == 2:
        d = reference[:, 1]
        cands = [(c, s) for c in range(raw.shape[1]) for s in (1.0, -1.0)]
        errs = [np.abs(s * raw[:, c] - d).max() for c, s in cands]
        best = int(np.argmin(errs))
        return cands[best], float(errs[best])
    if raw.shape != reference.shape:
        return None, float("inf")
    return None, float(np.abs(raw - reference).max()) if raw.size else 0.0


def merge(first, second, io_map, outputs=None):
    """`onnx.compose.merge_models`, after giving both parts the same opset per domain (the higher one:
    skl2onnx writes the lowest opset its operators need, 16 where the backbone has 17; the operators
    used here did not change between those opsets, and onnxruntime checks the joined graph at load)."""
    from onnx import compose, helper

    versions = {}
    for proto in (first, second):
        for o in proto.opset_import:
            versions[o.domain] = max(versions.get(o.domain, 0), o.version)
    for proto in (first, second):
        del proto.opset_import[:]
        proto.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
        proto.ir_version = IR_VERSION
    return compose.merge_models(first, second, io_map=io_map, outputs=outputs)


def prefixed(proto, prefix: str):
    from onnx import compose

    return compose.add_prefix(proto, prefix)
