"""Normalizations: LayerNormalization, RMSNormalization, GroupNormalization, InstanceNormalization ops and the
decomposed forms exporters write (torch, paddle, TensorFlow's moments form, LLaMA's RMS norm, torch's GroupNorm export),
with the linearized epsilon rule (default), the identity rule and R-LRP, against the float64 equations
(``tests/handbuilt.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from handbuilt import Nodes, epsilon_dense, layer_norm, linearized_norm, one_hot_logits, relative_norm, rlrp_scaled
from onnx import TensorProto, helper

import onnxlrp
from onnxlrp.compiler import inspect

rng = np.random.default_rng(0)
W1 = rng.normal(0, 0.6, (6, 8)).astype(np.float32).astype(np.float64)
B1 = rng.normal(0, 0.3, 8).astype(np.float32).astype(np.float64)
GAMMA = rng.uniform(0.5, 1.5, 8).astype(np.float32).astype(np.float64)
BETA = rng.normal(0, 0.3, 8).astype(np.float32).astype(np.float64)
WT = rng.normal(0, 0.4, (24, 4)).astype(np.float32).astype(np.float64)
BT = rng.normal(0, 0.2, 4).astype(np.float32).astype(np.float64)
EPS_LN = 1e-5


def tokens_net(norm, opset=17):
    """``x`` [2, 3, 6] -> per-token dense -> ``z`` [2, 3, 8] -> ``norm(nodes, z) -> y`` -> flatten -> dense [24, 4]."""
    g = Nodes()
    z = g.op("Add", [g.op("MatMul", ["x", g.const(W1)]), g.const(B1)], "z")
    y = norm(g, z)
    flat = g.op("Reshape", [y, g.const([0, -1], np.int64)], "flat")
    g.op("Add", [g.op("MatMul", [flat, g.const(WT)]), g.const(BT)], "logits")
    graph = helper.make_graph(g.nodes, "norms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 4])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def mean(g, t):
    return g.op("ReduceMean", [t], axes=[-1], keepdims=1)


def torch_ln(g, z, square="Pow", twice=False):
    """torch TorchScript (opset < 17) and paddle2onnx: ``(z - m) / Sqrt(mean((z - m)^2) + eps) * w + b``."""
    d = g.op("Sub", [z, mean(g, z)])
    d2 = g.op("Sub", [z, g.nodes[-2].output[0]]) if twice else d
    sq = g.op("Pow", [d2, g.const(2.0)]) if square == "Pow" else g.op("Mul", [d2, d2])
    sigma = g.op("Sqrt", [g.op("Add", [mean(g, sq), g.const(EPS_LN)])])
    return g.op("Add", [g.op("Mul", [g.op("Div", [d, sigma]), g.const(GAMMA)]), g.const(BETA)])


def tf_moments_ln(g, z, shift="Sub"):
    """TensorFlow's batch_normalization: ``z * s + (b - m * s)``, ``s = gamma / sqrt(var + eps)``."""
    m = mean(g, z)
    d = g.op("Sub", [z, m])
    s = g.op("Mul", [g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean(g, g.op("Mul", [d, d])),
                                                                     g.const(EPS_LN)])])]), g.const(GAMMA)])
    if shift == "Sub":
        c = g.op("Sub", [g.const(BETA), g.op("Mul", [m, s])])
    else:
        c = g.op("Add", [g.op("Mul", [g.op("Neg", [m]), s]), g.const(BETA)])
    return g.op("Add", [g.op("Mul", [z, s]), c])


def rms_decomposed(g, z, inverse="Reciprocal"):
    """LLaMA's RMSNorm as torch exports it: ``w * z * rsqrt(mean(z^2) + eps)``."""
    v = g.op("Add", [mean(g, g.op("Pow", [z, g.const(2.0)])), g.const(EPS_LN)])
    if inverse == "Reciprocal":
        inv = g.op("Reciprocal", [g.op("Sqrt", [v])])
    elif inverse == "Div":
        inv = g.op("Div", [g.const(1.0), g.op("Sqrt", [v])])
    else:
        inv = g.op("Pow", [v, g.const(-0.5)])
    return g.op("Mul", [g.const(GAMMA), g.op("Mul", [z, inv])])


