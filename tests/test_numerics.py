"""No NaN or Inf, whatever the scale: every rule and family against the float64 references (and Zennit).

The relevance of a model whose forward pass is finite must be finite, for weights scaled by 1e4 or 1e-4 per layer,
inputs at 1e4 or 1e-4, residual joins that cancel to 2^-10 of their terms (as Xception's do), and Caffe-era graphs
with 0-255 inputs and activations in the millions. Where the float64 reference lies within float32's range the
classic rules must equal it to 1e-5 of its peak, and R-LRP must have a cosine of at least 0.9999 with it; where it
does not, the classic map is the reference capped at +-3.4e38 (``onnxlrp.ranges``).
"""

import importlib.util

import netspec as ns
import numpy as np
import pytest
import reference as ref
import zoo_models as zm
from helpers import assert_close_relative, compiled_from_spec, cosine_per_sample, explain
from netspec import Flatten, GlobalAvgPool, Relu, Residual
from onnxlrp.passes.families import PlanNode

import onnxlrp
from onnxlrp.composites import get_composite

FLOAT_MAX = float(np.finfo(np.float32).max)
SMALLEST_COMPARED = 1e-30  # a reference peak below this is as good as zero in float32
DELTA = 2.0 ** -10  # the cancellation of the ladder's joins

# one of every rule and composite (R-LRP, the linear rules, the named composites)
RULES = ("rlrp", "lrp0", "epsilon", "gamma", "zplus", "alpha-beta", "flat", "wsquare", "zbox", "epsilon-plus",
         "epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1", "epsilon-alpha2-beta1-flat", "cmp")


# ---------------------------------------------------------------- the float64 reference of any rule or composite

def reference_rules(rule: str, layers) -> list:
    """The reference's per-layer rule list for onnxlrp's plan of ``rule`` on ``layers`` (the first linear layer in
    spec order is the only first layer of the nets here)."""
    linear = list(ns.iter_linear(layers))
    nodes = [PlanNode(f"n{i}", "Conv" if isinstance(layer, ns.Conv) else "Gemm", "linear", i, 1 if i == 0 else 2)
             for i, layer in enumerate(linear)]
    plan = get_composite(rule).plan(nodes, {})
    out = []
    for node in nodes:
        r = plan[node.name]
        eps = {"eps": r.stabilizer} if hasattr(r, "stabilizer") else {}
        out.append({
            "lrp0": ("lrp0", {}),
            "epsilon": ("epsilon", {"eps": getattr(r, "epsilon", 0.0)}),
            "gamma": ("gamma", {"gamma": getattr(r, "gamma", 0.0), **eps}),
            "zplus": ("zplus", eps),
            "alpha-beta": ("alphabeta", {"alpha": getattr(r, "alpha", 0.0), "beta": getattr(r, "beta", 0.0), **eps}),
            "flat": ("flat", eps),
            "wsquare": ("wsquare", eps),
            "zbox": ("zbox", {"low": getattr(r, "low", 0.0), "high": getattr(r, "high", 0.0), **eps}),
        }[r.name])
    return out


def reference(rule: str, layers, x):
    if rule == "rlrp":
        return ref.rlrp(layers, x)
    with np.errstate(all="ignore"):
        expected = ref.lrp(layers, x, reference_rules(rule, layers))
        if rule == "lrp0" and not np.isfinite(expected).all():  # 0/0 where a bias-free window is all zero: 0
            expected = ref.lrp(layers, x, "epsilon", eps=1e-300)
    return expected


def perturbed(layers, rng):
    """``layers`` with every weight and bias moved by a random relative 6e-8 (float32's resolution)."""
    def jitter(a):
        return None if a is None else a * (1 + 6e-8 * rng.normal(size=np.shape(a)))

    out = []
    for layer in layers:
        if isinstance(layer, ns.Dense):
            layer = ns.Dense(jitter(layer.W), jitter(layer.b))
        elif isinstance(layer, ns.Conv):
            layer = ns.Conv(jitter(layer.W), jitter(layer.b), layer.strides, layer.pads, layer.dilations,
                            layer.groups)
        elif isinstance(layer, Residual):
            layer = Residual(perturbed(layer.branch, rng), perturbed(layer.shortcut, rng))
        out.append(layer)
    return out


