"""Element-wise activations ``x * f(x)`` in every form exporters write them: recognized as one activation
(``inspect`` lists the pattern, no gate), given the identity rule, and checked against the float64 equations
(``tests/handbuilt.py``) and, for torch exports by both exporters, against the float64 reference on the torch model
(``tests/lrp_tape.py``)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from handbuilt import dense_net, epsilon_dense, one_hot_logits, rlrp_scaled

import onnxlrp
from onnxlrp.compiler import inspect

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch_models import export, ort_session  # noqa: E402


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def hard_sigmoid(z):
    return np.clip(z / 6 + 0.5, 0, 1)


def softplus(z):
    return np.log1p(np.exp(z))


def erf(z):
    return np.vectorize(math.erf)(z)


def gelu_tanh(z):
    return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


def build_gelu_tanh(g, z, cube):
    inner = g.op("Add", [z, g.op("Mul", [cube, g.const(0.044715)])])
    t = g.op("Add", [g.op("Tanh", [g.op("Mul", [inner, g.const(math.sqrt(2 / math.pi))])]), g.const(1.0)])
    return g.op("Mul", [g.op("Mul", [z, g.const(0.5)]), t])


def hardswish_paddle(g, z):  # paddle2onnx: x * Clip(x + 3, 0, 6) / 6
    clip = g.op("Clip", [g.op("Add", [z, g.const(3.0)]), g.const(0.0), g.const(6.0)])
    return g.op("Div", [g.op("Mul", [z, clip]), g.const(6.0)])


def hardswish_tf2onnx(g, z):  # Keras hard_swish through tf2onnx: x * (Relu6(x + 3) * (1/6))
    clip = g.op("Clip", [g.op("Add", [z, g.const(3.0)]), g.const(0.0), g.const(6.0)])
    return g.op("Mul", [z, g.op("Mul", [clip, g.const(1 / 6)])])


def hardswish_keras2onnx(g, z):  # keras2onnx-era Relu6 as Min(Relu(.), 6)
    relu6 = g.op("Min", [g.op("Relu", [g.op("Add", [z, g.const(3.0)])]), g.const(6.0)])
    return g.op("Mul", [g.op("Mul", [relu6, g.const(1 / 6)]), z])


# name: (subgraph builder, numpy activation, opset, op types the pattern covers or None for a single op)
FORMS = {
    "silu": (lambda g, z: g.op("Mul", [z, g.op("Sigmoid", [z])]), lambda z: z * sigmoid(z), 17,
             ["Sigmoid", "Mul"]),
    "swish_beta": (lambda g, z: g.op("Mul", [g.op("Sigmoid", [g.op("Mul", [z, g.const(1.7)])]), z]),
                   lambda z: z * sigmoid(1.7 * z), 17, ["Mul", "Sigmoid", "Mul"]),
    "hardswish_op": (lambda g, z: g.op("HardSwish", [z]), lambda z: z * hard_sigmoid(z), 17, None),
    "hardswish_hardsigmoid": (lambda g, z: g.op("Mul", [z, g.op("HardSigmoid", [z], alpha=1 / 6, beta=0.5)]),
                              lambda z: z * hard_sigmoid(z), 13, ["HardSigmoid", "Mul"]),
    "hardswish_paddle": (hardswish_paddle, lambda z: z * np.clip(z + 3, 0, 6) / 6, 13, ["Add", "Clip", "Mul"]),
    "hardswish_tf2onnx": (hardswish_tf2onnx, lambda z: z * hard_sigmoid(z), 13, ["Add", "Clip", "Mul", "Mul"]),
    "hardswish_keras2onnx": (hardswish_keras2onnx, lambda z: z * hard_sigmoid(z), 11,
                             ["Add", "Relu", "Min", "Mul", "Mul"]),
    "gelu_erf": (lambda g, z: g.op("Mul", [g.op("Mul", [z, g.op("Add", [g.op("Erf", [g.op(
        "Div", [z, g.const(math.sqrt(2))])]), g.const(1.0)])]), g.const(0.5)]),
        lambda z: 0.5 * z * (1 + erf(z / math.sqrt(2))), 13, ["Div", "Erf", "Add", "Mul"]),
    "gelu_tanh_mul": (lambda g, z: build_gelu_tanh(g, z, g.op("Mul", [g.op("Mul", [z, z]), z])), gelu_tanh, 17,
                      ["Mul", "Mul", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"]),
    "gelu_tanh_pow": (lambda g, z: build_gelu_tanh(g, z, g.op("Pow", [z, g.const(3.0)])), gelu_tanh, 18,
                      ["Pow", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"]),
    "gelu_op": (lambda g, z: g.op("Gelu", [z]), lambda z: 0.5 * z * (1 + erf(z / math.sqrt(2))), 20, None),
    "mish": (lambda g, z: g.op("Mul", [z, g.op("Tanh", [g.op("Softplus", [z])])]), lambda z: z * np.tanh(softplus(z)),
             17, ["Softplus", "Tanh", "Mul"]),
    "mish_op": (lambda g, z: g.op("Mish", [z]), lambda z: z * np.tanh(softplus(z)), 18, None),
}


def reference(weights, act, x, rule):
    """The float64 relevance of the hand-built net: epsilon (identity on the activation) or R-LRP (Eq. 8)."""
    W1, b1, W2, b2 = (weights[k] for k in ("W1", "b1", "W2", "b2"))
    z = x @ W1 + b1
    a = act(z)
    logits = a @ W2 + b2
    R = one_hot_logits(logits)
    if rule == "epsilon":
        return epsilon_dense(x, W1, b1, epsilon_dense(a, W2, b2, R))
    return rlrp_scaled(x * ((a * (R @ W2.T)) @ W1.T), R.sum(1))


@pytest.mark.parametrize("rule", ["epsilon", "rlrp"])
@pytest.mark.parametrize("form", list(FORMS))
def test_activation_forms_are_one_activation_with_the_identity_rule(form, rule):
    build, act, opset, covered = FORMS[form]
    model, weights = dense_net(build, opset=opset)
    plan = inspect(model, rule)
    assert not plan.unsupported
    assert not any(line.startswith("gate") for line in plan.patterns)
    if covered is None:
        assert plan.patterns == []
    else:
        assert len(plan.patterns) == 1 and plan.patterns[0].startswith("ElementwiseActivation")
        assert sorted(plan.patterns[0].split("nodes: ")[1].rstrip(")").split(", ")) == sorted(covered)
    x = np.random.default_rng(1).normal(size=(2, 6)).astype(np.float32)
    session = ort_session(onnxlrp.compile(model, rule))
    relevance = session.run(["relevance"], {"x": x})[0]
    expected = reference(weights, act, x.astype(np.float64), rule)
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_activation_shared_with_another_reader_is_not_fused():
    """``x * Sigmoid(x)`` whose Sigmoid is also read elsewhere stays two nodes (the Mul is then a gate whose gate
    factor is the Sigmoid: the value rule gives it the same relevance as the identity rule would)."""
    def build(g, z):
        s = g.op("Sigmoid", [z])
        return g.op("Add", [g.op("Mul", [z, s]), s])
    model, _ = dense_net(build)
    plan = inspect(model, "epsilon")
    assert not any(line.startswith("ElementwiseActivation") for line in plan.patterns)
    assert any(line.startswith("gate") and "(Sigmoid)" in line for line in plan.patterns)


def test_activation_source_is_the_nearest_common_tensor():
    """The bias Add before ``x`` (an element-wise op of the MatMul's output with a constant) stays outside the
    activation, so the MatMul keeps its bias: the rule plan shows the dense layer, the pattern only the Sigmoid and the
    Mul (the relevance is checked against the reference in the form test)."""
    model, _ = dense_net(FORMS["silu"][0])
    plan = inspect(model, "epsilon")
    assert plan.patterns == ["ElementwiseActivation at 'p_Mul_6' (2 nodes: Sigmoid, Mul)"]


# ---------------------------------------------------------------- torch exports, both exporters

class Activations(nn.Module):
    """Linear layers with SiLU, Hardswish, GELU (erf), GELU (tanh) and Mish between them."""

    def __init__(self):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        self.activations = nn.ModuleList([nn.SiLU(), nn.Hardswish(), nn.GELU(), nn.GELU(approximate="tanh"),
                                          nn.Mish()])

    def forward(self, x):
        for linear, act in zip(self.linears, self.activations, strict=False):
            x = act(linear(x))
        return self.linears[-1](x)

    def lrp_forward(self, tape, x):
        for linear, act in zip(self.linears, self.activations, strict=False):
            x = tape.pass_through(tape.dense(x, linear), act)
        return tape.dense(x, self.linears[-1])


@functools.cache
def activations_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Activations().eval()


# exporter, opset -> how many activations are written as x * f(x) subgraphs (the rest are single ops)
EXPORTS = {("torchscript", 13): 5, ("torchscript", 17): 4, ("dynamo", 18): 3, ("dynamo", 20): 1}


@pytest.mark.parametrize("exporter,opset", [pytest.param(*k, marks=pytest.mark.slow) if k[0] == "dynamo" else k
                                            for k in EXPORTS])
def test_torch_exported_activations_match_the_reference(exporter, opset):
    from lrp_tape import reference_relevance

    x = np.random.default_rng(2).normal(size=(2, 8)).astype(np.float32)
    model = export(activations_model(), torch.from_numpy(x), exporter=exporter, opset=opset)
    plan = inspect(model, "epsilon")
    assert not plan.unsupported and len(plan.patterns) == EXPORTS[(exporter, opset)]
    assert all(line.startswith("ElementwiseActivation") for line in plan.patterns)
    expected, logits = reference_relevance(activations_model(), x)
    out = dict(zip(["logits", "relevance"], ort_session(onnxlrp.compile(model, "epsilon")).run(
        ["logits", "relevance"], {"input": x}), strict=True))
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["relevance"], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
