"""Gates, a product of two relevance-carrying tensors: squeeze-and-excitation (dense and broadcast), GLU and SwiGLU
as exporters write them, with the ``value`` rule (default), the ``uniform`` rule and R-LRP's, against the float64
equations; their selection in TOML composites; which factor is the gate; R-LRP's refusal without one."""

from __future__ import annotations

import numpy as np
import pytest
from handbuilt import Nodes, epsilon_dense, one_hot_logits, rlrp_scaled, stab
from onnx import TensorProto, helper

import onnxlrp
from onnxlrp.compiler import inspect
from onnxlrp.errors import OnnxlrpError, UnsupportedOpError

rng = np.random.default_rng(0)
W = {name: rng.normal(0, 0.6, shape) for name, shape in [
    ("W1", (6, 8)), ("b1", (8,)), ("Wg", (8, 8)), ("bg", (8,)), ("W2", (8, 4)), ("b2", (4,)), ("Wh", (6, 16)),
    ("bh", (16,)), ("Wt", (24, 4)), ("bt", (4,))]}
W = {k: v.astype(np.float32).astype(np.float64) for k, v in W.items()}
X = np.random.default_rng(1).normal(size=(2, 6))


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def model_of(g: Nodes, x_shape, out_shape, opset=17):
    graph = helper.make_graph(g.nodes, "gates", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def dense(g, x, w, b, name=None):
    return g.op("Add", [g.op("MatMul", [x, g.const(W[w])]), g.const(W[b])], name)


# ---------------------------------------------------------------- squeeze-and-excitation on a dense layer

def se_dense(gate_op="Sigmoid", value_first=True):
    """``a = Relu(x W1 + b1)``, ``g = Sigmoid(a Wg + bg)`` (or HardSigmoid, or Clip(. + 3, 0, 6) / 6), ``y = a * g``,
    ``logits = y W2 + b2``."""
    g = Nodes()
    a = g.op("Relu", [dense(g, "x", "W1", "b1")], "a")
    s = dense(g, a, "Wg", "bg", "s")
    if gate_op == "HardSigmoid":
        gate = g.op("HardSigmoid", [s], alpha=1 / 6, beta=0.5)
    elif gate_op == "Clip":
        gate = g.op("Mul", [g.op("Clip", [g.op("Add", [s, g.const(3.0)]), g.const(0.0), g.const(6.0)]),
                            g.const(1 / 6)])
    else:
        gate = g.op(gate_op, [s])
    y = g.op("Mul", [a, gate] if value_first else [gate, a], "y")
    dense(g, y, "W2", "b2", "logits")
    return model_of(g, [2, 6], [2, 4])


def se_dense_reference(rule, gate_fn=sigmoid):
    a = np.maximum(X @ W["W1"] + W["b1"], 0)
    s = a @ W["Wg"] + W["bg"]
    y = a * gate_fn(s)
    logits = y @ W["W2"] + W["b2"]
    R0 = one_hot_logits(logits)
    if rule == "rlrp":  # Eq. 8 (up to 1/N) on both dense layers, the gate as a diagonal weight: z_a = y * z_y
        z_y = y * (R0 @ W["W2"].T)
        return rlrp_scaled(X * ((y * z_y) @ W["W1"].T), R0.sum(1))
    R_y = epsilon_dense(y, W["W2"], W["b2"], R0)
    R_a = R_y if rule == "value" else R_y / 2 + epsilon_dense(a, W["Wg"], W["bg"], R_y / 2)
    return epsilon_dense(X, W["W1"], W["b1"], R_a)


UNIFORM_TOML = '[[layer]]\n{selector}\nrule = "uniform"\n[[layer]]\nrule = "epsilon"\n'


def explain(model, rule="epsilon", composite=None, x=X):
    compiled = onnxlrp.compile(model, rule, composite=composite)
    from torch_models import ort_session

    return ort_session(compiled).run(["relevance"], {"x": x.astype(np.float32)})[0]


def assert_matches(actual, expected, tol=1e-4):
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max())


