"""Classic classifiers of the ``ai.onnx.ml`` domain (as skl2onnx writes them) lowered to default-domain ops, so that
the rules and the Taylor family see linear layers and element-wise maps (Bach et al.: the decomposition works "for
Bag of Words features with non-linear SVMs as well as for neural networks").

Every lowering computes what onnxruntime's kernel computes, output by output (float rounding aside):

- ``Scaler``: ``(x - offset) * scale``; ``Normalizer``: ``x / ||x||`` per row (L2 written as the RMS normalization
  ``x / sqrt(mean(x^2)) / sqrt(n)``, which the normalization patterns recognize, so LRP treats the norm as a
  per-sample constant; L1 and MAX as a plain quotient, which only the Taylor rule differentiates).
- ``LinearClassifier``/``LinearRegressor``: one Gemm ``x W^T + b`` (a binary classifier with one coefficient row
  scores ``[-s, s]``), then ``post_transform`` (Softmax, Sigmoid) and the label (the arg-max's class label). LRP-0 and
  epsilon give ``R_d = w_d x_d`` (a Scaler in front folds into ``w`` on the next layer's terms: ``R_d = w_d s_d
  (x_d - o_d)``); the Taylor rule at zeros gives ``w'_d x_d`` with the bias in ``f(x0)``.
- ``SVMRegressor`` and the binary ``SVMClassifier``: ``d = K(x, SV) c + rho`` with the kernel of ``kernel_type``:
  LINEAR ``x SV^T`` (then reduced to one weight vector ``w = c SV``: a linear layer), POLY ``(g x SV^T + c0)^p``,
  RBF ``exp(-g ||x - sv||^2)`` (``||x||^2 - 2 x SV^T + ||sv||^2``), SIGMOID ``tanh(g x SV^T + c0)``. onnxruntime's
  binary SVMClassifier scores ``[-d, d]`` and labels class 1 where ``d < 0`` (scikit-learn's decision function is
  ``-d``: column 0 holds the evidence for class 1). Kernels other than LINEAR multiply ``x`` by itself or exponentiate
  it: the LRP rules refuse them, the Taylor rule explains them.
- ``ArrayFeatureExtractor`` with constant indices: a Gather along the last axis.

Refused with one line: tree ensembles (no rule exists: piecewise constant, no gradient and no layers), one-versus-one
multi-class SVMs and SVMs with Platt probabilities (votes and fitted sigmoids over pairs), post-transforms other than
NONE, SOFTMAX and LOGISTIC.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlrp.errors import OnnxlrpError

ML = "ai.onnx.ml"
TREES = ("TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble")


class Emitter:
    """Appends default-domain nodes and constants that stand for one ML node, under names derived from it."""

    def __init__(self, node: onnx.NodeProto, opset: int, constants: dict[str, np.ndarray]):
        self.node, self.opset, self.constants = node, opset, constants
        self.base = node.name or node.output[0]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{self.base}/{hint}_{self.count}"

    def const(self, value, hint: str, dtype=np.float32) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, output: str | None = None, **attrs) -> str:
        out = output or self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.fresh(hint + "_node"), **attrs))
        return out

    def reduce(self, op: str, x: str, hint: str) -> str:
        """``op`` over axis 1, keepdims (axes as an input from opset 18, ReduceSum from 13)."""
        if op == "ReduceSum" or self.opset >= 18:
            return self.op(op, [x, self.const([1], "axes", np.int64)], hint, keepdims=1)
        return self.op(op, [x], hint, axes=[1], keepdims=1)

    def identity(self, value: str, output: str) -> None:
        self.op("Identity", [value], "out", output=output)


def attributes(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def refuse(node: onnx.NodeProto, why: str) -> OnnxlrpError:
    return OnnxlrpError(f"node {node.name or node.output[0]!r} ({node.op_type}, domain {ML}): {why}")


def post_transform(e: Emitter, node, scores: str, how: str) -> str:
    if how in ("", "NONE"):
        return scores
    if how == "SOFTMAX":
        return e.op("Softmax", [scores], "softmax", axis=1)
    if how == "LOGISTIC":
        return e.op("Sigmoid", [scores], "logistic")
    raise refuse(node, f"post_transform {how} has no lowering (NONE, SOFTMAX and LOGISTIC do)")


def label_output(e: Emitter, a: dict, chosen: str, output: str) -> None:
    """The class label at the index ``chosen`` (int64 [N])."""
    if "classlabels_strings" in a and a["classlabels_strings"]:
        labels = [s.decode() if isinstance(s, bytes) else s for s in a["classlabels_strings"]]
        name = e.fresh("labels")
        e.initializers.append(helper.make_tensor(name, TensorProto.STRING, [len(labels)],
                                                 [s.encode() for s in labels]))
    else:
        name = e.const(a.get("classlabels_ints", []), "labels", np.int64)
    e.op("Gather", [name, chosen], "label", output=output, axis=0)


def linear(e: Emitter, x: str, weight: np.ndarray, bias: np.ndarray) -> str:
    """``x W^T + b`` with ``W`` [outputs, features]."""
    return e.op("Gemm", [x, e.const(weight, "coefficients"), e.const(bias, "intercepts")], "scores", transB=1)


def lower_scaler(e: Emitter, node) -> None:
    a = attributes(node)
    shifted = e.op("Sub", [node.input[0], e.const(a.get("offset", [0.0]), "offset")], "shifted")
    e.op("Mul", [shifted, e.const(a.get("scale", [1.0]), "scale")], "scaled", output=node.output[0])


def lower_normalizer(e: Emitter, node, features: int | None, stochastic: set[str]) -> None:
    """``stochastic``: tensors whose rows are non-negative and sum to 1 (a Softmax's): their L1 normalization, which
    skl2onnx writes after a multinomial classifier, is the identity."""
    norm, x = attributes(node).get("norm", "MAX"), node.input[0]
    if norm == "L1" and x in stochastic:
        e.identity(x, node.output[0])
        stochastic.add(node.output[0])
    elif norm == "L2":
        if features is None:
            raise refuse(node, "an L2 Normalizer needs a known feature count")
        mean_square = e.reduce("ReduceMean", e.op("Mul", [x, x], "square"), "mean_square")
        rms = e.op("Sqrt", [e.op("Add", [mean_square, e.const(1e-30, "tiny")], "mean_square")], "rms")
        e.op("Mul", [e.op("Div", [x, rms], "normalized"), e.const(1 / np.sqrt(features), "inv_sqrt_n")], "l2",
             output=node.output[0])
    elif norm in ("L1", "MAX"):
        size = e.reduce("ReduceSum", e.op("Abs", [x], "abs"), "l1") if norm == "L1" else \
            e.reduce("ReduceMax", x, "max")
        e.op("Div", [x, size], "normalized", output=node.output[0])
    else:
        raise refuse(node, f"unknown norm {norm!r}")


def lower_linear_classifier(e: Emitter, node, features: int, stochastic: set[str]) -> None:
    a = attributes(node)
    weight = np.asarray(a["coefficients"], np.float64).reshape(-1, features)
    bias = np.asarray(a.get("intercepts", np.zeros(len(weight))), np.float64)
    classes = len(a.get("classlabels_ints") or a.get("classlabels_strings") or [])
    if len(weight) == 1 and classes == 2:
        weight, bias = np.concatenate([-weight, weight]), np.concatenate([-bias, bias])
    scores = post_transform(e, node, linear(e, node.input[0], weight, bias), a.get("post_transform", "NONE"))
    e.identity(scores, node.output[1])
    if a.get("post_transform") == "SOFTMAX":
        stochastic.add(node.output[1])
    label_output(e, a, e.op("ArgMax", [scores], "argmax", axis=1, keepdims=0), node.output[0])


def lower_linear_regressor(e: Emitter, node, features: int) -> None:
    a = attributes(node)
    weight = np.asarray(a["coefficients"], np.float64).reshape(-1, features)
    bias = np.asarray(a.get("intercepts", np.zeros(len(weight))), np.float64)
    e.identity(post_transform(e, node, linear(e, node.input[0], weight, bias), a.get("post_transform", "NONE")),
               node.output[0])


def decision(e: Emitter, node, a: dict, coefficients: np.ndarray, rho: float, features: int) -> str:
    """``d = K(x, SV) c + rho`` [N, 1]."""
    x = node.input[0]
    vectors = np.asarray(a["support_vectors"], np.float64).reshape(-1, features)
    gamma, coef0, degree = (list(a.get("kernel_params", [])) + [0.0, 0.0, 0.0])[:3]
    kind = a.get("kernel_type", "LINEAR")
    if kind == "LINEAR":  # reduced to one weight vector
        return linear(e, x, (coefficients @ vectors)[None], np.array([rho]))
    dots = e.op("MatMul", [x, e.const(vectors.T, "support_vectors_T")], "dots")
    if kind in ("POLY", "SIGMOID"):
        inner = e.op("Add", [e.op("Mul", [dots, e.const(gamma, "gamma")], "scaled"), e.const(coef0, "coef0")], "k")
        kernel = e.op("Pow", [inner, e.const(degree, "degree")], "poly") if kind == "POLY" else \
            e.op("Tanh", [inner], "sigmoid_kernel")
    elif kind == "RBF":
        squares = e.reduce("ReduceSum", e.op("Mul", [x, x], "square"), "x_norm2")
        distance = e.op("Add", [e.op("Sub", [squares, e.op("Mul", [dots, e.const(2.0, "two")], "dots2")], "d"),
                                e.const((vectors ** 2).sum(1), "sv_norm2")], "distance2")
        kernel = e.op("Exp", [e.op("Mul", [distance, e.const(-gamma, "minus_gamma")], "exponent")], "rbf")
    else:
        raise refuse(node, f"unknown kernel_type {kind!r}")
    return linear(e, kernel, coefficients[None], np.array([rho]))


def check_svm(node, a: dict) -> None:
    if not a.get("support_vectors"):
        raise refuse(node, "an SVM without support vectors has no lowering")
    if a.get("post_transform", "NONE") != "NONE":
        raise refuse(node, f"post_transform {a['post_transform']} has no lowering for SVMs")


def lower_svm_regressor(e: Emitter, node, features: int) -> None:
    a = attributes(node)
    check_svm(node, a)
    if a.get("one_class", 0):
        raise refuse(node, "one-class SVMs have no lowering")
    e.identity(decision(e, node, a, np.asarray(a["coefficients"], np.float64), a.get("rho", [0.0])[0], features),
               node.output[0])


def lower_svm_classifier(e: Emitter, node, features: int) -> None:
    a = attributes(node)
    check_svm(node, a)
    if len(a.get("vectors_per_class", [])) != 2:
        raise refuse(node, "one-versus-one SVMs with more than two classes vote over pairs: no lowering (binary "
                           "SVMClassifier and SVMRegressor have one)")
    if a.get("prob_a"):
        raise refuse(node, "Platt-scaled probabilities (probability=True) have no lowering; export the SVM without "
                           "them")
    d = decision(e, node, a, np.asarray(a["coefficients"], np.float64), a.get("rho", [0.0])[0], features)
    e.identity(e.op("Concat", [e.op("Neg", [d], "minus_d"), d], "scores", axis=1), node.output[1])
    is_second = e.op("Cast", [e.op("Less", [d, e.const(0.0, "zero")], "negative")], "index", to=TensorProto.INT64)
    label_output(e, a, e.op("Reshape", [is_second, e.const([-1], "flat", np.int64)], "chosen"), node.output[0])


def lower_feature_extractor(e: Emitter, node) -> None:
    indices = e.constants[node.input[1]]
    e.op("Gather", [node.input[0], e.const(indices.reshape(-1), "indices", np.int64)], "gather",
         output=node.output[0], axis=-1)


def declared_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """The shapes onnx's (lenient) shape inference finds, unknown dims as None: what the ML lowering needs before
    the strict inference of the lowered graph."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the strict inference after the lowering reports real problems
        inferred = model
    graph = inferred.graph
    return {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            for vi in list(graph.input) + list(graph.value_info) + list(graph.output)
            if vi.type.tensor_type.HasField("shape")}


def copy_reading(node: onnx.NodeProto, first_input: str) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[0] = first_input
    return copy


def feature_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """The feature count of each tensor that a linear or SVM node reads, from its attributes, carried back through
    the Scalers and Normalizers in front of it (a TfIdfVectorizer's output has no inferred width)."""
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.domain != ML:
            continue
        a = attributes(node)
        rows = {"LinearClassifier": len(a.get("intercepts", [])) or None, "LinearRegressor": a.get("targets", 1),
                "SVMClassifier": sum(a.get("vectors_per_class", [])) or None,
                "SVMRegressor": a.get("n_supports") or None}
        size = len(a.get("support_vectors") or a.get("coefficients") or [])
        if rows.get(node.op_type) and size:
            counts[node.input[0]] = size // rows[node.op_type]
    producer = {o: n for n in graph.node for o in n.output}
    for tensor in list(counts):
        node = producer.get(tensor)
        while node is not None and node.domain == ML and node.op_type in ("Scaler", "Normalizer"):
            counts[node.input[0]] = counts[tensor]
            tensor, node = node.input[0], producer.get(node.input[0])
    return counts


def lower_ml_ops(graph: onnx.GraphProto, opset: int, shapes: dict[str, list]) -> bool:
    """Replace every lowerable ``ai.onnx.ml`` node of ``graph`` in place (ZipMap and the others stay); refuse tree
    ensembles. ``shapes``: known tensor shapes (the feature count of each input). Returns whether any changed."""
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    lowered, changed, stochastic = [], False, set()
    counts = feature_counts(graph)
    for node in graph.node:
        if node.domain != ML:
            lowered.append(node)
            continue
        if node.op_type in TREES:
            raise refuse(node, "tree ensembles have no relevance rule (piecewise constant: no layers to propagate "
                               "through, zero gradient)")
        shape = shapes.get(node.input[0]) or []
        features = shape[-1] if shape and isinstance(shape[-1], int) else counts.get(node.input[0])
        e = Emitter(node, opset, constants)
        if features is not None and not (shape and shape[-1] == features):
            # a width that shape inference cannot see (behind a TfIdfVectorizer): a Reshape to [-1, F] states it
            static = e.op("Reshape", [node.input[0], e.const([-1, features], "static_width", np.int64)], "static")
            node = copy_reading(node, static)
            shape = [None, features]
        if node.op_type in ("Scaler", "Normalizer"):
            shapes[node.output[0]] = shape  # the strict inference comes after the lowering
            (lower_scaler(e, node) if node.op_type == "Scaler" else lower_normalizer(e, node, features, stochastic))
        elif node.op_type == "ArrayFeatureExtractor" and node.input[1] in constants:
            lower_feature_extractor(e, node)  # computed indices (a label lookup) stay as they are
        elif node.op_type in ("LinearClassifier", "LinearRegressor", "SVMClassifier", "SVMRegressor"):
            if features is None:
                raise refuse(node, "needs a known feature count (give --input-shape)")
            if node.op_type == "LinearClassifier":
                lower_linear_classifier(e, node, features, stochastic)
            else:
                {"LinearRegressor": lower_linear_regressor, "SVMClassifier": lower_svm_classifier,
                 "SVMRegressor": lower_svm_regressor}[node.op_type](e, node, features)
        else:
            lowered.append(node)
            continue
        lowered.extend(e.nodes)
        graph.initializer.extend(e.initializers)
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(lowered)
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        kept = [t for t in graph.initializer if t.name in read]  # e.g. an ArrayFeatureExtractor's indices
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return changed
