"""Models from other exporters: scikit-learn MLPClassifier through skl2onnx, and Keras CNNs (NHWC) through tf2onnx
(when tensorflow and tf2onnx are importable) and as hand-built graphs in the keras2onnx style (always).

The MLP's relevance is checked against an independent numpy epsilon-LRP on ``coefs_``/``intercepts_``, and every
rule on every model here against the float64 graph reference (tests/graph_reference.py). Until d486035 every
skl2onnx case failed: the Softmax sits behind an Identity (``zipmap=False``) or a ZipMap, and the compiler only
looked through a Softmax that writes the graph output itself.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import onnx
import pytest
import zoo_models as zm
from graph_reference import GraphReference
from helpers import check_against_graph_reference
from onnx import TensorProto, helper, numpy_helper

import onnxlrp

RULES = zm.RULES
# the coverage rules, and two composites' rules alone on every layer
KERAS_RULES = (*RULES, "epsilon-alpha2-beta1", "zplus", "gamma")

# ================================================================ scikit-learn MLPClassifier via skl2onnx


@functools.cache
def mlp():
    """An MLPClassifier (64 -> 24 -> 12 -> 10, relu) trained briefly on sklearn's 8x8 digits (scaled to [0, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a short fit is all the test needs
        clf = MLPClassifier(hidden_layer_sizes=(24, 12), max_iter=60, random_state=0).fit(x, y)
    return clf, x


@functools.cache
def mlp_onnx_bytes(zipmap: bool) -> bytes:
    from skl2onnx import to_onnx

    clf, x = mlp()
    options = None if zipmap else {"zipmap": False}
    return to_onnx(clf, x[:1], options=options).SerializeToString()


def mlp_onnx(zipmap: bool) -> onnx.ModelProto:
    return onnx.load_from_string(mlp_onnx_bytes(zipmap))


def softmax_input(model: onnx.ModelProto) -> str:
    return next(n.input[0] for n in model.graph.node if n.op_type == "Softmax")


def numpy_epsilon_lrp(clf, x: np.ndarray, target: np.ndarray | None = None, eps: float = 1e-6):
    """Epsilon-LRP of an sklearn MLP, written from the equations (float64): logits are the pre-softmax output;
    hidden layers are ``relu(a W + b)``; each layer sends ``R_in = a * ((R / stab(z)) W^T)`` with
    ``stab(z) = z + eps * sign(z)``, ``sign(0) = +1``. Returns (relevance, logits)."""
    assert clf.activation == "relu" and clf.out_activation_ == "softmax"
    acts = [x.astype(np.float64)]
    zs = []
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
        z = acts[-1] @ w + b
        zs.append(z)
        if i < len(clf.coefs_) - 1:
            acts.append(np.maximum(z, 0))
    logits = zs[-1]
    target = logits.argmax(1) if target is None else np.asarray(target)
    r = np.zeros_like(logits)
    r[np.arange(len(x)), target] = logits[np.arange(len(x)), target]
    for a, w, z in zip(reversed(acts), reversed(clf.coefs_), reversed(zs), strict=True):
        s = r / (z + eps * np.where(z >= 0, 1.0, -1.0))
        r = a * (s @ w.T)
    return r, logits


def rel_l2(actual, expected) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("kwargs", [{}, {"output": "probabilities"}], ids=["default", "output=probabilities"])
def test_mlp_no_zipmap_epsilon_matches_numpy(kwargs):
    """zipmap=False: outputs ``label`` (int64) and ``probabilities`` (float, Softmax -> Identity). The probabilities
    are explained (through their Softmax) and match an independent numpy epsilon-LRP."""
    clf, x = mlp()
    model = mlp_onnx(zipmap=False)
    xs = x[:16]
    compiled = onnxlrp.compile(model, "epsilon", **kwargs)
    out = zm.run_compiled(compiled, {"X": xs})
    label, prob = zm.run_source(model, {"X": xs}, ["label", "probabilities"])
    np.testing.assert_array_equal(out["label"], label)
    np.testing.assert_allclose(out["probabilities"], prob, rtol=1e-5, atol=1e-7)
    expected, logits = numpy_epsilon_lrp(clf, xs)
    np.testing.assert_array_equal(out["explained_class"], logits.argmax(1))
    assert out["relevance"].shape == xs.shape
    assert rel_l2(out["relevance"], expected) < 1e-4


