"""Element-wise Max and Min: winner-take-all between relevance-carrying branches (classic: the first operand that
attains the extremum; R-LRP: every one, times its value, normalized at the fork by Eq. 13), and an activation that
passes relevance when the other operands are constants (``Max(x, 0)`` is a ReLU). Checked against float64 numpy
references written from the rules, on hand-built graphs and on ``torch.maximum`` exported by both exporters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import zoo_models as zm
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxlrp

EPS = 1e-6


def stab(z, eps=EPS):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.6, shape).astype(np.float32) for shape in ((6, 5), (6, 5), (4, 6))]


CONSTANT = np.array([0.3, -5, 0.1, 0.2, -5, 0.4], np.float32)  # wins against both branches at some positions


def join_model(form: str, seed=0) -> onnx.ModelProto:
    """``x [N, 5]`` -> ``a = W1 x``, ``b = W2 x`` (Gemm, no bias) -> ``m = form(a, b)`` -> ``logits = W3 m``."""
    w1, w2, w3 = weights(seed)
    nodes = [h.make_node("Gemm", ["x", "W1"], ["a"], transB=1, name="fc_a"),
             h.make_node("Gemm", ["x", "W2"], ["b"], transB=1, name="fc_b")]
    operands = {"max": ("Max", ["a", "b"]), "min": ("Min", ["a", "b"]), "max_const": ("Max", ["a", "b", "c"]),
                "tie": ("Max", ["ra", "a"]), "relu": ("Max", ["a", "zero"]), "min_const": ("Min", ["c", "a"])}[form]
    if form == "tie":
        nodes.append(h.make_node("Relu", ["a"], ["ra"], name="relu_a"))
    nodes += [h.make_node(operands[0], operands[1], ["m"], name="the_join"),
              h.make_node("Gemm", ["m", "W3"], ["logits"], transB=1, name="fc_out")]
    inits = [nh.from_array(w1, "W1"), nh.from_array(w2, "W2"), nh.from_array(w3, "W3"),
             nh.from_array(CONSTANT, "c"), nh.from_array(np.float32(0), "zero")]
    graph = h.make_graph(nodes, "extremum", [h.make_tensor_value_info("x", T.FLOAT, ["N", 5])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", 4])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def forward(form, x, seed=0):
    w1, w2, w3 = (w.astype(np.float64) for w in weights(seed))
    a, b = x @ w1.T, x @ w2.T
    pair = {"max": (a, b), "min": (a, b), "max_const": (a, b), "tie": (np.maximum(a, 0), a), "relu": (a,),
            "min_const": (a,)}[form]
    pick = np.minimum if form in ("min", "min_const") else np.maximum
    m = pick(*pair) if len(pair) > 1 else pair[0]
    if form == "max_const":
        m_out = np.maximum(m, CONSTANT)
    elif form == "relu":
        m_out = np.maximum(a, 0)
    elif form == "min_const":
        m_out = np.minimum(a, CONSTANT)
    else:
        m_out = m
    return (w1, w2, w3), a, b, pair, m, m_out, m_out @ w3.T


def epsilon_reference(form, x, target):
    """Classic epsilon on the linear layers; at the join R goes to the first operand attaining the extremum of the
    relevance-carrying operands (a constant operand acts as an activation after it)."""
    (w1, w2, w3), a, b, pair, m, m_out, logits = forward(form, x)
    r = np.zeros_like(logits)
    r[np.arange(len(x)), target] = logits[np.arange(len(x)), target]
    r_m = m_out * ((r / stab(logits)) @ w3)
    if len(pair) == 1:  # an activation: relevance passes
        return x * ((r_m / stab(a)) @ w1)
    first = pair[0] == m
    r_first, r_second = r_m * first, r_m * ~first
    if form == "tie":  # both operands are functions of a: the Relu passes, both shares reach a
        return x * (((r_first + r_second) / stab(a)) @ w1)
    return x * ((r_first / stab(a)) @ w1) + x * ((r_second / stab(b)) @ w2)


def rlrp_reference(form, x, target):
    """R-LRP: Eq. 8 on the dense layers (``x * W^T z / fan-in``); at the join every operand attaining the extremum
    gets ``operand * z``; at the fork ``x`` each branch is rescaled to the relevance it got at the join (Eq. 13);
    the map is scaled to ``sum |R| = |logit|``."""
    (w1, w2, w3), a, b, pair, m, m_out, logits = forward(form, x)
    n = np.arange(len(x))
    z = np.zeros_like(logits)
    z[n, target] = logits[n, target]
    z_m = m_out * (z @ w3) / 6
    shares = [operand * (operand == m) * z_m for operand in pair]
    if len(pair) == 1:  # an activation: relevance passes, no join
        total = x * (z_m @ w1) / 5
    elif form == "tie":  # both branches start at a (the fork), each the join's own share there: Eq. 13's factor is 1
        total = x * ((shares[0] + shares[1]) @ w1) / 5
    else:
        branches = [x * ((s @ w) / 5) for s, w in zip(shares, (w1, w2), strict=True)]
        total = sum(c * (s.sum(1) / c.sum(1))[:, None] for c, s in zip(branches, shares, strict=True))
    return total * (np.abs(logits[n, target]) / np.abs(total).sum(1))[:, None]


FORMS = ["max", "min", "max_const", "tie", "relu", "min_const"]


def sample(n=6, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 5)).astype(np.float32)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rule", ["epsilon", "rlrp"])
def test_against_float64_reference(form, rule):
    model = join_model(form)
    x = sample()
    out = zm.run_compiled(onnxlrp.compile(model, rule), {"x": x})
    np.testing.assert_array_equal(out["logits"], zm.run_source(model, {"x": x}, ["logits"])[0])
    target = out["explained_class"]
    reference = (epsilon_reference if rule == "epsilon" else rlrp_reference)(form, x.astype(np.float64), target)
    relevance = out["relevance"]
    assert np.isfinite(relevance).all()
    np.testing.assert_allclose(relevance, reference, rtol=0, atol=2e-5 * np.abs(reference).max())


@pytest.mark.parametrize("form", ["max", "min", "tie"])
def test_winner_take_all_conserves(form):
    """Bias-free and epsilon -> 0: exactly one operand takes each position's relevance, so ``sum R = logit``."""
    model = join_model(form)
    x = sample()
    out = zm.run_compiled(onnxlrp.compile(model, "epsilon", epsilon=1e-9), {"x": x})
    logits = out["logits"][np.arange(len(x)), out["explained_class"]]
    np.testing.assert_allclose(out["relevance"].sum(1), logits, rtol=1e-4)


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_ties_go_to_the_first_operand_classic_and_to_all_in_rlrp(op):
    """``op(W x1, W x2)`` fed ``x1 == x2`` ties everywhere: winner-take-all gives everything to ``x1`` (the first
    operand), R-LRP splits it evenly (every winner, each normalized at its own input)."""
    w1, _, w3 = weights()
    nodes = [h.make_node("Gemm", ["x1", "W1"], ["a"], transB=1), h.make_node("Gemm", ["x2", "W1"], ["b"], transB=1),
             h.make_node(op, ["a", "b"], ["m"], name="the_join"),
             h.make_node("Gemm", ["m", "W3"], ["logits"], transB=1)]
    graph = h.make_graph(nodes, "tie", [h.make_tensor_value_info(n, T.FLOAT, ["N", 5]) for n in ("x1", "x2")],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", 4])],
                         initializer=[nh.from_array(w1, "W1"), nh.from_array(w3, "W3")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    x = sample()
    out = zm.run_compiled(onnxlrp.compile(model, "epsilon"), {"x1": x, "x2": x})
    assert (out["relevance.x2"] == 0).all() and np.abs(out["relevance.x1"]).sum() > 0
    out = zm.run_compiled(onnxlrp.compile(model, "rlrp"), {"x1": x, "x2": x})
    np.testing.assert_allclose(out["relevance.x1"], out["relevance.x2"], rtol=1e-6)
    assert np.abs(out["relevance.x1"]).sum() > 0


def test_composite_selects_the_rule(tmp_path):
    """A TOML entry for ``op = "Max"`` gives it winner-take-all; ``norm`` is no rule for this kind (the entry does
    not apply, the default stays)."""
    toml = tmp_path / "max.toml"
    toml.write_text('[[layer]]\nop = "Max"\nrule = "norm"\n[[layer]]\nop = "Max"\nrule = "winner-take-all"\n'
                    '[[layer]]\nrule = "epsilon"\n')
    plan = onnxlrp.inspect(join_model("max"), composite=toml)
    assert plan.rules["the_join"] == "winner-take-all"


# ---------------------------------------------------------------- torch.maximum, both exporters


def maxout_module():
    """Two dense branches joined by ``torch.maximum``, then a clamp (``Max`` with a constant) and a dense head."""
    torch = pytest.importorskip("torch")

    class Maxout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(5, 6), torch.nn.Linear(5, 6)
            self.out = torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.out(torch.clamp(torch.maximum(self.a(x), self.b(x)), min=-0.5))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Maxout().eval()


def test_torch_maximum_both_exporters():
    torch = pytest.importorskip("torch")
    import torch_models as tm

    module = maxout_module()
    x = sample()
    for exporter, opset in (("torchscript", 17), ("dynamo", 18)):
        proto = tm.export(module, torch.from_numpy(x), exporter=exporter, opset=opset)
        assert "Max" in tm.op_types(proto), tm.op_types(proto)
        reference = tm.run_source(proto, x)
        for rule in ("epsilon", "rlrp", "epsilon-plus-flat"):
            out = tm.run_compiled(onnxlrp.compile(proto, rule), x)
            np.testing.assert_allclose(out[tm.OUTPUT_NAME], reference, rtol=1e-6, atol=1e-7)
            assert np.isfinite(out["relevance"]).all() and np.abs(out["relevance"]).sum() > 0
