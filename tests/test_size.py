"""A compiled model is at most 1.05x its source's file size plus 1 MB, for every rule and composite.

Rules transform weights (``W+``, ``[W+; W-]``, flipped kernels, BatchNorm-folded ``s W``, ...) with ops over the
model's own initializers that onnxruntime folds when it creates the session (:mod:`onnxlrp.weights`), and constant
subgraphs that make a model's weights (Caffe2-era files) are kept as they are (``restore_folded``). Checked on the
bundled digits CNN, a ResNet-like network with BatchNorm, grouped convolutions and dense layers, and that network
with its weights made by ``Tile`` of Constants; the relevance of each equals the float64 references of
``reference.py`` (and Zennit's, in float64, for the digits CNN).
"""

import importlib.util
import pathlib

import netspec as ns
import numpy as np
import onnx
import pytest
import reference as ref
import zoo_models
from helpers import assert_close_relative, cosine_per_sample, session
from netspec import Flatten, MaxPool, Relu, Residual
from onnx import helper, numpy_helper

import onnxlrp
from onnxlrp.composites import COMPOSITES

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
SLACK_BYTES = 1 << 20
RATIO = 1.05
TILES = 8  # the Caffe2-style model's weights are its Constants tiled this many times along the output axis

RULES = ["lrp0", "epsilon", "gamma", "zplus", "alpha-beta", "flat", "wsquare", "zbox", "rlrp", "epsilon-plus",
         "epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1", "epsilon-alpha2-beta1-flat", "cmp",
         "attnlrp", "cp-lrp"]
# reference rules (reference.py names and parameters, onnxlrp's defaults): (first layer, other convs, dense layers)
SINGLE = {"lrp0": "lrp0", "epsilon": "epsilon", "gamma": "gamma", "zplus": "zplus", "alpha-beta": "alphabeta",
          "flat": "flat", "wsquare": "wsquare", "zbox": ("zbox", {"low": 0.0, "high": 1.0})}
PLANS = {
    "epsilon-plus": ("zplus", "zplus", "epsilon"),
    "epsilon-plus-flat": ("flat", "zplus", "epsilon"),
    "epsilon-gamma-box": (("zbox", {"low": 0.0, "high": 1.0}), "gamma", "epsilon"),
    "epsilon-alpha2-beta1": ("alphabeta", "alphabeta", "epsilon"),
    "epsilon-alpha2-beta1-flat": ("flat", "alphabeta", "epsilon"),
    "cmp": ("flat", "alphabeta", "epsilon"),
}
# the transformer composites: only the size bound here (their relevance is checked against LXT's in
# test_transformers.py and test_attention_rules.py; on these CNNs they are LXT's epsilon, z + 1e-8)
SIZE_ONLY = ("attnlrp", "cp-lrp")

# Rules whose relevance does not shrink with the activation inherit the float32 rounding of the residual joins'
# outputs (as in test_rules.ILL_CONDITIONED): on every layer, flat, w^2 and z^B reach 2.4e-4, 2.6e-4 and 2.2e-4 of the
# peak on the ResNet-like network, the same figures as with weight copies before; the others stay within 1.1e-6
ILL_CONDITIONED = ("flat", "wsquare", "zbox")


def test_every_rule_and_composite_is_checked():
    """Semirings (whose relevance has its own references) are checked in test_semiring.py; taylor in
    test_taylor_shares_the_weights."""
    assert set(RULES) | {"taylor"} == {name for name, composite in COMPOSITES.items() if composite.semiring is None}


def resnet_like(rng):
    """Conv-BN-ReLU, max pool, a projected and an identity residual block (one grouped convolution), two dense
    layers: 2.2 MB of weights on 4x4 and 2x2 maps (the unrolled float64 reference stays small)."""
    return [
        ns.conv(rng, 8, 64, 3, pad=1), ns.batchnorm(rng, 64), Relu(), MaxPool((2, 2), (2, 2)),
        Residual([ns.conv(rng, 64, 128, 3, pad=1), ns.batchnorm(rng, 128), Relu(), ns.conv(rng, 128, 128, 3, pad=1),
                  ns.batchnorm(rng, 128)],
                 [ns.conv(rng, 64, 128, 1, bias=False), ns.batchnorm(rng, 128)]), Relu(),
        Residual([ns.conv(rng, 128, 128, 3, pad=1, groups=4), ns.batchnorm(rng, 128), Relu(),
                  ns.conv(rng, 128, 128, 3, pad=1), ns.batchnorm(rng, 128)], []), Relu(),
        Flatten(), ns.dense(rng, 512, 256), Relu(), ns.dense(rng, 256, 10),
    ], (2, 8, 4, 4)