# name: (builder, opset, centered, has bias, pattern op count or None for an op)
FORMS = {
    "LayerNormalization": (lambda g, z: g.op("LayerNormalization", [z, g.const(GAMMA), g.const(BETA)],
                                             epsilon=EPS_LN), 17, True, True, None),
    "RMSNormalization": (lambda g, z: g.op("RMSNormalization", [z, g.const(GAMMA)], epsilon=EPS_LN), 23, False,
                         False, None),
    "torch_decomposed": (torch_ln, 13, True, True, 9),
    "paddle_mul_square_twice": (lambda g, z: torch_ln(g, z, "Mul", twice=True), 13, True, True, 10),
    "tf_moments_sub": (tf_moments_ln, 13, True, True, 12),
    "tf_moments_neg": (lambda g, z: tf_moments_ln(g, z, "Neg"), 13, True, True, 13),
    "rms_reciprocal": (rms_decomposed, 17, False, False, 7),
    "rms_div": (lambda g, z: rms_decomposed(g, z, "Div"), 17, False, False, 7),
    "rms_pow": (lambda g, z: rms_decomposed(g, z, "Pow"), 17, False, False, 6),
}


def tokens_reference(x, rule, centered, bias):
    """The relevance of :func:`tokens_net` in float64: ``linearized``, ``identity`` or ``rlrp``."""
    z = x @ W1 + B1
    y, sigma = layer_norm(z, -1, GAMMA, BETA if bias else None, EPS_LN, centered)
    logits = y.reshape(2, -1) @ WT + BT
    R0 = one_hot_logits(logits)
    if rule == "rlrp":
        z_y = (y.reshape(2, -1) * (R0 @ WT.T)).reshape(y.shape)
        return rlrp_scaled(x * (relative_norm(z, sigma, z_y, -1, GAMMA, centered) @ W1.T), R0.sum(1))
    R_y = epsilon_dense(y.reshape(2, -1), WT, BT, R0).reshape(y.shape)
    R_z = R_y if rule == "identity" else linearized_norm(z, y, sigma, R_y, -1, GAMMA, centered)
    return epsilon_dense(x, W1, B1, R_z)


def explain(model, x, rule="epsilon", composite=None):
    from torch_models import ort_session

    return ort_session(onnxlrp.compile(model, rule, composite=composite)).run(["relevance"],
                                                                               {"x": x.astype(np.float32)})[0]


