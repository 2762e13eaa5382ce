"""The graph reference (tests/graph_reference.py) checked where an independent answer exists, before the exported
models are compared with it (tests/test_zoo.py, test_torch_matrix.py, test_sklearn_keras.py):

* on netspec nets in their ONNX form it equals tests/reference.py (every rule, composites, R-LRP);
* LRP-0 equals gradient x input (central differences) on a bias-free ReLU graph with ops netspec lacks (Sum,
  BatchNorm, Mul by a constant, Transpose, Concat of a pool and a convolution, padded average pooling);
* on PyTorch exports it equals Zennit (classic rules);
* its float64 forward equals onnxruntime's on the zoo files (LRN and the opset-7 BatchNormalization included);
* each looser tolerance of ``helpers.ILL_CONDITIONED`` is the size of the case's float32 conditioning.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util

import netspec as ns
import numpy as np
import pytest
import reference as ref
import zoo_models as zm
from graph_reference import GraphReference
from helpers import ILL_CONDITIONED, assert_close_relative, cosine_per_sample
from netspec import Concat, GlobalAvgPool, Relu, Residual, Sum
from spec_zoo import ZOO

# our rule name -> (our parameters, tests/reference.py's rule and parameters)
RULES = {
    "lrp0": ({}, "lrp0", {}),
    "epsilon": ({"epsilon": 0.01}, "epsilon", {"eps": 0.01}),
    "gamma": ({"gamma": 0.5}, "gamma", {"gamma": 0.5}),
    "zplus": ({}, "zplus", {}),
    "alpha-beta": ({"alpha": 2.0, "beta": 1.0}, "alphabeta", {"alpha": 2.0, "beta": 1.0}),
    "flat": ({}, "flat", {}),
    "wsquare": ({}, "wsquare", {}),
    "zbox": ({"low": -3.0, "high": 3.0}, "zbox", {"low": -3.0, "high": 3.0}),
}


def float32_values(layers):
    """A copy of a netspec net with every array rounded to float32: the values its ONNX form holds."""
    out = []
    for layer in layers:
        if isinstance(layer, Residual):
            out.append(Residual(float32_values(layer.branch), float32_values(layer.shortcut)))
        elif isinstance(layer, (Concat, Sum)):
            out.append(type(layer)([float32_values(b) for b in layer.branches]))
        else:
            layer = copy.copy(layer)
            for f in dataclasses.fields(layer):
                value = getattr(layer, f.name)
                if isinstance(value, np.ndarray):
                    setattr(layer, f.name, value.astype(np.float32).astype(np.float64))
            out.append(layer)
    return out


def net(name: str, seed: int = 32):
    rng = np.random.default_rng(seed)
    layers, shape = (inverted_residuals if name == "inverted_residuals" else ZOO[name])(rng)
    layers = float32_values(layers)
    x = rng.normal(size=shape).astype(np.float32).astype(np.float64)
    return layers, x, GraphReference(ns.to_onnx(layers, shape), "y", "x")


@pytest.mark.parametrize("name", list(ZOO))
def test_equals_the_netspec_reference(name):
    """Every rule and R-LRP on the ONNX form of each netspec net, against tests/reference.py (both float64, same
    weights and input)."""
    layers, x, graph = net(name)
    for rule, (params, ref_rule, ref_params) in RULES.items():
        expected = ref.lrp(layers, x, ref_rule, **ref_params)
        if rule == "lrp0" and not np.isfinite(expected).all():  # 0/0 where a bias-free window sees zeros: 0
            expected = ref.lrp(layers, x, "epsilon", eps=1e-30)
        assert_close_relative(graph.relevance(x, rule, **params), expected, 1e-9)
    # R-LRP: tests/reference.py divides exactly at the forks, the graph reference by README's stabilized sum
    # (s + 1e-6 sign(s) sum|c|): they differ by 1e-6 sum|c| / |sum c| ("global": 1e-5)
    assert_close_relative(graph.relevance(x, "rlrp"), ref.rlrp(layers, x), 1e-4)


def inverted_residuals(rng):
    """MobileNetV2's pattern: a residual block whose join feeds two more blocks without one."""
    def block(cin, cout, stride, residual):
        hidden = 2 * cin
        body = [ns.conv(rng, cin, hidden, 1, bias=False), ns.batchnorm(rng, hidden), Relu(),
                ns.conv(rng, hidden, hidden, 3, stride=stride, pad=1, groups=hidden, bias=False),
                ns.batchnorm(rng, hidden), Relu(), ns.conv(rng, hidden, cout, 1, bias=False), ns.batchnorm(rng, cout)]
        return [Residual(body, [])] if residual else body
    return [ns.conv(rng, 3, 8, 3, stride=2, pad=1), Relu(), *block(8, 8, 1, True), *block(8, 12, 2, False),
            *block(12, 12, 1, False), ns.conv(rng, 12, 16, 1), Relu(), GlobalAvgPool(), ns.Flatten(),
            ns.dense(rng, 16, 10)], (2, 3, 16, 16)


