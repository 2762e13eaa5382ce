"""Classic rules: the compiled graph against the numpy reference (matrix form), conservation, gradient x input."""

import netspec as ns
import numpy as np
import onnx
import pytest
import reference as ref
from helpers import assert_close_relative, compiled_from_spec, cosine_per_sample, explain, run_source, session
from netspec import AvgPool, Flatten, GlobalMaxPool, MaxPool, Relu, Residual
from spec_zoo import ZOO

import onnxlrp
from onnxlrp.builder import GraphBuilder
from onnxlrp.quotients import shrink, stabilize
from onnxlrp.runtime import with_target

# our rule name -> (reference rule name, our params, reference params)
RULES = {
    "lrp0": ("lrp0", {}, {}),
    "epsilon": ("epsilon", {"epsilon": 0.01}, {"eps": 0.01}),
    "gamma": ("gamma", {"gamma": 0.25}, {"gamma": 0.25}),
    "zplus": ("zplus", {}, {}),
    "alpha-beta": ("alphabeta", {"alpha": 2.0, "beta": 1.0}, {"alpha": 2.0, "beta": 1.0}),
    "flat": ("flat", {}, {}),
    "wsquare": ("wsquare", {}, {}),
    "zbox": ("zbox", {"low": -3.0, "high": 3.0}, {"low": -3.0, "high": 3.0}),
}
# Rules whose relevance does not shrink with the activation (flat, w^2, z^B) inherit the float32 rounding of a join
# output that nearly cancels: in "sum3" one join output is 1.7e-3 of the sum of its terms' magnitudes, so z carries
# a relative error of ~3.5e-5 in float32; "residual" with z^B bounds of +-3 has the same sensitivity (the float64
# reference itself moves by 3.6e-5 when the input is perturbed at float32 resolution).
ILL_CONDITIONED = {("sum3", "flat"), ("sum3", "wsquare"), ("sum3", "zbox"), ("residual", "zbox")}
# maxpool_ceil_drop: ONNX shape inference and onnxruntime disagree on its output size (see spec_zoo)
MODELS = [m for m in ZOO if m != "maxpool_ceil_drop"]


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("model", MODELS)
def test_rule_matches_reference(model, rule):
    rng = np.random.default_rng(10)
    layers, shape = ZOO[model](rng)
    x = rng.normal(size=shape)
    ref_name, params, ref_params = RULES[rule]
    expected = ref.lrp(layers, x, ref_name, **ref_params)
    if rule == "lrp0" and not np.isfinite(expected).all():
        # 0/0 where a bias-free layer sees an all-zero window: our LRP-0 sets that quotient to 0, which is what a
        # vanishing epsilon gives (R is 0 there too)
        expected = ref.lrp(layers, x, "epsilon", eps=1e-30)
    relevance, cls = compiled_from_spec(layers, shape, rule, x, **params)
    np.testing.assert_array_equal(cls, ref.forward(layers, x).reshape(len(x), -1).argmax(1))
    assert_close_relative(relevance, expected, 5e-5 if (model, rule) in ILL_CONDITIONED else 1e-5)


@pytest.mark.parametrize("pools,outputs", [
    ([MaxPool((2, 2), (2, 2)), MaxPool((3, 3), (2, 2), (1, 1, 1, 1))], 2 * 3 * 3),  # tiling; overlapping, padded
    ([GlobalMaxPool()], 2),
])
def test_max_pool_ties_go_to_the_first_arg_max(pools, outputs):
    """Negative integer inputs tie in most windows: each window's relevance goes to its first maximum in row-major
    order, for windows that tile the input, for overlapping padded windows (where a padded tap must not win against
    the negative inputs) and for a global pool."""
    rng = np.random.default_rng(13)
    layers = [*pools, Flatten(), ns.dense(rng, outputs, 3)]
    shape = (2, 2, 12, 12)
    x = rng.integers(-4, 0, size=shape).astype(np.float64)
    windows = x.reshape(2, 2, 6, 2, 6, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 2, 6, 6, 4)
    assert ((windows == windows.max(-1, keepdims=True)).sum(-1) > 1).mean() > 0.3  # ties are common
    expected = ref.lrp(layers, x, "epsilon", eps=0.01)
    relevance, _ = compiled_from_spec(layers, shape, "epsilon", x, epsilon=0.01)
    assert_close_relative(relevance, expected, 1e-5)