def tiled(layers):
    """The same network with every weight whose output axis divides by TILES made of TILES copies of its first
    rows (so that a Tile of a Constant can make it)."""
    for layer in ns.iter_linear(layers):
        rows = layer.W.shape[0]
        if rows % TILES == 0:
            layer.W = np.tile(layer.W[:rows // TILES], (TILES,) + (1,) * (layer.W.ndim - 1))
    return layers


def weights_from_constants(model):
    """Caffe2-style: each initializer that is ``Tile(first rows)`` becomes a Constant node of the first rows and a
    Tile node (8x smaller in the file than the weight it makes)."""
    kept, nodes = [], []
    for t in model.graph.initializer:
        value = numpy_helper.to_array(t)
        rows = value.shape[0] if value.ndim >= 2 else 0
        block = value[:rows // TILES] if rows % TILES == 0 and rows else None
        if block is None or not np.array_equal(np.tile(block, (TILES,) + (1,) * (value.ndim - 1)), value):
            kept.append(t)
            continue
        reps = np.array((TILES,) + (1,) * (value.ndim - 1), np.int64)
        nodes += [helper.make_node("Constant", [], [t.name + "_block"], value=numpy_helper.from_array(block)),
                  helper.make_node("Constant", [], [t.name + "_reps"], value=numpy_helper.from_array(reps)),
                  helper.make_node("Tile", [t.name + "_block", t.name + "_reps"], [t.name])]
    assert nodes, "no weight is made by a constant subgraph"
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    graph_nodes = nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(graph_nodes)
    onnx.checker.check_model(model)
    return model


def reference_rules(rule, layers):
    """The reference's rule per linear layer (depth-first netspec order; the first one is the input layer)."""
    first, conv, dense = (SINGLE[rule],) * 3 if rule in SINGLE else PLANS[rule]
    return [first if i == 0 else conv if isinstance(layer, ns.Conv) else dense
            for i, layer in enumerate(ns.iter_linear(layers))]


@pytest.fixture(scope="module")
def unrolled_once():
    """The reference unrolls each convolution into a matrix in Python loops (seconds for these layers); every rule
    unrolls the same layers, so keep the matrices for the module (keyed by the layer's values and geometry)."""
    cache = {}
    build = ref.linear_matrix

    def cached(layer, in_shape):
        parts = [type(layer).__name__, tuple(in_shape)] + [np.asarray(v).tobytes() for v in vars(layer).values()
                                                           if isinstance(v, np.ndarray)]
        parts += [v for v in vars(layer).values() if not isinstance(v, np.ndarray)]
        key = tuple(parts)
        if key not in cache:
            cache[key] = build(layer, in_shape)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ref, "linear_matrix", cached)
        yield


def saved_size(model, path):
    onnx.save(model, str(path))
    return path.stat().st_size


def assert_size_bound(compiled, source_bytes, path):
    size = saved_size(compiled, path)
    assert size <= RATIO * source_bytes + SLACK_BYTES, f"{size} bytes from a {source_bytes}-byte source"


def run(compiled, x):
    sess = session(compiled)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)}), strict=True))


