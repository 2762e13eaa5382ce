"""Division in the forms exporters write: ``x / g(x)`` and ``x * Reciprocal(g(x))`` element-wise activations (SiLU as
``x / (1 + exp(-x))``) get the identity rule like ``x * f(x)``; ``Reciprocal``/``Sqrt`` of constants (a decomposed
BatchNorm's ``1 / sqrt(var + eps)``) are folded; what remains is reported in one line with its own reason.

Network: ``x [N, 5] -> Gemm W1 -> t -> activation -> a -> Gemm W2 -> logits``; reference: the epsilon rule in float64
numpy with the activation passing relevance."""

from __future__ import annotations

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
W1 = RNG.normal(0, 0.6, (6, 5)).astype(np.float32)
W2 = RNG.normal(0, 0.5, (4, 6)).astype(np.float32)
VAR = RNG.uniform(0.5, 2.0, 6).astype(np.float32)


def activation_nodes(form: str) -> list[onnx.NodeProto]:
    """Nodes from ``t`` to ``a``."""
    sigmoid_denominator = [h.make_node("Neg", ["t"], ["neg"]), h.make_node("Exp", ["neg"], ["e"]),
                           h.make_node("Add", ["one", "e"], ["den"])]
    return {
        "div": [*sigmoid_denominator, h.make_node("Div", ["t", "den"], ["a"], name="swish")],
        "reciprocal": [*sigmoid_denominator, h.make_node("Reciprocal", ["den"], ["rec"]),
                       h.make_node("Mul", ["t", "rec"], ["a"], name="swish")],
        "one_over": [*sigmoid_denominator, h.make_node("Div", ["one", "den"], ["rec"]),
                     h.make_node("Mul", ["rec", "t"], ["a"], name="swish")],
        # a decomposed BatchNorm on constants: t * Reciprocal(Sqrt(var + eps)), then Relu
        "folded_reciprocal": [h.make_node("Add", ["var", "bn_eps"], ["var_eps"]),
                              h.make_node("Sqrt", ["var_eps"], ["std"]), h.make_node("Reciprocal", ["std"], ["inv"]),
                              h.make_node("Mul", ["t", "inv"], ["normed"]), h.make_node("Relu", ["normed"], ["a"])],
    }[form]


def model(form: str) -> onnx.ModelProto:
    nodes = [h.make_node("Gemm", ["x", "W1"], ["t"], transB=1, name="fc1"), *activation_nodes(form),
             h.make_node("Gemm", ["a", "W2"], ["logits"], transB=1, name="fc2")]
    inits = [nh.from_array(W1, "W1"), nh.from_array(W2, "W2"), nh.from_array(np.float32(1), "one"),
             nh.from_array(VAR, "var"), nh.from_array(np.float32(1e-3), "bn_eps")]
    # a static batch: the x * f(x) recognizer wants a static shape (passes/patterns.py)
    graph = h.make_graph(nodes, form, [h.make_tensor_value_info("x", T.FLOAT, [5, 5])],
                         [h.make_tensor_value_info("logits", T.FLOAT, [5, 4])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def stab(z):
    return z + EPS * np.where(z >= 0, 1.0, -1.0)


def epsilon_reference(form, x, target):
    t = x @ W1.T.astype(np.float64)
    a = t / (1 + np.exp(-t)) if form != "folded_reciprocal" else np.maximum(t / np.sqrt(VAR + 1e-3), 0)
    logits = a @ W2.T.astype(np.float64)
    r = np.zeros_like(logits)
    r[np.arange(len(x)), target] = logits[np.arange(len(x)), target]
    r_t = a * ((r / stab(logits)) @ W2)  # the activation passes relevance
    return x * ((r_t / stab(t)) @ W1)


@pytest.mark.parametrize("form", ["div", "reciprocal", "one_over", "folded_reciprocal"])
def test_quotient_forms_against_float64_reference(form):
    m = model(form)
    x = np.random.default_rng(1).normal(size=(5, 5)).astype(np.float32)
    reference_logits = zm.run_source(m, {"x": x}, ["logits"])[0]
    for rule in ("epsilon", "rlrp", "epsilon-plus-flat"):
        compiled = onnxlrp.compile(m, rule)
        out = zm.run_compiled(compiled, {"x": x})
        np.testing.assert_allclose(out["logits"], reference_logits, rtol=1e-6, atol=1e-7)
        assert np.isfinite(out["relevance"]).all() and np.abs(out["relevance"]).sum() > 0
        if rule == "epsilon":
            expected = epsilon_reference(form, x.astype(np.float64), out["explained_class"])
            np.testing.assert_allclose(out["relevance"], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    if form == "folded_reciprocal":  # the constant path is gone from the compiled graph
        assert not {"Reciprocal", "Sqrt"} & {n.op_type for n in compiled.graph.node}


@pytest.mark.parametrize("nodes,reason", [
    ([h.make_node("Reciprocal", ["t"], ["a"], name="the_op")], "the reciprocal of a relevance-carrying tensor"),
    ([h.make_node("Gemm", ["x", "W1"], ["u"], transB=1), h.make_node("Div", ["t", "u"], ["a"], name="the_op")],
     "a quotient of two relevance-carrying tensors"),
], ids=["reciprocal", "quotient"])
def test_what_remains_is_reported_in_one_line(nodes, reason):
    """A lone Reciprocal of an activation, and a quotient of two branches (not one activation of one tensor):
    refused, the node and the reason on one line."""
    m = model("div")
    kept = [n for n in m.graph.node if n.op_type == "Gemm"]
    del m.graph.node[:]
    m.graph.node.extend([kept[0], *nodes, kept[1]])
    with pytest.raises(UnsupportedOpError) as info:
        onnxlrp.compile(m, "epsilon")
    assert "\n" not in str(info.value) and "x1 (the_op: " in str(info.value) and reason in str(info.value)
