"""If nodes with a constant condition (tf2onnx's learning-phase ``tf.cond`` around every BatchNorm) are replaced by the
branch they take at canonicalization; other If/Loop/Scan nodes on the relevance path are reported in one line.

The networks: ``x [N, 4] -> Gemm W1 -> If(cond) -> Relu -> Gemm W2 -> logits``, where the taken branch is an
inference-mode BatchNorm written as tf2onnx writes it (``z * scale + shift`` with branch-local constants) and the
other branch computes batch statistics (training mode). Reference: the epsilon rule in float64 numpy (the Mul and
Add with constants pass relevance, as for any activation)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import pytest
import zoo_models as zm
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxlrp
from onnxlrp.errors import UnsupportedOpError

EPS = 1e-6
RNG = np.random.default_rng(0)
W1 = RNG.normal(0, 0.7, (6, 4)).astype(np.float32)
W2 = RNG.normal(0, 0.5, (3, 6)).astype(np.float32)
SCALE = RNG.uniform(0.5, 1.5, 6).astype(np.float32)
SHIFT = RNG.normal(0, 0.3, 6).astype(np.float32)


def vi(name, shape=None, elem=T.FLOAT):
    return h.make_tensor_value_info(name, elem, shape)


def inference_branch(name: str, source: str = "z") -> onnx.GraphProto:
    """``source * scale + shift`` (tf2onnx's inference BatchNorm), constants local to the branch."""
    return h.make_graph([h.make_node("Mul", [source, "scale"], ["scaled"]),
                         h.make_node("Add", ["scaled", "shift"], ["bn_out"])], name, [], [vi("bn_out", ["N", 6])],
                        initializer=[nh.from_array(SCALE, "scale"), nh.from_array(SHIFT, "shift")])


def training_branch(name: str) -> onnx.GraphProto:
    """Normalization with the batch's own statistics (what the learning phase ``True`` computes)."""
    nodes = [h.make_node("ReduceMean", ["z"], ["mean"], axes=[0]), h.make_node("Sub", ["z", "mean"], ["centered"]),
             h.make_node("Mul", ["centered", "centered"], ["sq"]), h.make_node("ReduceMean", ["sq"], ["var"], axes=[0]),
             h.make_node("Add", ["var", "eps"], ["var_eps"]), h.make_node("Sqrt", ["var_eps"], ["std"]),
             h.make_node("Div", ["centered", "std"], ["bn_out"])]
    return h.make_graph(nodes, name, [], [vi("bn_out", ["N", 6])], initializer=[nh.from_array(np.float32(1e-3), "eps")])


def if_model(condition: str, nested: bool = False) -> onnx.ModelProto:
    """The condition: "initializer" (False), "constant_node" (a Constant False), "computed" (Not(True)), "default"
    (an input with a default False, as tf2onnx writes a learning-phase placeholder with a default), "true" (True, the
    then-branch is the inference one). ``nested``: the inference branch sits in an If inside the taken branch, whose
    condition is a constant local to the outer branch."""
    inits = [nh.from_array(W1, "W1"), nh.from_array(W2, "W2")]
    inputs = [vi("x", ["N", 4])]
    nodes = [h.make_node("Gemm", ["x", "W1"], ["z"], transB=1, name="fc1")]
    value = condition == "true"
    if condition in ("initializer", "true"):
        inits.append(nh.from_array(np.array(value), "phase"))
    elif condition == "constant_node":
        nodes.append(h.make_node("Constant", [], ["phase"], value=nh.from_array(np.array(False), "v")))
    elif condition == "computed":
        inits.append(nh.from_array(np.array(True), "flag"))
        nodes.append(h.make_node("Not", ["flag"], ["phase"]))
    elif condition == "default":
        inits.append(nh.from_array(np.array(False), "phase"))
        inputs.append(vi("phase", [], T.BOOL))
    taken = inference_branch("infer")
    if nested:
        taken = h.make_graph([h.make_node("Identity", ["z"], ["z_local"]),
                              h.make_node("If", ["inner_phase"], ["bn_out"], name="inner_if",
                                          then_branch=inference_branch("inner_infer", "z_local"),
                                          else_branch=training_branch("inner_train"))],
                             "outer_taken", [], [vi("bn_out", ["N", 6])],
                             initializer=[nh.from_array(np.array(True), "inner_phase")])
    branches = {"then_branch": taken, "else_branch": training_branch("train")} if value else \
        {"then_branch": training_branch("train"), "else_branch": taken}
    nodes += [h.make_node("If", ["phase"], ["bn"], name="learning_phase_if", **branches),
              h.make_node("Relu", ["bn"], ["hid"], name="relu"),
              h.make_node("Gemm", ["hid", "W2"], ["logits"], transB=1, name="fc2")]
    graph = h.make_graph(nodes, "if_bn", inputs, [vi("logits", ["N", 3])], initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def stab(z):
    return z + EPS * np.where(z >= 0, 1.0, -1.0)


def epsilon_reference(x, target):
    w1, w2 = W1.astype(np.float64), W2.astype(np.float64)
    z = x @ w1.T
    hid = np.maximum(z * SCALE + SHIFT, 0)
    logits = hid @ w2.T
    r = np.zeros_like(logits)
    r[np.arange(len(x)), target] = logits[np.arange(len(x)), target]
    r_hid = hid * ((r / stab(logits)) @ w2)
    return x * ((r_hid / stab(z)) @ w1)


def sample():
    return np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)


@pytest.mark.parametrize("condition,nested", [("initializer", False), ("constant_node", False), ("computed", False),
                                              ("default", False), ("true", False), ("initializer", True)])
def test_constant_if_is_replaced_by_its_branch(condition, nested):
    model = if_model(condition, nested)
    x = sample()
    feeds = {"x": x}
    reference_logits = zm.run_source(model, feeds, ["logits"])[0]
    for rule in ("epsilon", "rlrp", "epsilon-plus-flat"):
        compiled = onnxlrp.compile(model, rule)
        assert "If" not in {n.op_type for n in compiled.graph.node}
        assert not {"ReduceMean", "Sqrt"} & {n.op_type for n in compiled.graph.node if not n.name.startswith("lrp/")}
        out = zm.run_compiled(compiled, feeds)
        np.testing.assert_allclose(out["logits"], reference_logits, rtol=1e-6, atol=1e-7)
        assert np.isfinite(out["relevance"]).all() and np.abs(out["relevance"]).sum() > 0
        if rule == "epsilon":
            expected = epsilon_reference(x.astype(np.float64), out["explained_class"])
            np.testing.assert_allclose(out["relevance"], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    if condition == "default":  # the input keeps its name and its default: feeding nothing works, as before
        assert [i.name for i in compiled.graph.input] == ["x", "phase", "target"]


def test_if_with_a_data_condition_is_reported_in_one_line():
    model = if_model("initializer")
    model.graph.initializer.pop()  # "phase" is now computed from the data
    model.graph.node.insert(0, h.make_node("ReduceSum", ["x"], ["total"], keepdims=0))
    model.graph.node.insert(1, h.make_node("Greater", ["total", "zero"], ["phase"]))
    model.graph.initializer.append(nh.from_array(np.float32(0), "zero"))
    with pytest.raises(UnsupportedOpError) as info:
        onnxlrp.compile(model, "epsilon")
    message = str(info.value)
    assert "\n" not in message
    assert "If x1 (learning_phase_if: " in message and "condition is not a constant" in message


def tf2onnx_learning_phase_model():
    """A TF1-style graph as Keras 2 built it: ``tf.cond(learning_phase, training BN, inference BN)`` with the
    learning phase a ``placeholder_with_default(False)``, converted by tf2onnx (which keeps the cond as an If; it
    folds it only when the placeholder is called ``keras_learning_phase``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, [None, 4], name="x")
        phase = tf1.placeholder_with_default(False, [], name="learning_phase")
        z = tf.matmul(x, tf.constant(W1.T))
        mean, var = tf.nn.moments(z, [0])

        def training():
            return tf.nn.batch_normalization(z, mean, var, None, None, 1e-3)

        def inference():  # scale * (z - 0) / sqrt(1 - eps + eps) + shift = z * SCALE + SHIFT
            return tf.nn.batch_normalization(z, tf.zeros(6), tf.fill([6], 1 - 1e-3), tf.constant(SHIFT),
                                             tf.constant(SCALE), 1e-3)

        hid = tf.nn.relu(tf.cond(phase, training, inference))
        tf.identity(tf.matmul(hid, tf.constant(W2.T)), name="logits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_graph_def(graph.as_graph_def(), input_names=["x:0"],
                                                  output_names=["logits:0"], opset=13)
    return proto


def test_tf2onnx_learning_phase_if():
    model = tf2onnx_learning_phase_model()
    assert "If" in {n.op_type for n in model.graph.node}
    x = sample()
    reference_logits = zm.run_source(model, {"x:0": x}, ["logits:0"])[0]
    for rule in ("epsilon", "rlrp", "epsilon-plus-flat"):
        compiled = onnxlrp.compile(model, rule)
        assert "If" not in {n.op_type for n in compiled.graph.node}
        out = zm.run_compiled(compiled, {"x:0": x})
        np.testing.assert_allclose(out["logits:0"], reference_logits, rtol=1e-5, atol=1e-6)
        assert np.isfinite(out["relevance"]).all() and np.abs(out["relevance"]).sum() > 0
        if rule == "epsilon":
            expected = epsilon_reference(x.astype(np.float64), out["explained_class"])
            np.testing.assert_allclose(out["relevance"], expected, rtol=0, atol=1e-4 * np.abs(expected).max())