def sensitivity(rule: str, layers, x, expected) -> float:
    """How far the float64 reference moves, relative to its peak, when the weights and the input are rounded to
    float32's resolution (three random relative perturbations of 6e-8): in a case that moves more than the
    tolerance (an ill-conditioned one), no float32 computation can be expected to come closer than that."""
    moves = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        moves.append(np.abs(reference(rule, perturbed(layers, rng), x * (1 + 6e-8 * rng.normal(size=x.shape)))
                            - expected).max())
    return max(moves) / np.abs(expected).max()


def check(rule: str, layers, x, tol: float = 1e-5):
    """The compiled relevance is finite and matches the float64 reference (to ``tol`` of its peak, or to three times
    the reference's own sensitivity to float32 rounding where that is larger); returns (relevance, reference)."""
    with np.errstate(all="ignore"):
        logits = ref.forward(layers, x)
    assert np.isfinite(logits).all() and np.abs(logits).max() < FLOAT_MAX, "the test model's forward overflows"
    relevance, _ = compiled_from_spec(layers, x.shape, rule, x)
    assert np.isfinite(relevance).all(), f"non-finite relevance ({rule})"
    relevance = relevance.astype(np.float64)  # products of entries near 1e38 overflow float32
    expected = reference(rule, layers, x)
    peak = np.abs(expected).max()
    if rule == "rlrp":
        alive = np.abs(expected).reshape(len(x), -1).max(1) > 0
        assert np.count_nonzero(relevance.reshape(len(x), -1)[alive], axis=1).min() > 0, "R-LRP map underflowed"
        cosine = cosine_per_sample(relevance[alive], expected[alive])
        assert cosine.min() >= 0.9999, cosine
    elif peak > FLOAT_MAX:  # capped at float32's largest value
        assert_close_relative(relevance, np.clip(expected, -FLOAT_MAX, FLOAT_MAX), tol)
    elif peak >= SMALLEST_COMPARED:
        if np.abs(relevance - expected).max() > tol * peak:
            tol = max(tol, 3 * sensitivity(rule, layers, x, expected))
        assert_close_relative(relevance, expected, tol)
    else:  # below float32's normal range (e.g. every relevance absorbed by a stabilizer): as good as zero
        assert np.abs(relevance - expected).max() <= SMALLEST_COMPARED
    return relevance, expected


# ---------------------------------------------------------------- weights scaled per layer

def scaled(layers, scale: float, x_scale: float):
    """``layers`` with every weight times ``scale``; each bias is scaled like the layer's pre-activation (the input's
    scale times ``scale`` per linear layer before it), so that the network only changes its units."""
    out, level = [], x_scale
    for layer in layers:
        if isinstance(layer, (ns.Dense, ns.Conv)):
            level *= scale
            kwargs = {"W": layer.W * scale, "b": None if layer.b is None else layer.b * level}
            out.append(ns.Dense(**kwargs) if isinstance(layer, ns.Dense) else
                       ns.Conv(**kwargs, strides=layer.strides, pads=layer.pads, dilations=layer.dilations,
                               groups=layer.groups))
        elif isinstance(layer, Residual):
            branch, shortcut = scaled(layer.branch, scale, level), scaled(layer.shortcut, scale, level)
            out.append(Residual(branch, shortcut))
            level *= scale ** sum(isinstance(x, (ns.Dense, ns.Conv)) for x in layer.branch)
        else:
            out.append(layer)
    return out


def deep_mlp(rng):
    """8 dense layers: 1e4 per layer on inputs at 1e4 reach 1e36, 1e-4 on 1e-4 reach 1e-36."""
    layers = [Flatten()]
    for _ in range(7):
        layers += [ns.dense(rng, 12, 12), Relu()]
    return layers + [ns.dense(rng, 12, 4)], (2, 12)


def deep_cnn(rng):
    layers, cin = [], 2
    for cout in (4, 6, 6, 8, 8, 8):
        layers += [ns.conv(rng, cin, cout, 3, pad=1), Relu()]
        cin = cout
    return layers + [Flatten(), ns.dense(rng, 8 * 5 * 5, 4)], (2, 2, 5, 5)