@pytest.mark.parametrize("rule,params", [("epsilon", {"epsilon": 1e-6}), ("alpha-beta", {})])
def test_join_operand_behind_a_relu_is_read_through_its_stand_in(rule, params):
    """Behind a Relu, the convolution (or batch norm) output that only a join reads is replaced, in the relevance
    part, by y - (the other operands), which equals it wherever the relevance is non-zero: no emitted node reads
    it, so onnxruntime can keep the convolution, the Add and the Relu in one kernel, and the compiled model's
    outputs equal the source's bit for bit. The relevance still equals the float64 reference."""
    rng = np.random.default_rng(24)
    layers, shape = ZOO["residual"](rng)
    model = ns.to_onnx(layers, shape)
    compiled = onnxlrp.compile(model, rule, **params)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    read = {i for n in compiled.graph.node if n.name.startswith("lrp/") for i in n.input}
    joins = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(joins) == 2
    for join in joins:
        operands = [u for u in join.input if producer.get(u) in ("Conv", "BatchNormalization")]
        assert operands and any(u not in read for u in operands)
    x = rng.normal(size=shape)
    originals, relevance, _ = explain(model, x, rule, **params)
    np.testing.assert_array_equal(originals[0], run_source(model, x)[0])
    ref_name, _, ref_params = RULES[rule]
    ref_params = {"eps": 1e-6} if rule == "epsilon" else ref_params
    assert_close_relative(relevance, ref.lrp(layers, x, ref_name, **ref_params), 1e-5)


def test_strided_depthwise_transposed_products_are_convolutions():
    """A strided depthwise convolution's transposed product is a stride-1 Conv over zero-inserted relevance (not a
    ConvTranspose), and the relevance equals the float64 reference, for an even and an uneven geometry."""
    rng = np.random.default_rng(25)
    layers, shape = ZOO["depthwise_strided"](rng)
    model = ns.to_onnx(layers, shape)
    ops = [n.op_type for n in onnxlrp.compile(model, "epsilon").graph.node if n.name.startswith("lrp/")]
    assert ops.count("Resize") == 2 and ops.count("ConvTranspose") == 1  # the input layer's, into 2 channels
    x = rng.normal(size=shape)
    relevance, _ = compiled_from_spec(layers, shape, "epsilon", x, epsilon=0.01)
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon", eps=0.01), 1e-5)


@pytest.mark.parametrize("rule", ["epsilon", "epsilon-gamma-box", "epsilon-alpha2-beta1"])
def test_transposed_products_into_few_channels_are_conv_transposes(rule):
    """Into fewer than 8 channels (an RGB input layer) a stride-1 transposed product stays a ConvTranspose of the
    model's weights (onnxruntime would run the flipped-kernel Conv over a large im2col buffer); into 16 channels it
    is a Conv with the flipped kernel. The relevance equals the float64 reference either way."""
    rng = np.random.default_rng(26)
    layers = [ns.conv(rng, 3, 16, 3, pad=1), Relu(), ns.conv(rng, 16, 16, 3, pad=1), Relu(), Flatten(),
              ns.dense(rng, 16 * 5 * 5, 4)]
    shape = (2, 3, 5, 5)
    model = ns.to_onnx(layers, shape)
    first, second = (n.name for n in model.graph.node if n.op_type == "Conv")
    products = {n.name: n.op_type for n in onnxlrp.compile(model, rule).graph.node if "/WTg" in n.name}
    assert {op for name, op in products.items() if f"/{first}/" in name} == {"ConvTranspose"}
    assert {op for name, op in products.items() if f"/{second}/" in name} == {"Conv"}
    x = rng.uniform(0.0, 1.0, size=shape)
    relevance, _ = compiled_from_spec(layers, shape, rule, x)
    reference = {"epsilon": ["epsilon"] * 3, "epsilon-gamma-box": [("zbox", {"low": 0.0, "high": 1.0}), "gamma",
                                                                    "epsilon"],
                 "epsilon-alpha2-beta1": ["alphabeta", "alphabeta", "epsilon"]}[rule]
    assert_close_relative(relevance, ref.lrp(layers, x, reference), 1e-5)