def test_rlrp_is_scale_free_at_tiny_contributions():
    """R-LRP's unscaled contributions in this net are near 1e-30 at the fork and below 1e-24 at the input: Eq. 13's
    stabilizer must be relative there (README's absolute 1e-30 floor suits the compiled graph's range-kept values
    only; with it the graph reference's cosine here is 0.02 and 0.46)."""
    layers, x, graph = net("inverted_residuals")
    assert np.abs(ref.rlrp(layers, x, normalize=False)).max() < 1e-24
    assert_close_relative(graph.relevance(x, "rlrp"), ref.rlrp(layers, x), 1e-4)


COMPOSITES = {  # rules per linear layer of the "cnn" net (4 convolutions, then a dense layer)
    "epsilon-plus-flat": ["flat"] + ["zplus"] * 3 + ["epsilon"],
    "epsilon-gamma-box": [("zbox", {"low": 0.0, "high": 1.0})] + ["gamma"] * 3 + ["epsilon"],
    "epsilon-alpha2-beta1": ["alphabeta"] * 4 + ["epsilon"],
    "cmp": ["flat"] + ["alphabeta"] * 3 + ["epsilon"],
}


@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_composites_follow_the_readme_selectors(composite):
    layers, x, graph = net("cnn")
    assert_close_relative(graph.relevance(x, composite), ref.lrp(layers, x, COMPOSITES[composite]), 1e-9)


def test_flat_layers_and_first_layers_of_a_residual_net():
    """``flat_layers`` counts the linear layers on the longest path from the input: in "residual" the second block's
    convolutions and projection have depth 4 and 5 (through the first block's convolutions, not its identity
    shortcut)."""
    layers, x, graph = net("cnn")
    expected = ref.lrp(layers, x, ["flat"] * 3 + ["alphabeta", "epsilon"])
    assert_close_relative(graph.relevance(x, "cmp", flat_layers=3), expected, 1e-9)
    _, x, graph = net("residual")
    graph.relevance(x, "epsilon")
    depths = sorted(graph.depth.values())
    assert depths == [1, 2, 3, 4, 4, 5, 6]
    plan = graph.plan("cmp", flat_layers=3)
    assert sorted(rule for rule, _ in plan.values()) == ["alpha-beta"] * 3 + ["epsilon"] + ["flat"] * 3


def bias_free_graph() -> zm.ZooModel:
    """A bias-free ReLU classifier with the ops netspec does not write: BatchNormalization (zero mean and shift),
    an n-ary Sum join, a Transpose pair, max pooling, a Concat of a convolution and a padded average pool
    (count_include_pad=0), BatchNorm written as Mul/Add, GlobalAveragePool and Gemm."""
    g = zm.OldGraph("bias_free", opset=11, ir_version=6, seed=3, bias=False)
    h = g.relu(g.batchnorm(g.conv("x", 3, 6, 3, pad=1), 6))
    branch = g.conv(g.relu(g.conv(h, 6, 6, 3, pad=1)), 6, 6, 1)
    h = g.relu(g.node("Sum", [branch, h, g.conv(h, 6, 6, 1)], "sum"))
    h = g.node("Transpose", [g.relu(g.node("Transpose", [h], "nhwc", perm=[0, 2, 3, 1]))], "nchw", perm=[0, 3, 1, 2])
    h = g.maxpool(h, 3, 2, pad=1)  # 8 -> 4
    h = g.node("Concat", [g.relu(g.conv(h, 6, 4, 1)), g.avgpool(h, 3, 1, pad=1, count_include_pad=0)], "cat", axis=1)
    h = g.flatten(g.node("GlobalAveragePool", [g.relu(g.affine_bn(h, 10))], "gap"))
    g.logits = g.gemm(h, 10, 5)
    return zm.ZooModel("bias_free", g.build("x", ["N", 3, 8, 8], g.logits, ["N", 5]), "x", (1, 3, 8, 8),
                       g.logits, g.logits)