def resnet_like(rng):
    """A stem, three residual blocks of two convolutions (six joins' worth of depth) and a dense head: 8 linear
    layers on the longest path."""
    layers = [ns.conv(rng, 2, 4, 3, pad=1), Relu()]
    for _ in range(3):
        layers += [Residual([ns.conv(rng, 4, 4, 3, pad=1), Relu(), ns.conv(rng, 4, 4, 3, pad=1)], []), Relu()]
    return layers + [GlobalAvgPool(), Flatten(), ns.dense(rng, 4, 4)], (2, 2, 5, 5)


NETS = {"mlp": deep_mlp, "cnn": deep_cnn, "resnet": resnet_like}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("x_scale", [1e4, 1e-4])
@pytest.mark.parametrize("scale", [1e4, 1e-4])
@pytest.mark.parametrize("net", list(NETS))
def test_weights_scaled_per_layer(net, scale, x_scale, rule):
    rng = np.random.default_rng(60)
    layers, shape = NETS[net](rng)
    x = x_scale * np.abs(rng.normal(size=shape))
    check(rule, scaled(layers, scale, x_scale), x)


@pytest.mark.parametrize("rule", ["rlrp", "epsilon", "lrp0", "alpha-beta", "flat"])
@pytest.mark.parametrize("x_scale", [1e4, 1e-4])
def test_forty_layers_alternating_1e4_and_1e_minus_4(x_scale, rule):
    """40 dense layers whose weights alternate between 1e4 and 1e-4 times He-scaled: every other layer multiplies
    R-LRP's relevance by about 1e4 times an activation of 1e4."""
    rng = np.random.default_rng(61)
    layers, level = [Flatten()], x_scale
    for i in range(40):
        layer = ns.dense(rng, 8, 8)
        factor = 1e4 if i % 2 == 0 else 1e-4
        level *= factor
        layers += [ns.Dense(layer.W * factor, layer.b * level), Relu()]
    layers.append(ns.dense(rng, 8, 3, bias=False))
    check(rule, layers, x_scale * np.abs(rng.normal(size=(2, 8))))


# ---------------------------------------------------------------- joins that cancel (Xception)

def conv1x1(w):
    w = np.asarray(w, dtype=np.float64)
    return ns.Conv(w.reshape(*w.shape, 1, 1), None)


def cancelling_ladder(rng, blocks: int, channels: int = 2):
    """Residual joins ``a = y + b`` that cancel to 2^-10 of their terms, in exact float32 arithmetic.

    The input holds the data twice (channels ``[u, u]``); one convolution per copy, with the same dyadic kernel,
    gives ``y_A == y_B``. Each block's branch adds ``-(1 - 2^-10) relu(y_A)`` to ``y_B``, so its join gives
    ``a_B = 2^-10 y_B``, and a 1x1 convolution restores ``y_B = 2^10 a_B``. Zennit's Norm rule hands the two terms of
    the join ``y_B R / a_B`` and ``-(1 - 2^-10) y_A R / a_B``; they return to different input channels, so the peak
    of the map grows by 2^10 per block while its sum stays the logit (as in Xception, where each join multiplies
    the relevance by about 1e3). Every value of the forward pass is a dyadic number with few bits, so float32 and
    float64 compute the same forward pass and the comparison measures the relevance alone."""
    kernel = rng.integers(1, 4, size=(channels, 1, 3, 3)) / 4
    first = np.zeros((2 * channels, 2, 3, 3))
    first[:channels, 0], first[channels:, 1] = kernel[:, 0], kernel[:, 0]
    eye, zero = np.eye(channels), np.zeros((channels, channels))
    layers = [ns.Conv(first, None, pads=(1, 1, 1, 1)), Relu()]
    for _ in range(blocks):
        layers += [Residual([Relu(), conv1x1(np.block([[zero, zero], [-(1 - DELTA) * eye, zero]]))], []),
                   conv1x1(np.block([[eye, zero], [zero, eye / DELTA]]))]
    head = rng.integers(-4, 5, size=(3, 2 * channels)) / 4
    return layers + [GlobalAvgPool(), Flatten(), ns.Dense(head, None)]


def ladder_input(rng):
    u = rng.integers(0, 8, size=(2, 1, 5, 5)) / 8
    return np.concatenate([u, u], axis=1)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("blocks", [4, 12, 14])