def test_mlp_zipmap_epsilon_matches_numpy():
    """The skl2onnx default: ``output_label`` and ``output_probability`` (a ZipMap: a sequence of maps, not a
    tensor). ``output="output_probability"`` explains the probabilities; the label and the ZipMap keep working."""
    clf, x = mlp()
    model = mlp_onnx(zipmap=True)
    xs = x[:16]
    compiled = onnxlrp.compile(model, "epsilon", output="output_probability")
    out = zm.run_compiled(compiled, {"X": xs})
    label, zipped = zm.session(model).run(["output_label", "output_probability"], {"X": xs})
    np.testing.assert_array_equal(out["output_label"], label)
    assert isinstance(out["output_probability"], list) and len(out["output_probability"]) == len(xs)
    for got, want in zip(out["output_probability"], zipped, strict=True):
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=1e-5)
    expected, _ = numpy_epsilon_lrp(clf, xs)
    assert rel_l2(out["relevance"], expected) < 1e-4


def test_mlp_zipmap_default_output():
    """With ZipMap there is no float tensor output; without ``output=`` the ZipMap's probabilities are explained."""
    clf, x = mlp()
    compiled = onnxlrp.compile(mlp_onnx(zipmap=True), "epsilon")
    assert dict((p.key, p.value) for p in compiled.metadata_props)["onnxlrp.explained"] == \
        softmax_input(mlp_onnx(zipmap=True))
    out = zm.run_compiled(compiled, {"X": x[:8]})
    expected, _ = numpy_epsilon_lrp(clf, x[:8])
    assert rel_l2(out["relevance"], expected) < 1e-4


def test_mlp_explicit_target_and_explainer():
    """The Explainer API on the skl2onnx model, explaining a class that is not the prediction."""
    clf, x = mlp()
    model = mlp_onnx(zipmap=False)
    xs = x[:8]
    compiled = onnxlrp.compile(model, "epsilon")
    explainer = onnxlrp.Explainer(compiled, providers=["CPUExecutionProvider"])
    result = explainer(xs, target=3)
    np.testing.assert_array_equal(result.explained_class, np.full(len(xs), 3))
    assert set(result.outputs) == {"label", "probabilities"}
    expected, _ = numpy_epsilon_lrp(clf, xs, target=np.full(len(xs), 3))
    assert rel_l2(result.relevance, expected) < 1e-4


@pytest.mark.parametrize("rule", (*RULES, "zplus", "gamma"))
def test_mlp_rules(rule):
    """Every rule of the matrix compiles and runs on the MLP and gives the graph reference's relevance (R-LRP: its
    cosine, and sum|R| = |logit|); epsilon-gamma-box and the flat composites fall back to their dense entries (the
    MLP has no convolution)."""
    clf, x = mlp()
    model = mlp_onnx(zipmap=False)
    xs = x[:8]
    compiled = onnxlrp.compile(model, rule)
    out = zm.run_compiled(compiled, {"X": xs})
    r = out["relevance"]
    assert r.shape == xs.shape and np.isfinite(r).all()
    assert (np.abs(r).sum(1) > 0).all()
    check_against_graph_reference(GraphReference(model, softmax_input(model), "X"), compiled, xs, out, rule)
    _, logits = numpy_epsilon_lrp(clf, xs)
    if rule == "rlrp":
        np.testing.assert_allclose(np.abs(r).sum(1), np.abs(logits.max(1)), rtol=1e-4)


# ================================================================ Keras CNNs (NHWC)

def check_keras_like(model: onnx.ModelProto, x: np.ndarray, logits_name: str, rule: str, **params) -> list[str]:
    """Compile, run, compare the original output with the source, check the relevance against the graph
    reference."""
    input_name = model.graph.input[0].name
    output_name = model.graph.output[0].name
    compiled = onnxlrp.compile(model, rule, **params)
    out = zm.run_compiled(compiled, {input_name: x})
    prob, logits = zm.run_source(model, {input_name: x}, [output_name, logits_name])
    np.testing.assert_allclose(out[output_name], prob, rtol=1e-4, atol=1e-6)
    logits = logits.reshape(len(x), -1)
    cls = out["explained_class"]
    np.testing.assert_array_equal(cls, logits.argmax(1))
    explained = logits[np.arange(len(x)), cls]
    r = out["relevance"]
    assert r.shape == x.shape and np.isfinite(r).all()
    assert (np.abs(r).reshape(len(x), -1).sum(1) > 0).all()
    check_against_graph_reference(GraphReference(model, logits_name, input_name), compiled, x, out, rule, **params)
    if rule == "rlrp":  # the final scaling (README)
        np.testing.assert_allclose(np.abs(r).reshape(len(x), -1).sum(1), np.abs(explained), rtol=1e-4)
    if rule in ("lrp0", "epsilon") and params.get("epsilon", 1.0) < 1e-8:  # a bias-free model: conservation
        np.testing.assert_allclose(r.reshape(len(x), -1).sum(1), explained, rtol=1e-3)