def check_against_reference(layers, compiled, x, rule):
    out = run(compiled, x)
    if rule in SIZE_ONLY:
        assert np.all(np.isfinite(out["relevance"]))
    elif rule == "rlrp":
        expected = ref.rlrp(layers, x)
        assert np.all(cosine_per_sample(out["relevance"], expected) >= 0.9999)
    else:
        expected = ref.lrp(layers, x, reference_rules(rule, layers))
        assert_close_relative(out["relevance"], expected, 5e-4 if rule in ILL_CONDITIONED else 1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_resnet_like_with_batchnorm(rule, tmp_path, unrolled_once):
    rng = np.random.default_rng(40)
    layers, shape = resnet_like(rng)
    model = ns.to_onnx(layers, shape)
    source_bytes = saved_size(model, tmp_path / "source.onnx")
    assert source_bytes > 2 * SLACK_BYTES  # weight copies would break the bound
    compiled = onnxlrp.compile(model, rule)
    assert_size_bound(compiled, source_bytes, tmp_path / "compiled.onnx")
    check_against_reference(layers, compiled, rng.uniform(-1.0, 1.0, size=shape), rule)


@pytest.mark.parametrize("rule", RULES)
def test_caffe2_style_weights_from_constant_subgraphs(rule, tmp_path, unrolled_once):
    """The folded weights (2.1 MB) are 8x the file: the compiled model keeps the Tile nodes, and the relevance graph
    reads their outputs."""
    rng = np.random.default_rng(41)
    layers, shape = resnet_like(rng)
    layers = tiled(layers)
    model = weights_from_constants(ns.to_onnx(layers, shape))
    source_bytes = saved_size(model, tmp_path / "source.onnx")
    folded = sum(layer.W.size * 4 for layer in ns.iter_linear(layers))
    assert folded > 1.05 * source_bytes + SLACK_BYTES  # storing the folded weights would break the bound
    compiled = onnxlrp.compile(model, rule)
    assert_size_bound(compiled, source_bytes, tmp_path / "compiled.onnx")
    assert sum(n.op_type == "Tile" for n in compiled.graph.node) == sum(n.op_type == "Tile" for n in model.graph.node)
    x = rng.uniform(-1.0, 1.0, size=shape)
    np.testing.assert_allclose(run(compiled, x)["y"], session(model).run(None, {"x": x.astype(np.float32)})[0],
                               rtol=1e-5, atol=1e-6)
    check_against_reference(layers, compiled, x, rule)


def digits_module(model):
    """The bundled digits CNN as a float64 torch module with the same weights."""
    import torch
    from torch import nn

    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float64)) for t in model.graph.initializer}
    net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(4608, 128), nn.ReLU(), nn.Linear(128, 10)).to(torch.float64)
    for index, prefix in ((0, "features.0"), (2, "features.2"), (6, "classifier.1"), (8, "classifier.3")):
        net[index].weight.data, net[index].bias.data = weights[prefix + ".weight"], weights[prefix + ".bias"]
    return net.eval()


def logits_of(model, x):
    """The Softmax input of the digits CNN (its logits) at ``x``."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    logits = next(n.input[0] for n in exposed.graph.node if n.op_type == "Softmax")
    exposed.graph.output.append(helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, None))
    return session(exposed).run([logits], {"image": x})[0]


@pytest.mark.parametrize("rule", RULES)
def test_bundled_digits_cnn(rule, tmp_path):
    """The relevance equals Zennit's in float64 (where torch and Zennit are installed; R-LRP, which Zennit lacks:
    conservation ``sum |R| = |logit|``)."""
    model = onnx.load(str(DIGITS))
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "Conv", "Relu", "MaxPool", "Flatten", "Gemm",
                                                     "Relu", "Gemm", "Softmax"]
    compiled = onnxlrp.compile(str(DIGITS), rule)
    assert_size_bound(compiled, DIGITS.stat().st_size, tmp_path / "compiled.onnx")
    x = (np.load(ROOT / "models" / "digits_test.npz")["images"][:3, None] / 255.0).astype(np.float32)
    out = run(compiled, x)
    relevance = out["relevance"]
    if rule in SIZE_ONLY:
        assert np.all(np.isfinite(relevance))
        return
    if rule == "rlrp":
        logits = logits_of(model, x)[np.arange(3), out["explained_class"]]
        np.testing.assert_allclose(np.abs(relevance).reshape(3, -1).sum(1), np.abs(logits), rtol=1e-4)
        return
    pytest.importorskip("torch")
    if importlib.util.find_spec("zennit") is None:
        pytest.skip("zennit is not installed")
    import torch
    import torch_models as tm

    tm.import_zennit()
    from zennit.attribution import Gradient

    target = torch.as_tensor(out["explained_class"])
    with Gradient(model=digits_module(model), composite=tm.zennit_composite(rule)) as attributor:
        _, expected = attributor(torch.from_numpy(x).to(torch.float64),
                                 lambda y: torch.nn.functional.one_hot(target, 10).to(y) * y)
    assert_close_relative(relevance, expected.detach().numpy(), 1e-5)


def test_subgraphs_larger_than_their_values_stay_folded(tmp_path):
    """ZFNet as its converter wrote it: weights are float64 Constants of W^T, then Cast and Transpose. The float32
    value is half the size of that subgraph, so the compiled model holds the folded value, not the float64 one."""
    zoo = zoo_models.zfnet()
    source_bytes = saved_size(zoo.model, tmp_path / "source.onnx")
    compiled = onnxlrp.compile(zoo.model, "epsilon-alpha2-beta1")
    assert_size_bound(compiled, source_bytes, tmp_path / "compiled.onnx")
    assert not [t.name for t in compiled.graph.initializer if t.data_type == onnx.TensorProto.DOUBLE]
    assert "Cast" not in {n.op_type for n in compiled.graph.node if not n.name.startswith("lrp/")}