def test_target_input_selects_the_class():
    rng = np.random.default_rng(11)
    layers, shape = ZOO["cnn"](rng)
    x = rng.normal(size=shape)
    target = np.array([2, 0])
    model = ns.to_onnx(layers, shape)
    _, relevance, cls = explain(model, x, "epsilon", target=target)
    np.testing.assert_array_equal(cls, target)
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon", target=target), 1e-5)
    _, relevance, cls = explain(model, x, "epsilon", target=np.array([-1, 1]))
    assert cls[0] == ref.forward(layers, x)[0].argmax() and cls[1] == 1


COMPOSITES = {
    # composite -> rules per linear layer of the "cnn" net (4 convs then a dense layer)
    "epsilon-plus": ["zplus"] * 4 + ["epsilon"],
    "epsilon-plus-flat": ["flat"] + ["zplus"] * 3 + ["epsilon"],
    "epsilon-gamma-box": [("zbox", {"low": 0.0, "high": 1.0})] + ["gamma"] * 3 + ["epsilon"],
    "epsilon-alpha2-beta1": ["alphabeta"] * 4 + ["epsilon"],
    "epsilon-alpha2-beta1-flat": ["flat"] + ["alphabeta"] * 3 + ["epsilon"],
    "cmp": ["flat"] + ["alphabeta"] * 3 + ["epsilon"],
}


@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_composite_matches_reference(composite):
    rng = np.random.default_rng(12)
    layers, shape = ZOO["cnn"](rng)
    x = rng.normal(size=shape)
    relevance, _ = compiled_from_spec(layers, shape, composite, x)
    assert_close_relative(relevance, ref.lrp(layers, x, COMPOSITES[composite]), 1e-5)


def test_cmp_flat_layers_and_custom_composite(tmp_path):
    rng = np.random.default_rng(13)
    layers, shape = ZOO["cnn"](rng)
    x = rng.normal(size=shape)
    relevance, _ = compiled_from_spec(layers, shape, "cmp", x, flat_layers=3)
    assert_close_relative(relevance, ref.lrp(layers, x, ["flat"] * 3 + ["alphabeta", "epsilon"]), 1e-5)
    toml = tmp_path / "mine.toml"
    toml.write_text('[[layer]]\nposition = [0, 0]\nrule = "wsquare"\n'
                    '[[layer]]\nop = "Conv"\nrule = "gamma"\ngamma = 0.5\n'
                    '[[layer]]\nrule = "epsilon"\nepsilon = 0.1\n')
    relevance, _ = compiled_from_spec(layers, shape, "unused", x, composite=toml)
    expected = ref.lrp(layers, x, ["wsquare"] + [("gamma", {"gamma": 0.5})] * 3 + [("epsilon", {"eps": 0.1})])
    assert_close_relative(relevance, expected, 1e-5)


def test_matmul_with_bias_add_is_one_layer():
    rng = np.random.default_rng(14)
    layers, shape = ZOO["mlp"](rng)
    x = rng.normal(size=shape)
    model = ns.to_onnx(layers, shape, dense_as="matmul", softmax=True)
    originals, relevance, _ = explain(model, x, "epsilon", epsilon=0.1)
    np.testing.assert_allclose(originals[0], run_source(model, x)[0], rtol=1e-5)
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon", eps=0.1), 1e-5)