@pytest.mark.parametrize("gate_op,gate_fn", [
    ("Sigmoid", sigmoid), ("HardSigmoid", lambda s: np.clip(s / 6 + 0.5, 0, 1)),
    ("Clip", lambda s: np.clip(s + 3, 0, 6) / 6)])
@pytest.mark.parametrize("value_first", [True, False])
def test_se_gate_value_is_the_default(gate_op, gate_fn, value_first):
    model = se_dense(gate_op, value_first)
    plan = inspect(model, "epsilon")
    value, gate = (0, 1) if value_first else (1, 0)
    assert plan.patterns == [f"gate at 'y': value = input {value} (a), gate = input {gate} ({gate_op})"]
    assert "value" in plan.rules.values()
    assert_matches(explain(model), se_dense_reference("value", gate_fn))


@pytest.mark.parametrize("selector", ['op = "Mul"', 'kind = "gate"', 'name = "^y$"'])
def test_se_gate_uniform_selected_in_a_composite(tmp_path, selector):
    path = tmp_path / "uniform.toml"
    path.write_text(UNIFORM_TOML.format(selector=selector))
    model = se_dense()
    assert inspect(model, composite=path).rules["y"] == "uniform"
    assert_matches(explain(model, composite=path), se_dense_reference("uniform"))


def test_se_gate_rlrp_is_the_diagonal_map_of_eq_6():
    assert_matches(explain(se_dense(), "rlrp"), se_dense_reference("rlrp"))


def test_unknown_kind_in_a_composite_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(UNIFORM_TOML.format(selector='kind = "gates"'))
    with pytest.raises(OnnxlrpError, match="unknown kind 'gates'; valid kinds: linear, join"):
        onnxlrp.compile(se_dense(), composite=path)


# ---------------------------------------------------------------- a gate broadcast over tokens

def se_tokens():
    """``a = x W1 + b1`` per token (``x`` [2, 3, 6]), ``g = Sigmoid(mean_tokens(a) Wg + bg)`` ([2, 1, 8]), ``y = a *
    g`` broadcast over the tokens, ``logits = flatten(y) Wt' + bt`` (Wt' the first 24 rows... of [24, 4])."""
    g = Nodes()
    a = dense(g, "x", "W1", "b1", "a")
    m = g.op("ReduceMean", [a], "m", axes=[1], keepdims=1)
    gate = g.op("Sigmoid", [dense(g, m, "Wg", "bg")])
    y = g.op("Mul", [a, gate], "y")
    flat = g.op("Reshape", [y, g.const([0, -1], np.int64)])
    g.op("Add", [g.op("MatMul", [flat, g.const(W["Wt"])]), g.const(W["bt"])], "logits")
    return model_of(g, [2, 3, 6], [2, 4])


def se_tokens_reference(rule, x):
    a = x @ W["W1"] + W["b1"]
    m = a.mean(1, keepdims=True)
    s = m @ W["Wg"] + W["bg"]
    y = a * sigmoid(s)
    logits = y.reshape(2, -1) @ W["Wt"] + W["bt"]
    R_y = epsilon_dense(y.reshape(2, -1), W["Wt"], W["bt"], one_hot_logits(logits)).reshape(y.shape)
    if rule == "value":
        R_a = R_y
    else:
        R_m = epsilon_dense(m, W["Wg"], W["bg"], (R_y / 2).sum(1, keepdims=True))  # the gate's share, unbroadcast
        R_a = R_y / 2 + a * (R_m / stab(m)) / 3  # the token mean: Norm rule
    return epsilon_dense(x, W["W1"], W["b1"], R_a)


@pytest.mark.parametrize("rule", ["value", "uniform"])
def test_broadcast_gate(tmp_path, rule):
    x = np.random.default_rng(3).normal(size=(2, 3, 6))
    path = tmp_path / "uniform.toml"
    path.write_text(UNIFORM_TOML.format(selector='kind = "gate"'))
    relevance = explain(se_tokens(), composite=path if rule == "uniform" else None, x=x)
    assert_matches(relevance, se_tokens_reference(rule, x))


