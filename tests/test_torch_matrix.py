"""The models people actually export: PyTorch architectures x exporters x rules, compiled and run in onnxruntime.

Matrix: every architecture of ``torch_models.ARCHITECTURES`` (MLP, CNN with max pooling, VGG-like, ResNet basic and
bottleneck blocks, DenseNet-like, Inception-like, MobileNetV2-like, SqueezeNet-like) x {TorchScript opset 13,
TorchScript opset 17, dynamo opset 18} (static batch, the exporters' default) x {rlrp, epsilon, epsilon-plus-flat,
epsilon-gamma-box, cmp}. Each case checks that

* the original outputs are unchanged (against the exported model in onnxruntime, rtol 1e-5 of the output scale),
* the relevance has the input's shape, is finite and not all zero in any sample,
* the default target (``target`` = -1) explains the arg-max,
* the relevance is the float64 graph reference's (tests/graph_reference.py; classic rules to 1e-5 of the map's peak,
  looser where ``helpers.ILL_CONDITIONED`` shows why; R-LRP with cosine >= 0.9999 per sample), and the rule plan in
  the metadata is the reference's,
* classic rules agree with Zennit (relative L2 below 1e-3; needs zennit),
* R-LRP's final scaling gives ``sum |R| == |logit of target|`` per sample (rtol 1e-4).

Besides: dynamic batch dims run at batch 1 and 5, a model exported with its BatchNormalization nodes kept, a model
that ends in Softmax, the ``Explainer`` API, and what the exporters emit for the residual joins.
"""

import functools
import importlib.util

import numpy as np
import pytest
from graph_reference import GraphReference
from helpers import check_against_graph_reference, reference_tolerance

torch = pytest.importorskip("torch")

import torch_models as tm  # noqa: E402

import onnxlrp  # noqa: E402

HAVE_ZENNIT = importlib.util.find_spec("zennit") is not None
HAVE_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
if HAVE_ZENNIT:
    tm.import_zennit()

RULES = ("rlrp", "epsilon", "epsilon-plus-flat", "epsilon-gamma-box", "cmp")
EXPORTS = ("ts13", "ts17", "dynamo18")
ZENNIT_TOLERANCE = 1e-3
# The slowest parametrizations are those that need a dynamo export (2-15 s per model and export, cached per process;
# a TorchScript export takes 0.1-0.5 s): marked ``slow``, so ``-m "not slow"`` runs the TorchScript half alone.
SLOW = pytest.mark.slow


def param(*values, export: str, id: str):
    return pytest.param(*values, id=id, marks=[SLOW] if export.startswith("dynamo") else [])


def skip_without_exporter(export: str) -> None:
    if export.startswith("dynamo") and not HAVE_ONNXSCRIPT:
        pytest.skip("the dynamo exporter needs onnxscript")


def check_outputs_unchanged(out: dict, reference: np.ndarray) -> None:
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(out[tm.OUTPUT_NAME], reference, rtol=1e-5, atol=1e-5 * scale)


@functools.cache
def graph_reference(arch: str, export: str, **options) -> GraphReference:
    """The float64 graph reference of an export (``options``: those of :func:`torch_models.exported`)."""
    return GraphReference(tm.exported(arch, export, **options), tm.OUTPUT_NAME, tm.INPUT_NAME)


def check_relevance(arch: str, rule: str, x: np.ndarray, out: dict, compiled=None, reference=None) -> None:
    """Shape, finiteness, non-zero; the graph reference (with ``reference``: the compiled model's ``compiled``
    source); then Zennit agreement (classic rules) or the final scaling (R-LRP)."""
    relevance = out["relevance"]
    assert relevance.shape == x.shape
    assert relevance.dtype == np.float32
    assert np.isfinite(relevance).all(), "non-finite relevance"
    assert (np.abs(relevance).reshape(len(x), -1).max(1) > 0).all(), "a sample's relevance is all zero"
    if reference is not None:
        check_against_graph_reference(reference, compiled, x, out, rule, reference_tolerance(f"torch:{arch}", rule))
    target = out["explained_class"]
    logits = out[tm.OUTPUT_NAME]
    if rule == "rlrp":
        mass = np.abs(relevance.astype(np.float64)).reshape(len(x), -1).sum(1)
        explained = np.abs(logits[np.arange(len(x)), target].astype(np.float64))
        np.testing.assert_allclose(mass, explained, rtol=1e-4)
    elif HAVE_ZENNIT:
        _, z_relevance = tm.zennit_relevance(arch, rule, x, target)
        error = tm.rel_l2(relevance, z_relevance)
        assert error < ZENNIT_TOLERANCE, f"relative L2 error {error:.2e} vs Zennit"


def matrix_params():
    for arch in tm.ARCHITECTURES:
        for export in EXPORTS:
            for rule in RULES:
                yield param(arch, export, rule, export=export, id=f"{arch}-{export}-{rule}")