def bias_free_net(rng):
    return [
        ns.conv(rng, 2, 4, 3, pad=1, bias=False), Relu(),
        Residual([ns.conv(rng, 4, 4, 3, pad=1, bias=False), Relu(), ns.conv(rng, 4, 4, 3, pad=1, bias=False)], []),
        Relu(), AvgPool((2, 2), (2, 2)),
        Residual([ns.conv(rng, 4, 4, 3, pad=1, bias=False)], [ns.conv(rng, 4, 4, 1, bias=False)]), Relu(),
        MaxPool((2, 2), (1, 1)), Flatten(), ns.dense(rng, 4 * 2 * 2, 6, bias=False), Relu(),
        ns.dense(rng, 6, 3, bias=False),
    ], (3, 2, 6, 6)


@pytest.mark.parametrize("rule,params", [("lrp0", {}), ("epsilon", {"epsilon": 1e-9})])
def test_conservation_on_bias_free_relu_net(rule, params):
    rng = np.random.default_rng(15)
    layers, shape = bias_free_net(rng)
    x = 100 * rng.normal(size=shape)  # far above the joins' fixed 1e-6 stabilizer
    model = ns.to_onnx(layers, shape)
    originals, relevance, cls = explain(model, x, rule, **params)
    logit = originals[0][np.arange(len(x)), cls]
    np.testing.assert_allclose(relevance.reshape(len(x), -1).sum(1), logit, rtol=1e-4)


def test_lrp0_equals_gradient_times_input_by_finite_differences():
    """Central differences of the float32 source model in onnxruntime (no float64 Conv kernel there): their
    rounding noise at h = 1e-3 is ~1e-3 of the map's peak, so 1e-2 is the resolution of this check; a wrong rule
    is off by O(1). (The float64 reference comparison above checks LRP-0 to 1e-5.)"""
    rng = np.random.default_rng(16)
    layers, shape = bias_free_net(rng)
    shape = (1, *shape[1:])
    x = rng.normal(size=shape)
    model = ns.to_onnx(layers, shape)
    originals, relevance, cls = explain(model, x, "lrp0")
    n = x.size
    h = 1e-3
    steps = np.eye(n).reshape(n, *shape[1:]) * h
    plus = run_source(model, (x + steps).astype(np.float32))[0][:, cls[0]].astype(np.float64)
    minus = run_source(model, (x - steps).astype(np.float32))[0][:, cls[0]].astype(np.float64)
    gradient = ((plus - minus) / (2 * h)).reshape(shape)
    assert_close_relative(relevance, gradient * x, 1e-2)


@pytest.mark.parametrize("rule", ["epsilon", "gamma", "zplus", "alpha-beta"])
def test_cheaper_forms_behind_relu_are_equivalent(rule):
    """Behind a Relu the relevance is already 0 where z <= 0, so the rules divide by ``Relu(z) + eps`` without the
    sign-aware stabilizer chain, and skip the x- terms of non-negative inputs. The compiled graph must use those
    cheaper forms here (fewer sign tests and Where gates than linear layers) and still equal the reference."""
    rng = np.random.default_rng(17)
    layers, shape = ZOO["cnn"](rng)
    x = rng.normal(size=shape)
    model = ns.to_onnx(layers, shape)
    ref_name, params, ref_params = RULES[rule]
    compiled = onnxlrp.compile(model, rule, **params)
    sign_tests = sum(n.op_type in ("GreaterOrEqual", "Greater", "Less", "Where") for n in compiled.graph.node)
    linear = sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    assert sign_tests < linear
    _, relevance, _ = explain(model, x, rule, **params)
    assert_close_relative(relevance, ref.lrp(layers, x, ref_name, **ref_params), 1e-5)