def test_cancelling_joins(blocks, rule):
    """4 blocks: a peak of 1e10 (epsilon); 12: 1e35; 14: 1e41, beyond float32, capped at +-3.4e38 (where Zennit's
    float32 map is NaN, see below)."""
    rng = np.random.default_rng(62)
    layers = cancelling_ladder(rng, blocks)
    # flat ignores the weights and hands both terms of each join, 2^10 times the join's relevance, to the same
    # inputs, where they cancel: float32's rounding of those terms stays in the map (1.5e-5 of its peak per join)
    check(rule, layers, ladder_input(rng), tol=2e-5 * blocks if rule == "flat" else 1e-5)


def test_cancelling_joins_grow_as_xception_does():
    """The ladder does what the issue saw in Xception: the epsilon map's peak grows by about 1e3 (2^10) per join,
    and the compiled graph follows it exactly to 1e38 and caps it beyond."""
    rng = np.random.default_rng(62)
    x = ladder_input(rng)
    peaks = []
    for blocks in (4, 8, 12, 13, 14):
        relevance, expected = check("epsilon", cancelling_ladder(np.random.default_rng(62), blocks), x)
        peaks.append((np.abs(expected).max(), np.abs(relevance).max()))
    growth = [(peaks[i + 1][0] / peaks[i][0]) ** 0.25 for i in (0, 1)]  # per block, 4 -> 8 -> 12 blocks
    assert all(5e2 < g < 5e3 for g in growth), growth
    assert peaks[-1][0] > 1e40 and peaks[-1][1] == np.float32(FLOAT_MAX)


# ---------------------------------------------------------------- Zennit, where its float32 result is finite

HAVE_ZENNIT = importlib.util.find_spec("zennit") is not None and importlib.util.find_spec("torch") is not None


def torch_module(layers):
    """The netspec layers as a float32 torch module with Zennit's join pattern (``stack`` + ``Sum``)."""
    import torch
    import torch_models as tm
    from torch import nn

    class Join(nn.Module):
        def __init__(self, branch, shortcut):
            super().__init__()
            self.branch, self.shortcut, self.sum = branch, shortcut, tm.import_zennit().layer.Sum(dim=-1)

        def forward(self, x):
            return self.sum(torch.stack([self.branch(x), self.shortcut(x)], dim=-1))

    def build(spec):
        modules = []
        for layer in spec:
            if isinstance(layer, ns.Dense):
                m = nn.Linear(layer.W.shape[1], layer.W.shape[0], bias=layer.b is not None)
                m.weight.data = torch.tensor(layer.W, dtype=torch.float32)
            elif isinstance(layer, ns.Conv):
                m = nn.Conv2d(layer.W.shape[1], layer.W.shape[0], layer.W.shape[2:], padding=layer.pads[:2],
                              bias=layer.b is not None)
                m.weight.data = torch.tensor(layer.W, dtype=torch.float32)
            elif isinstance(layer, Relu):
                m = nn.ReLU()
            elif isinstance(layer, Flatten):
                m = nn.Flatten()
            elif isinstance(layer, GlobalAvgPool):
                m = nn.AdaptiveAvgPool2d(1)
            else:
                m = Join(build(layer.branch), build(layer.shortcut))
            if isinstance(layer, (ns.Dense, ns.Conv)) and layer.b is not None:
                m.bias.data = torch.tensor(layer.b, dtype=torch.float32)
            modules.append(m)
        return nn.Sequential(*modules)

    return build(layers).eval()


