"""Classic model-zoo architectures, written the way the old converters wrote them (tests/zoo_models.py).

Each architecture x rule compiles, runs in onnxruntime with its original output unchanged, and gives the relevance
of the float64 graph reference (tests/graph_reference.py): classic rules to 1e-5 of the map's peak (looser where
``helpers.ILL_CONDITIONED`` shows why), R-LRP with cosine >= 0.9999 per sample; the rule plan in the metadata is
the reference's. The bias-free variants conserve relevance under LRP-0 and LRP-epsilon: ``sum(R) == logit``.

The last tests are minimal regressions for two bugs these files exposed (fixed in d486035): IR-3 files below
opset 13, and a Softmax on a 4-D tensor below opset 13.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import zoo_models as zm
from graph_reference import GraphReference
from helpers import check_against_graph_reference, reference_tolerance
from onnx import TensorProto, helper

import onnxlrp

# the coverage matrix's rules, and two composites' rules alone on every layer
RULES = (*zm.RULES, "epsilon-alpha2-beta1", "zplus", "gamma")


def compile_zoo(z: zm.ZooModel, rule: str, **params) -> onnx.ModelProto:
    return onnxlrp.compile(z.model, rule, **params)


# ---------------------------------------------------------------- running

@functools.cache
def zoo(name: str, bias: bool = True) -> zm.ZooModel:
    return zm.ZOO[name](bias=bias)


@functools.cache
def source_outputs(name: str, bias: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input, probabilities, logits [batch, classes]) of the source model."""
    z = zoo(name, bias)
    x = z.sample()
    prob, logits = zm.run_source(z.model, {z.input_name: x}, [z.output_name, z.logits])
    return x, prob, logits.reshape(len(x), -1)


def explain(compiled: onnx.ModelProto, z: zm.ZooModel, x: np.ndarray, target=None) -> dict[str, np.ndarray]:
    return zm.run_compiled(compiled, {z.input_name: x}, target)


@functools.cache
def graph_reference(name: str, bias: bool = True) -> GraphReference:
    z = zoo(name, bias)
    return GraphReference(z.model, z.logits, z.input_name)


# ---------------------------------------------------------------- the matrix

@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(zm.ZOO))
def test_zoo_rule(name, rule):
    z = zoo(name)
    x, prob, logits = source_outputs(name)
    compiled = compile_zoo(z, rule)
    onnx.checker.check_model(compiled)
    out = explain(compiled, z, x)

    # the contract: original input and output kept, target/relevance/explained_class added
    assert z.input_name in [i.name for i in compiled.graph.input]
    assert {z.output_name, "relevance", "explained_class"} <= set(out)
    np.testing.assert_allclose(out[z.output_name], prob, rtol=1e-4, atol=1e-6)
    cls = out["explained_class"]
    np.testing.assert_array_equal(cls, logits.argmax(1))

    r = out["relevance"]
    assert r.shape == x.shape and r.dtype == np.float32
    assert (np.abs(r).reshape(len(x), -1).sum(1) > 0).all(), "a sample got no relevance at all"
    tolerance = reference_tolerance(f"zoo:{name}", rule)
    check_against_graph_reference(graph_reference(name), compiled, x, out, rule, tolerance)
    if rule == "rlrp":  # the final scaling (README): sum |R| = |explained value|
        explained = logits[np.arange(len(x)), cls]
        np.testing.assert_allclose(np.abs(r).reshape(len(x), -1).sum(1), np.abs(explained), rtol=1e-4)