def test_lrp0_is_gradient_times_input():
    """On a bias-free ReLU network LRP-0 (with the joins' and pools' Norm rule) is gradient x input; the gradient by
    central differences of the float64 forward pass, all 2 x 192 perturbed inputs in one batch."""
    z = bias_free_graph()
    graph = GraphReference(z.model, z.logits, "x")
    x = z.sample(5).astype(np.float64)
    relevance = graph.relevance(x, "lrp0")
    target = int(graph.forward(x)[z.logits].argmax())
    step = 1e-6
    bumps = np.eye(x.size).reshape(-1, *x.shape[1:]) * step
    logits = graph.evaluator.run(None, {"x": np.concatenate([x + bumps, x - bumps])})[0][:, target]
    gradient = ((logits[:x.size] - logits[x.size:]) / (2 * step)).reshape(x.shape)
    assert np.abs(relevance).max() > 0
    assert_close_relative(relevance, x * gradient, 1e-5)


@pytest.mark.parametrize("name", list(zm.ZOO))
def test_float64_forward_matches_onnxruntime(name):
    """The float64 forward (ReferenceEvaluator with the spec's LRN and inference BatchNormalization) against
    onnxruntime on the zoo files: the logits agree to float32 rounding."""
    z = zm.ZOO[name]()
    x = z.sample()
    logits = GraphReference(z.model, z.logits, z.input_name).forward(x)[z.logits]
    (expected,) = zm.run_source(z.model, {z.input_name: x}, [z.logits])
    assert_close_relative(logits, expected, 1e-5)


HAVE_ZENNIT = importlib.util.find_spec("zennit") is not None and importlib.util.find_spec("torch") is not None


@functools.cache
def torch_reference(arch: str):
    import torch_models as tm

    return GraphReference(tm.exported(arch, "ts17"), tm.OUTPUT_NAME, tm.INPUT_NAME)


@pytest.mark.skipif(not HAVE_ZENNIT, reason="needs torch and zennit")
@pytest.mark.parametrize("rule", ["epsilon-gamma-box", "cmp"])
@pytest.mark.parametrize("arch", ["vgg_avgpool", "resnet_bottleneck", "inception", "mobilenetv2", "squeezenet"])
def test_equals_zennit_on_torch_exports(arch, rule):
    """Zennit (float64, on the model with BatchNorm merged and residual Adds as its Sum layer) against the graph
    reference on the TorchScript export: two independent implementations, both float64 (measured <= 3e-6; the
    exporter and torch fold BatchNorm into float32 weights separately)."""
    import torch_models as tm

    tm.import_zennit()
    x = tm.sample_input(arch)
    graph = torch_reference(arch)
    target = graph.forward(x)[tm.OUTPUT_NAME].argmax(1)
    _, expected = tm.zennit_relevance(arch, rule, x, target)
    assert tm.rel_l2(graph.relevance(x, rule, target=target), expected) < 1e-5


@pytest.mark.parametrize("model, rule, tolerance", [pytest.param(*key, tol, id="-".join(key))
                                                     for key, tol in ILL_CONDITIONED.items()])
def test_looser_tolerances_are_float32_conditioning(model, rule, tolerance):
    """Each looser tolerance is at most 10 times what float32 rounding of the forward values alone moves the float64
    reference by, so it admits float32 arithmetic and nothing more."""
    kind, name = model.split(":")
    if kind == "zoo":
        z = zm.ZOO[name]()
        args, x = (z.model, z.logits, z.input_name), z.sample()
    else:
        tm = pytest.importorskip("torch_models")
        args, x = (tm.exported(name, "ts17"), tm.OUTPUT_NAME, tm.INPUT_NAME), tm.sample_input(name)
    exact = GraphReference(*args).relevance(x, rule)
    rounded = GraphReference(*args, float32_forward=True).relevance(x, rule)
    moved = np.abs(rounded - exact).max() / np.abs(exact).max()
    assert moved >= tolerance / 10, f"float32 forward moves the reference by {moved:.2e} only"
    assert cosine_per_sample(rounded, exact).min() > 0.999