# ---------------------------------------------------------------- GLU and SwiGLU

def glu(swish: bool):
    """GLU ``a * Sigmoid(b)`` from one dense layer split in halves (torch's ``F.glu``: Split, Sigmoid, Mul), or
    SwiGLU ``SiLU(a) * b`` (LLaMA's MLP)."""
    g = Nodes()
    h = dense(g, "x", "Wh", "bh", "h")
    g.nodes.append(helper.make_node("Split", [h, g.const([8, 8], np.int64)], ["ha", "hb"], axis=1, name="split"))
    if swish:
        y = g.op("Mul", [g.op("Mul", ["ha", g.op("Sigmoid", ["ha"])]), "hb"], "y")
    else:
        y = g.op("Mul", ["ha", g.op("Sigmoid", ["hb"])], "y")
    dense(g, y, "W2", "b2", "logits")
    return model_of(g, [2, 6], [2, 4])


def glu_reference(rule, swish):
    h = X @ W["Wh"] + W["bh"]
    a, b = h[:, :8], h[:, 8:]
    y = a * sigmoid(a) * b if swish else a * sigmoid(b)
    R_y = epsilon_dense(y, W["W2"], W["b2"], one_hot_logits(y @ W["W2"] + W["b2"]))
    R_h = np.concatenate([R_y, np.zeros_like(R_y)] if rule == "value" and not swish else [R_y / 2, R_y / 2], 1)
    return epsilon_dense(X, W["Wh"], W["bh"], R_h)


@pytest.mark.parametrize("rule", ["value", "uniform"])
def test_glu(tmp_path, rule):
    path = tmp_path / "uniform.toml"
    path.write_text(UNIFORM_TOML.format(selector='op = "Mul"'))
    assert inspect(glu(False), "epsilon").patterns == ["gate at 'y': value = input 0 (ha), gate = input 1 (Sigmoid)"]
    assert_matches(explain(glu(False), composite=path if rule == "uniform" else None), glu_reference(rule, False))


def test_swiglu_has_no_gate_factor_value_splits_uniformly():
    """SwiGLU's factors are a SiLU (an activation, not a gate) and a linear branch: ``value`` falls back to the
    uniform split (LXT's rule for LLaMA's MLP), and ``inspect`` says so."""
    plan = inspect(glu(True), "epsilon")
    assert plan.patterns[0].startswith("ElementwiseActivation")
    assert plan.patterns[1].startswith("gate at 'y': no single gate factor")
    assert_matches(explain(glu(True)), glu_reference("uniform", True))


def test_rlrp_refuses_a_product_without_a_gate():
    with pytest.raises(UnsupportedOpError, match=r"Mul x1 \(y: a product of two relevance-carrying tensors of which "
                                                 r"neither \(or both\) is a gate"):
        onnxlrp.compile(glu(True), "rlrp")
    (line,) = inspect(glu(True), "rlrp").unsupported
    assert line.startswith("y (Mul, domain ai.onnx, opset 17): a product of two relevance-carrying tensors of which "
                           "neither (or both) is a gate (Sigmoid, HardSigmoid, Softmax, bounded Clip): rlrp has no "
                           "rule for it")


def test_cli_inspect_prints_the_gates(tmp_path):
    import subprocess
    import sys

    import onnx

    onnx.save(se_dense(), tmp_path / "se.onnx")
    done = subprocess.run([sys.executable, "-m", "onnxlrp.cli", "inspect", str(tmp_path / "se.onnx"), "--rule",
                           "epsilon"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "  y: value\n" in done.stdout
    assert "1 recognized pattern(s) and gate(s) on the relevance path:\n  gate at 'y': value = input 0 (a), gate = " \
           "input 1 (Sigmoid)" in done.stdout
