"""R-LRP (Nyiri & Gibaru): the compiled graph against the loop-form numpy reference of Eq. 6-14."""

import netspec as ns
import numpy as np
import pytest
import reference as ref
from helpers import compiled_from_spec, cosine_per_sample, explain, run_source
from netspec import Concat, Flatten, GlobalAvgPool, MaxPool, Relu, Residual
from spec_zoo import ZOO

MODELS = [m for m in ZOO if m != "maxpool_ceil_drop"]  # see spec_zoo: ONNX and onnxruntime disagree on its shape


def check_against_reference(layers, shape, x, target=None):
    relevance, cls = compiled_from_spec(layers, shape, "rlrp", x)
    expected = ref.rlrp(layers, x, target)
    assert np.all(np.isfinite(relevance))
    assert np.all(cosine_per_sample(relevance, expected) >= 0.9999), cosine_per_sample(relevance, expected)
    logits = ref.forward(layers, x).reshape(len(x), -1)
    explained = np.abs(logits[np.arange(len(x)), cls])
    np.testing.assert_allclose(np.abs(relevance).reshape(len(x), -1).sum(1), explained, rtol=1e-4)
    return relevance


@pytest.mark.parametrize("model", MODELS)
def test_rlrp_matches_reference(model):
    rng = np.random.default_rng(20)
    layers, shape = ZOO[model](rng)
    check_against_reference(layers, shape, rng.normal(size=shape))


def test_max_pool_ties_route_to_every_arg_max():
    """Inputs in {1, 2}: every 3x3 window holds at least 5 equal values (pigeonhole), so the first pool's maxima
    are tied and carry relevance (each tied input gets the full term)."""
    rng = np.random.default_rng(21)
    layers = [MaxPool((3, 3), (2, 2), (1, 1, 1, 1)), ns.conv(rng, 2, 3, 3, pad=1), Relu(),
              MaxPool((2, 2), (1, 1)), Flatten(), ns.dense(rng, 3 * 2 * 2, 3)]
    shape = (2, 2, 6, 6)
    x = rng.integers(1, 3, size=shape).astype(np.float64)
    check_against_reference(layers, shape, x)


def bottleneck(rng, cin, mid, cout, stride):
    branch = [ns.conv(rng, cin, mid, 1), ns.batchnorm(rng, mid), Relu(),
              ns.conv(rng, mid, mid, 3, stride=stride, pad=1), ns.batchnorm(rng, mid), Relu(),
              ns.conv(rng, mid, cout, 1), ns.batchnorm(rng, cout)]
    shortcut = [] if cin == cout and stride == 1 else [ns.conv(rng, cin, cout, 1, stride=stride, bias=False),
                                                        ns.batchnorm(rng, cout)]
    return Residual(branch, shortcut)


def test_bottleneck_blocks_consecutive_and_projected():
    rng = np.random.default_rng(22)
    layers = [ns.conv(rng, 2, 4, 3, pad=1), Relu(), bottleneck(rng, 4, 2, 6, 2), Relu(),
              bottleneck(rng, 6, 2, 6, 1), Relu(), bottleneck(rng, 6, 3, 6, 1), Relu(), GlobalAvgPool(), Flatten(),
              ns.dense(rng, 6, 3)]
    check_against_reference(layers, (2, 2, 8, 8), rng.normal(size=(2, 2, 8, 8)))


def test_densenet_like_concat_with_identity_branches():
    rng = np.random.default_rng(23)
    layers = [ns.conv(rng, 2, 3, 3, pad=1), Relu(),
              Concat([[], [ns.conv(rng, 3, 2, 3, pad=1), Relu()]]), Relu(),
              Concat([[], [ns.conv(rng, 5, 2, 1), Relu(), ns.conv(rng, 2, 2, 3, pad=1)]]), Relu(),
              Flatten(), ns.dense(rng, 7 * 4 * 4, 3)]
    check_against_reference(layers, (2, 2, 4, 4), rng.normal(size=(2, 2, 4, 4)))


def test_explicit_target_and_zero_input_stay_finite():
    rng = np.random.default_rng(24)
    layers, shape = ZOO["residual"](rng)
    x = rng.normal(size=shape)
    model = ns.to_onnx(layers, shape)
    _, relevance, cls = explain(model, x, "rlrp", target=[1, 2])
    expected = ref.rlrp(layers, x, np.array([1, 2]))
    assert list(cls) == [1, 2] and np.all(cosine_per_sample(relevance, expected) >= 0.9999)
    _, relevance, _ = explain(model, np.zeros(shape), "rlrp")
    assert np.all(np.isfinite(relevance))