def run_elementwise(emit, values: np.ndarray) -> tuple[set[str], np.ndarray]:
    """The op types that ``emit(builder, input_name)`` adds to an empty graph, and its output for ``values``."""
    graph = onnx.helper.make_graph([], "elementwise", [onnx.helper.make_tensor_value_info(
        "v", onnx.TensorProto.FLOAT, [values.size])], [])
    b = GraphBuilder(graph)
    out = emit(b, "v")
    b.commit()
    graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [values.size]))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10)
    return {n.op_type for n in model.graph.node}, session(model).run(None, {"v": values})[0]


@pytest.mark.parametrize("eps", [1e-6, 0.01, 1.0, 100.0])
def test_stabilizer_is_zennits_bit_for_bit(eps):
    """``stab(z) = z + eps * sign(z)`` with ``sign(0) = +1``, computed the way Zennit does (``x + ((x == 0) +
    sign(x)) * eps``) in float32, equals the compiled Clip form (or the Where form above eps = 1) exactly for
    zeros of both signs, the smallest normal numbers, values near +-eps, huge values and infinities."""
    tiny = np.finfo(np.float32).tiny
    z = np.array([0.0, -0.0, tiny, -tiny, 2 * tiny, -2 * tiny, 1e-30, -1e-30, eps / 3, -eps / 3, eps, -eps, 0.5, -0.5,
                  1.0, -1.0, 3e6, -3e6, 1e30, -1e30, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                  np.inf, -np.inf], dtype=np.float32)
    spread = np.random.default_rng(0).normal(size=1000) * 10.0 ** np.arange(-20, 20, 0.04)
    z = np.concatenate([z, spread.astype(np.float32)])
    ops, got = run_elementwise(lambda b, name: stabilize(b, name, eps), z)
    assert ("Clip" in ops) == (eps <= 1) and ("Where" in ops) == (eps > 1)
    expected = z + ((z == 0).astype(np.float32) + np.sign(z)) * np.float32(eps)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("eps", [1e-13, 1e-6, 0.01, 1.0, 100.0])
def test_ratio_of_forward_values_is_a_softsign(eps):
    """``v / (v + eps)`` for ``v >= 0`` (the ratio behind a Relu and of a join share, :func:`shrink`) is emitted as
    ``Softsign(v / eps)``, the same ratio, which onnxruntime runs faster than an Add and a Div; below eps = 1e-12
    it stays an Add and a Div. Both equal the float64 ratio within a few float32 ulps, from 0 and the smallest
    normal numbers to 1e30, and are exactly 0 at 0 and exactly 1 at 1e30."""
    tiny = np.finfo(np.float32).tiny
    v = np.array([0.0, tiny, 2 * tiny, 1e-30, eps / 3, eps, 3 * eps, 0.5, 1.0, 3e6, 1e30], dtype=np.float32)
    spread = np.abs(np.random.default_rng(0).normal(size=1000)) * 10.0 ** np.arange(-20, 20, 0.04)
    v = np.concatenate([v, spread.astype(np.float32)])
    ops, got = run_elementwise(lambda b, name: shrink(b, name, eps), v)
    assert ops == ({"Add", "Div"} if eps < 1e-12 else {"Mul", "Softsign"})
    v64 = v.astype(np.float64)
    expected = v64 / (v64 + np.float64(np.float32(eps)))
    # atol: ratios below the smallest normal float32 (tiny / 100) keep only an absolute precision
    np.testing.assert_allclose(got, expected, rtol=4 * np.finfo(np.float32).eps, atol=2e-45)
    assert got[0] == 0.0 and got[10] == 1.0  # v = 0 and v = 1e30