@pytest.mark.parametrize("arch, export, rule", list(matrix_params()))
def test_matrix(arch, export, rule):
    skip_without_exporter(export)
    proto = tm.exported(arch, export)
    x = tm.sample_input(arch)
    reference = tm.run_source(proto, x)
    compiled = onnxlrp.compile(proto, rule)
    out = tm.run_compiled(compiled, x)  # target -1: the arg-max
    check_outputs_unchanged(out, reference)
    np.testing.assert_array_equal(out["explained_class"], reference.argmax(1))
    check_relevance(arch, rule, x, out, compiled, graph_reference(arch, export))


# ---------------------------------------------------------------- static batch (the exporters' default)

def test_static_batch_export_loads_in_onnxruntime():
    """A TorchScript export without dynamic_axes has a fixed batch dim (here 2). The compiled model declares the
    input ``target`` as int64 [2], a plain input (no initializer-backed default, which onnxruntime-web could not
    feed)."""
    proto = tm.exported("mlp", "ts17")
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_value == tm.BATCH
    compiled = onnxlrp.compile(proto, "epsilon")
    declared = next(i for i in compiled.graph.input if i.name == "target")
    assert [d.dim_value for d in declared.type.tensor_type.shape.dim] == [tm.BATCH]
    assert "target" not in {t.name for t in compiled.graph.initializer}
    x = tm.sample_input("mlp")
    reference = tm.run_source(proto, x)
    np.testing.assert_array_equal(tm.run_compiled(compiled, x)["explained_class"], reference.argmax(1))
    np.testing.assert_array_equal(tm.run_compiled(compiled, x, [3, -1])["explained_class"], [3, reference[1].argmax()])


# ---------------------------------------------------------------- dynamic batch dims

DYNAMIC = [param(arch, export, export=export, id=f"{arch}-{export}")
           for arch in ("cnn_maxpool", "resnet_basic", "mobilenetv2") for export in ("ts17", "dynamo18")]


@pytest.mark.parametrize("rule", ["epsilon", "rlrp"])
@pytest.mark.parametrize("arch, export", DYNAMIC)
def test_dynamic_batch(arch, export, rule):
    skip_without_exporter(export)
    proto = tm.exported(arch, export, dynamic_batch=True)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value, "the export should have a symbolic batch dim"
    compiled = onnxlrp.compile(proto, rule)
    for batch in (1, 5):
        x = tm.sample_input(arch, batch=batch, seed=10 + batch)
        reference = tm.run_source(proto, x)
        out = tm.run_compiled(compiled, x)
        check_outputs_unchanged(out, reference)
        assert out["explained_class"].shape == (batch,)
        check_relevance(arch, rule, x, out, compiled, graph_reference(arch, export, dynamic_batch=True))
        # an explicit target, one per sample, including -1 (= the arg-max)
        target = np.arange(batch, dtype=np.int64) % 10
        target[0] = -1
        out = tm.run_compiled(compiled, x, target)
        np.testing.assert_array_equal(out["explained_class"], np.where(target < 0, reference.argmax(1), target))


# ---------------------------------------------------------------- BatchNormalization kept in the graph

@pytest.mark.parametrize("rule", ["epsilon", "epsilon-gamma-box", "rlrp"])
@pytest.mark.parametrize("arch", ["mlp", "resnet_basic", "densenet"])
def test_unfused_batchnorm(arch, rule):
    """TorchScript export without constant folding in TrainingMode.PRESERVE keeps every BatchNormalization node;
    onnxlrp folds them (into Conv/Gemm, or a per-channel affine map after a Concat) and must agree with Zennit on
    the BN-merged model."""
    proto = tm.exported(arch, "ts13", dynamic_batch=True, keep_batchnorm=True)
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in tm.model(arch).modules())
    assert tm.op_types(proto).count("BatchNormalization") == n_bn
    x = tm.sample_input(arch)
    reference = tm.run_source(proto, x)
    compiled = onnxlrp.compile(proto, rule)
    out = tm.run_compiled(compiled, x)
    check_outputs_unchanged(out, reference)
    check_relevance(arch, rule, x, out, compiled,
                    graph_reference(arch, "ts13", dynamic_batch=True, keep_batchnorm=True))


# ---------------------------------------------------------------- dynamo without its ONNX optimizer

@SLOW
@pytest.mark.parametrize("rule", ["epsilon", "rlrp"])
@pytest.mark.parametrize("arch", ["resnet_basic", "mobilenetv2"])
def test_dynamo_unoptimized(arch, rule):
    """``torch.onnx.export(..., dynamo=True, optimize=False)`` keeps BatchNormalization and gives every bias-free
    Conv a zero bias computed as ``Expand(CastLike(0, input), Shape(weight)[:1])``: constant in value, though it
    names the input (for its element type only). onnxlrp must still see a Conv with constant weights."""
    skip_without_exporter("dynamo18")
    proto = tm.exported(arch, "dynamo18", dynamic_batch=True, optimize=False)
    assert "CastLike" in tm.op_types(proto) and "BatchNormalization" in tm.op_types(proto)
    x = tm.sample_input(arch)
    reference = tm.run_source(proto, x)
    compiled = onnxlrp.compile(proto, rule)
    out = tm.run_compiled(compiled, x)
    check_outputs_unchanged(out, reference)
    check_relevance(arch, rule, x, out, compiled,
                    graph_reference(arch, "dynamo18", dynamic_batch=True, optimize=False))