@pytest.mark.parametrize("rule", ["linearized", "identity", "rlrp"])
@pytest.mark.parametrize("form", list(FORMS))
def test_layer_and_rms_norms(tmp_path, form, rule):
    build, opset, centered, bias, n_ops = FORMS[form]
    model = tokens_net(build, opset)
    plan = inspect(model, "rlrp" if rule == "rlrp" else "epsilon")
    assert not plan.unsupported
    if n_ops is None:
        assert plan.patterns == []
    else:
        assert len(plan.patterns) == 1 and plan.patterns[0].startswith("Normalization") and \
            f"({n_ops} nodes:" in plan.patterns[0]
    composite = None
    if rule == "identity":
        composite = tmp_path / "identity.toml"
        composite.write_text('[[layer]]\nkind = "normalization"\nrule = "identity"\n[[layer]]\nrule = "epsilon"\n')
    x = np.random.default_rng(1).normal(size=(2, 3, 6))
    relevance = explain(model, x, "rlrp" if rule == "rlrp" else "epsilon", composite)
    expected = tokens_reference(x, rule, centered, bias)
    np.testing.assert_allclose(relevance, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_norm_stabilizer_parameter_reaches_the_normalization():
    """``--stabilizer`` sets the normalization's epsilon: a large one visibly changes the map, as the equation
    says."""
    model = tokens_net(FORMS["LayerNormalization"][0])
    x = np.random.default_rng(1).normal(size=(2, 3, 6))
    compiled = onnxlrp.compile(model, "epsilon", stabilizer=0.5)
    assert any(v == "linearized(stabilizer=0.5)" for v in inspect(model, "epsilon", stabilizer=0.5).rules.values())
    from torch_models import ort_session

    relevance = ort_session(compiled).run(["relevance"], {"x": x.astype(np.float32)})[0]
    z = x @ W1 + B1
    y, sigma = layer_norm(z, -1, GAMMA, BETA, EPS_LN)
    R_y = epsilon_dense(y.reshape(2, -1), WT, BT, one_hot_logits(y.reshape(2, -1) @ WT + BT)).reshape(y.shape)
    expected = epsilon_dense(x, W1, B1, linearized_norm(z, y, sigma, R_y, -1, GAMMA, eps=0.5))
    np.testing.assert_allclose(relevance, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


# ---------------------------------------------------------------- group and instance normalization

WC = rng.normal(0, 0.3, (36, 4)).astype(np.float32).astype(np.float64)
CHANNEL_W = rng.uniform(0.5, 1.5, 4).astype(np.float32).astype(np.float64)
CHANNEL_B = rng.normal(0, 0.3, 4).astype(np.float32).astype(np.float64)


def channels_net(norm, opset):
    """``x`` [2, 4, 3, 3] -> ``norm`` -> flatten -> dense [36, 4]."""
    g = Nodes()
    y = norm(g, "x")
    g.op("MatMul", [g.op("Flatten", [y]), g.const(WC)], "logits")
    graph = helper.make_graph(g.nodes, "groups", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                [2, 4, 3, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 4])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def channels_reference(x, groups, rule, w=CHANNEL_W, b=CHANNEL_B):
    """Group normalization over ``groups`` groups of channels (4 groups: instance normalization), with the
    per-channel scale ``w`` and shift ``b``."""
    xg = x.reshape(2, groups, -1)
    yg, sigma = layer_norm(xg, -1, eps=EPS_LN)
    w, b = np.reshape(w, (1, 4, 1, 1)), np.reshape(b, (1, 4, 1, 1))
    y = yg.reshape(x.shape) * w + b
    logits = y.reshape(2, -1) @ WC
    R0 = one_hot_logits(logits)
    if rule == "rlrp":
        z_y = (y.reshape(2, -1) * (R0 @ WC.T)).reshape(x.shape)
        h = (w * z_y).reshape(2, groups, -1) / sigma
        return rlrp_scaled(x * (h - h.mean(-1, keepdims=True)).reshape(x.shape), R0.sum(1))
    R_y = epsilon_dense(y.reshape(2, -1), WC, np.zeros(4), R0).reshape(x.shape)
    return linearized_norm(xg, y.reshape(xg.shape), sigma, (w * R_y).reshape(xg.shape), -1).reshape(x.shape)


GROUP_W, GROUP_B = np.array([0.75, 1.25]), np.array([0.125, -0.25])  # opset 18: one scale and shift per group
GROUP_FORMS = {  # name: (builder, opset, groups, per-channel scale and shift)
    "InstanceNormalization": (lambda g, x: g.op("InstanceNormalization", [x, g.const(CHANNEL_W), g.const(CHANNEL_B)],
                                                epsilon=EPS_LN), 17, 4, CHANNEL_W, CHANNEL_B),
    "GroupNormalization18": (lambda g, x: g.op("GroupNormalization", [x, g.const(GROUP_W), g.const(GROUP_B)],
                                               epsilon=EPS_LN, num_groups=2), 18, 2, np.repeat(GROUP_W, 2),
                             np.repeat(GROUP_B, 2)),
    "GroupNormalization21": (lambda g, x: g.op("GroupNormalization", [x, g.const(CHANNEL_W), g.const(CHANNEL_B)],
                                               epsilon=EPS_LN, num_groups=2), 21, 2, CHANNEL_W, CHANNEL_B),
}


@pytest.mark.parametrize("rule", ["epsilon", "rlrp"])
@pytest.mark.parametrize("form", list(GROUP_FORMS))
def test_group_and_instance_norm_ops(form, rule):
    build, opset, groups, w, b = GROUP_FORMS[form]
    x = np.random.default_rng(2).normal(size=(2, 4, 3, 3))
    relevance = explain(channels_net(build, opset), x, rule)
    expected = channels_reference(x, groups, "rlrp" if rule == "rlrp" else "linearized", w, b)
    np.testing.assert_allclose(relevance, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize("exporter,opset", [("torchscript", 17), pytest.param("dynamo", 18, marks=pytest.mark.slow)])
def test_torch_group_norm_export_is_one_normalization(exporter, opset):
    """torch writes GroupNorm as Reshape, InstanceNormalization (scale 1, bias 0), Reshape, Mul, Add: one group
    normalization with the per-channel affine map inside (so the epsilon rule divides by the output ``y``, bias
    included)."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch_models import export

    module = nn.Sequential(nn.GroupNorm(2, 4, eps=EPS_LN), nn.Flatten(), nn.Linear(36, 4, bias=False)).eval()
    with torch.no_grad():
        module[0].weight.copy_(torch.from_numpy(CHANNEL_W))
        module[0].bias.copy_(torch.from_numpy(CHANNEL_B))
        module[2].weight.copy_(torch.from_numpy(WC.T))
    x = np.random.default_rng(3).normal(size=(2, 4, 3, 3))
    model = export(module, torch.from_numpy(x.astype(np.float32)), exporter=exporter, opset=opset)
    model.graph.input[0].name = "x"
    for node in model.graph.node:
        node.input[:] = ["x" if i == "input" else i for i in node.input]
    plan = inspect(model, "epsilon")
    assert len(plan.patterns) == 1 and plan.patterns[0].startswith("Normalization")
    assert "InstanceNormalization" in plan.patterns[0]
    expected = channels_reference(x, 2, "linearized")
    np.testing.assert_allclose(explain(model, x), expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