def zennit_float32(layers, rule: str, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    import torch
    import torch_models as tm

    tm.import_zennit()
    from zennit.attribution import Gradient

    module = torch_module(layers)
    t = torch.as_tensor(target)
    with Gradient(model=module, composite=tm.zennit_composite(rule)) as attributor:
        _, relevance = attributor(torch.tensor(x, dtype=torch.float32),
                                  lambda y: torch.nn.functional.one_hot(t, y.shape[1]).to(y) * y)
    return relevance.detach().numpy()


def relative_l2(ours: np.ndarray, theirs: np.ndarray) -> float:
    """The largest per-sample ``||ours - theirs|| / ||theirs||``, in float64 (the maps reach 1e38)."""
    a, b = (np.asarray(m, dtype=np.float64).reshape(len(m), -1) for m in (ours, theirs))
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


@pytest.mark.skipif(not HAVE_ZENNIT, reason="needs torch and zennit")
@pytest.mark.parametrize("rule", ["epsilon", "lrp0", "zplus", "alpha-beta", "epsilon-plus-flat"])
def test_cancelling_joins_against_zennit_float32(rule):
    """Where Zennit's float32 map is finite the compiled map equals it (relative L2 below 1e-3); at 14 blocks (a
    peak of 1e41) Zennit's epsilon map overflows (NaN or Inf) and the compiled one stays finite."""
    rng = np.random.default_rng(62)
    x = ladder_input(rng)
    overflowed = []
    for blocks in (4, 8, 11, 13, 14):
        layers = cancelling_ladder(np.random.default_rng(62), blocks)
        model = ns.to_onnx(layers, x.shape)
        _, relevance, cls = explain(model, x, rule)
        assert np.isfinite(relevance).all()
        theirs = zennit_float32(layers, rule, x, cls)
        if np.isfinite(theirs).all():
            assert relative_l2(relevance, theirs) < 1e-3
        else:
            overflowed.append(blocks)
    assert rule != "epsilon" or overflowed == [14], overflowed


@pytest.mark.skipif(not HAVE_ZENNIT, reason="needs torch and zennit")
@pytest.mark.parametrize("rule", ["epsilon", "epsilon-plus-flat", "cmp"])
@pytest.mark.parametrize("scale", [1e4, 1e-4])
def test_scaled_weights_against_zennit_float32(scale, rule):
    rng = np.random.default_rng(60)
    layers, shape = resnet_like(rng)
    x = 1e-4 * np.abs(rng.normal(size=shape))
    layers = scaled(layers, scale, 1e-4)
    _, relevance, cls = explain(ns.to_onnx(layers, shape), x, rule)
    assert np.isfinite(relevance).all()
    theirs = zennit_float32(layers, rule, x, cls)
    if np.isfinite(theirs).all() and np.abs(theirs).max() > SMALLEST_COMPARED:
        assert relative_l2(relevance, theirs) < 1e-3


# ---------------------------------------------------------------- Caffe-era graphs at their real scale

ZOO_GAIN = 12.0  # per layer, on 0-255 inputs: AlexNet's first dense layer sees activations of about 1e7


@pytest.mark.parametrize("rule", zm.RULES)
@pytest.mark.parametrize("name", list(zm.ZOO))
def test_caffe_era_graphs_at_full_scale(name, rule):
    """The zoo stand-ins with 0-255 inputs and weights 12x He-scaled (activations of millions, logits up to 1e23):
    finite, non-zero, and R-LRP conserves ``sum |R| = |logit|``."""
    z = zm.ZOO[name](gain=ZOO_GAIN)
    x = (255 * z.sample()).astype(np.float32)
    logits = zm.run_source(z.model, {z.input_name: x}, [z.logits])[0].reshape(len(x), -1)
    out = zm.run_compiled(onnxlrp.compile(z.model, rule), {z.input_name: x})
    r = out["relevance"]
    assert np.isfinite(logits).all() and np.isfinite(r).all()
    assert (np.abs(r).reshape(len(x), -1).max(1) > 0).all(), "a sample got no relevance"
    if rule == "rlrp":
        explained = np.abs(logits[np.arange(len(x)), out["explained_class"]])
        np.testing.assert_allclose(np.abs(r).reshape(len(x), -1).sum(1), explained, rtol=1e-4)


@pytest.mark.parametrize("rule", ["rlrp", "lrp0"])
@pytest.mark.parametrize("name", ["vgg19", "squeezenet"])
def test_caffe_era_graphs_are_scale_free(name, rule):
    """Without biases, a chain of convolutions, ReLUs and pools (no LRN, no joins of branches of different depth)
    is positively homogeneous: weights times 12 per layer and inputs times 255 multiply the logits by one constant,
    and the R-LRP map and the (conserving, bias-free) LRP-0 map by the same constant. The compiled maps at both
    scales must agree to float32 precision, though one of them sees activations a million times larger."""
    maps = []
    for gain, x_scale in ((1.0, 1.0), (ZOO_GAIN, 255.0)):
        z = zm.ZOO[name](bias=False, gain=gain)
        x = (x_scale * z.sample()).astype(np.float32)
        out = zm.run_compiled(onnxlrp.compile(z.model, rule), {z.input_name: x})
        maps.append(out["relevance"].astype(np.float64))
    small, large = maps
    factor = np.abs(large).sum() / np.abs(small).sum()
    assert factor > 1e6
    assert_close_relative(large / factor, small, 1e-4)