# ---------------------------------------------------------------- a Softmax output

class WithSoftmax(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.softmax = torch.nn.Softmax(dim=1)

    def forward(self, x):
        return self.softmax(self.inner(x))


@pytest.mark.parametrize("export", [param("ts13", export="ts13", id="ts13"),
                                    param("dynamo18", export="dynamo18", id="dynamo18")])
def test_softmax_output_explains_logits(export):
    """The model outputs probabilities; onnxlrp explains the pre-softmax logits (what Zennit explains on the
    model without its Softmax)."""
    skip_without_exporter(export)
    arch = "cnn_maxpool"
    exporter, opset = tm.EXPORTS[export]
    x = tm.sample_input(arch)
    proto = tm.export(WithSoftmax(tm.build(arch)), torch.from_numpy(x), exporter=exporter, opset=opset,
                      dynamic_batch=True)
    assert tm.op_types(proto)[-1] == "Softmax"
    reference = tm.run_source(proto, x)
    compiled = onnxlrp.compile(proto, "epsilon")
    out = tm.run_compiled(compiled, x)
    check_outputs_unchanged(out, reference)
    np.testing.assert_allclose(reference.sum(1), 1.0, rtol=1e-5)
    logits = tm.torch_logits(arch, x)
    np.testing.assert_array_equal(out["explained_class"], logits.argmax(1))
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax")
    graph = GraphReference(proto, softmax.input[0], tm.INPUT_NAME)
    check_relevance(arch, "epsilon", x, out, compiled, graph)  # Zennit starts from one_hot(target) * logits


# ---------------------------------------------------------------- the Explainer API

def test_explainer_api():
    arch = "resnet_basic"
    proto = tm.exported(arch, "ts17", dynamic_batch=True)
    explainer = onnxlrp.Explainer(proto, rule="epsilon-gamma-box", providers=["CPUExecutionProvider"])
    x = tm.sample_input(arch, batch=3, seed=7)
    reference = tm.run_source(proto, x)
    result = explainer(x, target=4)
    assert set(result.outputs) == {tm.OUTPUT_NAME}
    check_outputs_unchanged({tm.OUTPUT_NAME: result.outputs[tm.OUTPUT_NAME]}, reference)
    np.testing.assert_array_equal(result.explained_class, [4, 4, 4])
    assert result.relevance.shape == x.shape
    if HAVE_ZENNIT:
        _, z_relevance = tm.zennit_relevance(arch, "epsilon-gamma-box", x, [4, 4, 4])
        assert tm.rel_l2(result.relevance, z_relevance) < ZENNIT_TOLERANCE
    default = explainer(x)
    np.testing.assert_array_equal(default.explained_class, reference.argmax(1))


# ---------------------------------------------------------------- what the exporters emit

@pytest.mark.parametrize("export", [param(e, export=e, id=e) for e in EXPORTS])
@pytest.mark.parametrize("arch, joins", [("resnet_basic", 2), ("resnet_bottleneck", 3), ("mobilenetv2", 2)])
def test_residual_join_is_a_plain_add(arch, joins, export):
    """Residual ``a + b`` reaches onnxlrp as one two-input Add of two activations (no Sum/ReduceSum pattern): the
    Zennit-facing copy's stack + Sum stands for exactly this node."""
    skip_without_exporter(export)
    proto = tm.exported(arch, export)
    ops = tm.op_types(proto)
    inits = {t.name for t in proto.graph.initializer}
    inits |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    adds = [n for n in proto.graph.node if n.op_type == "Add" and not set(n.input) & inits]
    assert len(adds) == joins
    assert all(len(n.input) == 2 for n in adds)
    assert "ReduceSum" not in ops and "Sum" not in ops


def test_relu6_layers_divide_by_their_positive_part():
    """Behind a ReLU6 (Clip(0, 6)) a convolution's relevance is 0 wherever its output is <= 0, so epsilon divides
    by ``Relu(z) + eps`` (two passes) instead of the four-op stabilizer, and stays Zennit's epsilon rule."""
    proto = tm.exported("mobilenetv2", "ts17")
    clips = sum(n.op_type == "Clip" for n in proto.graph.node)
    compiled = onnxlrp.compile(proto, "epsilon")
    assert sum("/z_pos" in n.name for n in compiled.graph.node) == clips > 0
    x = tm.sample_input("mobilenetv2")
    out = tm.run_compiled(compiled, x)
    check_relevance("mobilenetv2", "epsilon", x, out, compiled, graph_reference("mobilenetv2", "ts17"))
    if HAVE_ZENNIT:
        _, z_relevance = tm.zennit_relevance("mobilenetv2", "epsilon", x, out["explained_class"])
        assert tm.rel_l2(out["relevance"], z_relevance) < 1e-5