CONSERVING = [("lrp0", {}), ("epsilon", {"epsilon": 1e-9})]


@pytest.mark.parametrize("rule", KERAS_RULES)
def test_keras_style_handbuilt(rule):
    """keras2onnx-style graph: NHWC input -> Transpose -> Conv -> Transpose -> Relu, Transpose pairs around the
    MaxPool, BatchNorm as Mul/Add on the channel-last axis, a Shape-computed Reshape, MatMul + Add, Softmax."""
    z = zm.keras_cnn()
    check_keras_like(z.model, z.sample(), z.logits, rule)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("rule,params", CONSERVING, ids=["lrp0", "epsilon"])
def test_keras_style_handbuilt_conservation(rule, params, opset):
    z = zm.keras_cnn(bias=False, opset=opset)
    check_keras_like(z.model, z.sample(), z.logits, rule, **params)


@functools.cache
def tf2onnx_cnn_bytes(bias: bool) -> bytes:
    """A small Keras CNN (NHWC, Conv2D/AveragePooling2D/MaxPooling2D/Flatten/Dense/Softmax layer) converted by
    tf2onnx at opset 13. ``bias``: random non-zero biases; otherwise every layer is bias-free."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    keras = tf.keras
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", use_bias=bias)(inp)
    h = keras.layers.AveragePooling2D(2)(h)
    h = keras.layers.Conv2D(6, 3, activation="relu", use_bias=bias)(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", use_bias=bias)(h)
    h = keras.layers.Dense(10, use_bias=bias)(h)
    out = keras.layers.Softmax()(h)
    model = keras.Model(inp, out)
    if bias:
        rng = np.random.default_rng(0)
        model.set_weights([w if w.ndim > 1 else rng.normal(0, 0.05, w.shape).astype(np.float32)
                           for w in model.get_weights()])
    spec = (tf.TensorSpec((None, 12, 12, 3), tf.float32, name="image"),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=13)
    return proto.SerializeToString()


def tf2onnx_cnn(bias: bool) -> tuple[onnx.ModelProto, str]:
    model = onnx.load_from_string(tf2onnx_cnn_bytes(bias))
    return model, softmax_input(model)


def keras_sample(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (2, 12, 12, 3)).astype(np.float32)


@pytest.mark.parametrize("rule", KERAS_RULES)
def test_keras_tf2onnx(rule):
    model, logits = tf2onnx_cnn(bias=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"Transpose", "Conv", "MatMul", "Add", "Softmax"} <= ops
    check_keras_like(model, keras_sample(), logits, rule)


@pytest.mark.parametrize("rule,params", CONSERVING, ids=["lrp0", "epsilon"])
def test_keras_tf2onnx_conservation(rule, params):
    model, logits = tf2onnx_cnn(bias=False)
    check_keras_like(model, keras_sample(), logits, rule, **params)


def test_gamma_on_a_dense_layer_behind_a_computed_reshape():
    """The smallest graph of the Keras exports' pattern: Relu -> Reshape(x, Concat(Shape(x)[0], -1)) -> MatMul.
    Shape inference leaves the MatMul's input shape open; epsilon compiles, gamma raises "object of type 'NoneType'
    has no len()" in Gamma.stacked (the layer's input is non-negative and its output not behind a Relu)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("Shape", ["h"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"]),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch_1d"]),
        helper.make_node("Concat", ["batch_1d", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["h", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["y"]),
    ]
    constants = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                 numpy_helper.from_array(np.array([0], np.int64), "axes"),
                 numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
                 numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")]
    graph = helper.make_graph(nodes, "computed_reshape", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                        ["N", 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = rng.standard_normal((2, 2, 2)).astype(np.float32)
    compiled = onnxlrp.compile(model, "gamma")
    check_against_graph_reference(GraphReference(model, "y", "x"), compiled, x, zm.run_compiled(compiled, {"x": x}),
                                  "gamma")