def vgg16(rng):
    layers, cin = [], 3
    for width, depth in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(depth):
            layers += [ns.conv(rng, cin, width, 3, pad=1), Relu()]
            cin = width
        layers.append(MaxPool((2, 2), (2, 2)))
    return layers + [Flatten(), ns.dense(rng, 512 * 7 * 7, 4096), Relu(), ns.dense(rng, 4096, 4096), Relu(),
                     ns.dense(rng, 4096, 1000)]


def resnet50(rng):
    layers = [ns.conv(rng, 3, 64, 7, stride=2, pad=3), ns.batchnorm(rng, 64), Relu(),
              MaxPool((3, 3), (2, 2), (1, 1, 1, 1))]
    cin = 64
    for mid, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            layers += [bottleneck(rng, cin, mid, mid * 4, stride if i == 0 else 1), Relu()]
            cin = mid * 4
    return layers + [GlobalAvgPool(), Flatten(), ns.dense(rng, 2048, 1000)]


@pytest.mark.parametrize("build", [vgg16, resnet50])
def test_full_size_networks_give_finite_nonzero_relevance(build):
    """224x224 float32 with random (He-scaled) weights: the per-layer factors would underflow float32 without the
    per-sample range keeping; the map must be finite, non-zero, and scaled to sum |R| = |logit|."""
    rng = np.random.default_rng(25)
    layers = build(rng)
    shape = (1, 3, 224, 224)
    model = ns.to_onnx(layers, shape)
    x = rng.normal(size=shape)
    originals, relevance, cls = explain(model, x, "rlrp")
    np.testing.assert_allclose(originals[0], run_source(model, x)[0], rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(relevance)) and np.count_nonzero(relevance) > 0.5 * relevance.size
    np.testing.assert_allclose(np.abs(relevance).sum(), np.abs(originals[0][0, cls[0]]), rtol=1e-4)


def unbiased_dense(rng, width):
    return ns.Dense(rng.normal(0.0, np.sqrt(2 / width), size=(width, width)), None)


@pytest.mark.parametrize("scale", [1e4, 1e-4])
def test_range_keeping_in_deep_chains_and_residual_stacks(scale):
    """Without biases every activation scales with the input (here 1e4 or 1e-4), and each layer multiplies R-LRP's
    relevance by about that magnitude, so 40 dense layers would leave float32's range by 1e+-160 without rescaling.
    The compiled graph rescales every few layers and at every fork (Eq. 13); the map must still match the float64
    reference, which needs no rescaling."""
    rng = np.random.default_rng(26)
    chain = [layer for _ in range(40) for layer in (unbiased_dense(rng, 16), Relu())]
    check_against_reference([Flatten(), *chain, ns.dense(rng, 16, 3, bias=False)], (2, 16),
                            scale * rng.random((2, 16)))
    blocks = [layer for _ in range(12) for layer in (Residual([ns.conv(rng, 4, 4, 1, bias=False), Relu(),
                                                                ns.conv(rng, 4, 4, 3, pad=1, bias=False)], []), Relu())]
    layers = [*blocks, GlobalAvgPool(), Flatten(), ns.dense(rng, 4, 3, bias=False)]
    check_against_reference(layers, (2, 4, 5, 5), scale * rng.random((2, 4, 5, 5)))


def test_identity_shortcut_keeps_its_share():
    """Eq. 13 rescales a branch to the relevance its join sent it. An identity shortcut sends back exactly that
    share, so its factor is 1 and the graph rescales only the convolution branch (one factor per block, not two);
    the map still equals the reference, which applies Eq. 13 to every branch."""
    import onnxlrp

    rng = np.random.default_rng(41)
    layers = [ns.conv(rng, 3, 4, 3, pad=1), Relu(),
              Residual([ns.conv(rng, 4, 4, 3, pad=1), Relu(), ns.conv(rng, 4, 4, 3, pad=1)], []), Relu(),
              Residual([ns.conv(rng, 4, 4, 3, pad=1)], []), Relu(), Flatten(), ns.dense(rng, 4 * 25, 3)]
    shape = (2, 3, 5, 5)
    compiled = onnxlrp.compile(ns.to_onnx(layers, shape), "rlrp")
    assert sum("/eq13_factor" in n.name for n in compiled.graph.node) == 2
    check_against_reference(layers, shape, rng.normal(size=shape))