@pytest.mark.parametrize("dense_as", ["gemm", "matmul"])
@pytest.mark.parametrize("rule", ["epsilon", "rlrp"])
def test_unmodified_weights_are_read_in_place(dense_as, rule):
    """Rules that use a weight as it is (W^T g of epsilon and R-LRP) read the model's own initializer, stored as
    [out, in] (Gemm transB=1) or [in, out] (MatMul), instead of a transposed copy: the compiled model is not
    larger by a second set of dense weights, and the relevance still equals the reference."""
    rng = np.random.default_rng(31)
    layers = [Flatten(), ns.dense(rng, 48, 64), Relu(), ns.dense(rng, 64, 32), Relu(), ns.dense(rng, 32, 5)]
    model = ns.to_onnx(layers, (2, 3, 4, 4), dense_as=dense_as)
    compiled = onnxlrp.compile(model, rule)
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    assert sum(t.ByteSize() for t in compiled.graph.initializer) < weights + 2000
    x = rng.normal(size=(2, 3, 4, 4))
    relevance = explain(model, x, rule)[1]
    if rule == "rlrp":
        assert np.all(cosine_per_sample(relevance, ref.rlrp(layers, x)) >= 0.9999)
    else:
        assert_close_relative(relevance, ref.lrp(layers, x, "epsilon"), 1e-5)


def test_activation_only_nodes_run_next_to_their_readers(tmp_path):
    """The stabilized denominators and the ratios ``v / eps`` read only forward values. In onnxruntime's default
    execution order they run after the first relevance node (the one-hot start), i.e. in the backward pass next to
    the node that reads them, not during the forward pass, where each would keep an activation-sized tensor alive
    through the backward."""
    import json
    from pathlib import Path

    import onnxruntime as ort

    rng = np.random.default_rng(5)
    layers = [ns.conv(rng, 3, 8, 3, pad=1), Relu(),
              Residual([ns.conv(rng, 8, 8, 3, pad=1), Relu(), ns.conv(rng, 8, 8, 3, pad=1)], []), Relu(),
              ns.conv(rng, 8, 8, 3, pad=1), Relu(), Flatten(), ns.dense(rng, 8 * 36, 4)]
    compiled = onnxlrp.compile(ns.to_onnx(layers, (1, 3, 6, 6)), "epsilon")
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "order")
    sess = ort.InferenceSession(compiled.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sess.run(None, with_target(sess, {sess.get_inputs()[0].name: rng.normal(size=(1, 3, 6, 6)).astype(np.float32)}))
    events = json.loads(Path(sess.end_profiling()).read_text())
    order = [e["name"][: -len("_kernel_time")] for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    start = next(i for i, name in enumerate(order) if "/selected_node" in name)
    stabilizers = [i for i, name in enumerate(order)
                   if any(hint in name for hint in ("/stab_node", "/eps_node", "/v_over_eps_node"))]
    assert len(stabilizers) >= 5
    assert min(stabilizers) > start, [order[i] for i in stabilizers if i < start]


@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_products_at_forks_and_joins(eps):
    """A fork whose readers all multiply by it (x * c1 + x * c2) becomes one product x * (c1 + c2), and a join's
    share z * q divided by stab(z) becomes q * |z| / (|z| + eps): the compiled graph has these forms (not the
    products, the stabilizer chain and the quotient), and the relevance still equals the float64 reference, with
    and without a MaxPool/AvgPool between the blocks and with a projection shortcut."""
    rng = np.random.default_rng(23)
    layers, shape = bias_free_net(rng)
    x = rng.normal(size=shape)
    model = ns.to_onnx(layers, shape)
    compiled = onnxlrp.compile(model, "epsilon", epsilon=eps)
    hints = [n.name.rsplit("/", 1)[-1] for n in compiled.graph.node if n.name.startswith("lrp/")]
    assert sum(h.startswith("cofactors_node") for h in hints) == 2  # the two residual forks
    # the two convolutions that feed a join, the shortcut convolution, and the average pool (its output is a fork);
    # behind a Relu whose output the next layer multiplies by (y * c / (y + eps) = c * y / (y + eps)): the first
    # convolution, the first one of a block, the first join and the dense layer (the second join's Relu output is
    # read through the Flatten after the MaxPool, which keeps no product)
    assert sum(h.startswith("ratio_node") for h in hints) == 8
    relevance = explain(model, x, "epsilon", epsilon=eps)[1]
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon", eps=eps), 1e-5)