@pytest.mark.parametrize("rule,params", [("lrp0", {}), ("epsilon", {"epsilon": 1e-9})], ids=["lrp0", "epsilon"])
@pytest.mark.parametrize("name", list(zm.ZOO))
def test_zoo_conservation_bias_free(name, rule, params):
    """No bias anywhere (BatchNorm shifts included): LRP-0/epsilon(1e-9) give sum(R) == explained logit through
    LRN, max/average pools, Sum and Concat joins, channel shuffles and BatchNorm in both written forms."""
    z = zoo(name, bias=False)
    x, _, logits = source_outputs(name, bias=False)
    compiled = compile_zoo(z, rule, **params)
    out = explain(compiled, z, x)
    explained = logits[np.arange(len(x)), out["explained_class"]]
    assert (np.abs(explained) > 1e-3).all(), "pick another seed: the explained logit is ~0"
    np.testing.assert_allclose(out["relevance"].reshape(len(x), -1).sum(1), explained, rtol=1e-3)


@pytest.mark.parametrize("name", ["resnet50_v1", "inception_v1"])
def test_zoo_explicit_target(name):
    """An explicit ``target`` explains that class, also when it is not the arg-max (its logit may be negative): the
    relevance of the graph reference for that class; epsilon conserves it, R-LRP scales to its magnitude."""
    z = zoo(name, bias=False)
    x, _, logits = source_outputs(name, bias=False)
    target = int(np.argsort(logits[0])[len(logits[0]) // 2])  # a middle class
    for rule, params in (("epsilon", {"epsilon": 1e-9}), ("rlrp", {})):
        compiled = compile_zoo(z, rule, **params)
        out = explain(compiled, z, x, target=target)
        np.testing.assert_array_equal(out["explained_class"], np.full(len(x), target))
        check_against_graph_reference(graph_reference(name, bias=False), compiled, x, out, rule, **params)
        r = out["relevance"].reshape(len(x), -1)
        if rule == "rlrp":
            np.testing.assert_allclose(np.abs(r).sum(1), np.abs(logits[:, target]), rtol=1e-4)
        else:
            np.testing.assert_allclose(r.sum(1), logits[:, target], rtol=1e-3, atol=1e-5)


def test_zoo_files_are_old_style():
    """The fixtures really are what the old converters wrote (guards against a helper drifting)."""
    for name, build in zm.ZOO.items():
        model = build().model
        opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
        assert 7 <= opset <= 9, name
        if model.ir_version < 4:
            inputs = {v.name for v in model.graph.input}
            assert all(t.name in inputs for t in model.graph.initializer), name
    ops = {n.op_type for build in zm.ZOO.values() for n in build().model.graph.node}
    assert {"LRN", "Dropout", "Sum", "Concat", "BatchNormalization", "Unsqueeze", "ConstantOfShape", "Cast",
            "Transpose", "Reshape", "AveragePool", "GlobalAveragePool", "MaxPool", "Gemm", "Softmax"} <= ops


# ---------------------------------------------------------------- regressions, minimal

def _ir3_model(opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = onnx.numpy_helper.from_array(np.zeros(4, np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)], "ir3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=3)


def test_ir3_initializer_inputs_below_opset_13():
    """An IR-3 file (every initializer also a graph input, as the 2017-2018 zoo files are) at opset 7. Until
    d486035: 'cannot upgrade the model from opset 7 to 13: Input W is undefined!' (the initializers were taken out
    of graph.input while the model still said IR 3, and the version converter enforces IR 3's rule)."""
    onnxlrp.compile(_ir3_model(13), "epsilon")
    onnxlrp.compile(_ir3_model(7), "epsilon")


def test_softmax_on_4d_tensor_below_opset_13():
    """squeezenet1.1's tail (GlobalAveragePool -> Softmax on [N, C, 1, 1], opset 7): the opset-13 upgrade writes
    Flatten -> Softmax -> Reshape. Until d486035 the Softmax stayed on the relevance path ('no relevance rule')."""
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["pool"]), helper.make_node("Softmax", ["pool"], ["prob"])],
        "sq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=4)
    compiled = onnxlrp.compile(model, "epsilon")
    assert dict((p.key, p.value) for p in compiled.metadata_props)["onnxlrp.explained"] != "prob"
