"""Every node of a compiled graph states its attributes (onnxlrp/attributes.py), and no ConvTranspose has a form
that onnxruntime-web computes wrong (docs/onnxruntime-web-webgpu.md)."""

import netspec as ns
import numpy as np
import onnx
import pytest
import reference as ref
from helpers import assert_close_relative, explain, session
from netspec import Flatten, MaxPool, Relu
from onnx import AttributeProto, defs, numpy_helper
from spec_zoo import ZOO

import onnxlrp
from onnxlrp.layers import miscomputed_on_the_web
from onnxlrp.runtime import with_target

WINDOW_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"}


def stated_defaults(op_type: str, opset: int) -> set[str]:
    schema = defs.get_schema(op_type, opset, "")
    return {name for name, a in schema.attributes.items() if a.default_value.type != AttributeProto.UNDEFINED
            and not (a.default_value.type == AttributeProto.INTS and not a.default_value.ints)}


def missing_attributes(model: onnx.ModelProto) -> list[str]:
    """``node: attribute`` for every attribute a backend would have to default."""
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    missing = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        given = {a.name: a for a in node.attribute}
        wanted = stated_defaults(node.op_type, opset)
        if node.op_type in WINDOW_OPS:
            wanted |= {"strides", "dilations", "pads"} & set(defs.get_schema(node.op_type, opset, "").attributes)
            if node.op_type in ("Conv", "ConvTranspose") and node.input[1] in weights:
                wanted.add("kernel_shape")
                rank = len(weights[node.input[1]]) - 2
                missing += [f"{node.name}: {name} of rank {len(given[name].ints)}" for name in ("strides", "pads")
                            if name in given and len(given[name].ints) != rank * (1 + (name == "pads"))]
        missing += [f"{node.name}: {name}" for name in sorted(wanted - set(given))]
    return missing


@pytest.mark.parametrize("rule", ["epsilon", "rlrp", "epsilon-alpha2-beta1"])
@pytest.mark.parametrize("net", ["cnn", "maxpool", "maxpool_tiles", "avgpool", "residual", "depthwise_strided",
                                 "conv1d", "conv3d"])
def test_every_node_states_its_attributes(net, rule):
    layers, shape = ZOO[net](np.random.default_rng(7))
    compiled = onnxlrp.compile(ns.to_onnx(layers, shape), rule)
    assert missing_attributes(compiled) == []


def test_a_source_conv_without_attributes_gets_them_and_keeps_its_outputs():
    """A forward Conv and MaxPool that rely on the defaults (no strides, pads, dilations, kernel_shape) run with
    them written out: the compiled model's outputs equal the source's bit for bit."""
    rng = np.random.default_rng(3)
    layers = [ns.conv(rng, 2, 3, 3), MaxPool((2, 2), (1, 1)), ns.conv(rng, 3, 2, 1)]
    model = ns.to_onnx(layers + [ns.Flatten(), ns.dense(rng, 2 * 3 * 3, 3)], (2, 2, 6, 6))
    for node in model.graph.node:
        if node.op_type in ("Conv", "MaxPool"):
            kept = [a for a in node.attribute if node.op_type == "MaxPool" and a.name == "kernel_shape"]
            del node.attribute[:]
            node.attribute.extend(kept)
    source_node = next(n for n in model.graph.node if n.op_type == "Conv")
    assert not source_node.attribute
    compiled = onnxlrp.compile(model, "epsilon")
    assert missing_attributes(compiled) == []
    conv = next(n for n in compiled.graph.node if n.name == source_node.name)
    assert {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute} == {
        "auto_pad": b"NOTSET", "group": 1, "strides": [1, 1], "dilations": [1, 1], "pads": [0, 0, 0, 0],
        "kernel_shape": [3, 3]}
    x = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    sess = session(compiled)
    got = sess.run([model.graph.output[0].name], with_target(sess, {"x": x}))[0]
    np.testing.assert_array_equal(got, session(model).run(None, {"x": x})[0])



def convtranspose_forms(model: onnx.ModelProto) -> list[tuple[int, int, int]]:
    """(input channels per group, output channels per group, group) of every ConvTranspose."""
    weights = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    forms = []
    for node in model.graph.node:
        if node.op_type == "ConvTranspose":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            cin, cout_g = weights[node.input[1]][:2]
            forms.append((cin // group, cout_g, group))
    return forms


def grouped_conv_forms(model: onnx.ModelProto) -> list[tuple[int, int]]:
    """(output channels per group, group) of every grouped Conv that the compiler emitted."""
    weights = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    forms = []
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and node.name.startswith("lrp/") and group > 1 and node.input[1] in weights:
            forms.append((weights[node.input[1]][0] // group, group))
    return forms


def web_forms():
    """Layers whose transposed products have the forms onnxruntime-web miscomputes: max pools with 3x3 windows
    (once a grouped Conv with 9 taps per channel) and 2x2 windows that overlap (one-hot scatter: 4 input channels
    per output), a 1x1 convolution with padding and two filters per
    input channel (a real ConvTranspose, 2 inputs per output, 4 groups), and a grey first layer with two filters
    (ungrouped, 2 inputs per output: the JSEP kernels' case)."""
    rng = np.random.default_rng(11)
    return {
        "overlapping_3x3_pool": ([ns.conv(rng, 2, 3, 3, pad=1), Relu(), MaxPool((3, 3), (2, 2), (1, 1, 1, 1)),
                                  Flatten(), ns.dense(rng, 3 * 3 * 3, 3)], (2, 2, 5, 5)),
        "overlapping_2x2_pool": ([ns.conv(rng, 2, 3, 3, pad=1), Relu(), MaxPool((2, 2), (1, 1)), Flatten(),
                                  ns.dense(rng, 3 * 4 * 4, 3)], (2, 2, 5, 5)),
        "channel_multiplier_2": ([ns.conv(rng, 2, 4, 3, pad=1), Relu(), ns.conv(rng, 4, 8, 1, pad=1, groups=4),
                                  Relu(), Flatten(), ns.dense(rng, 8 * 7 * 7, 3)], (2, 2, 5, 5)),
        "grey_two_filters": ([ns.conv(rng, 1, 2, 3, pad=1), Relu(), Flatten(), ns.dense(rng, 2 * 5 * 5, 3)],
                             (2, 1, 5, 5)),
    }


@pytest.mark.parametrize("rule", ["epsilon", "alpha-beta"])
@pytest.mark.parametrize("case", list(web_forms()))
def test_no_convtranspose_that_onnxruntime_web_miscomputes(case, rule):
    """The equivalent that replaces them (a depthwise ConvTranspose and each group's sum) gives the reference's
    relevance."""
    layers, shape = web_forms()[case]
    model = ns.to_onnx(layers, shape)
    compiled = onnxlrp.compile(model, rule)
    assert not [form for form in convtranspose_forms(compiled) if miscomputed_on_the_web(*form)]
    # onnxruntime-web's WebGPU kernels also miscompute grouped Convs with 5-7, 9-11, 13-15... outputs per group
    assert not [form for form in grouped_conv_forms(compiled) if form[0] > 4 and form[0] % 4]
    x = np.random.default_rng(12).normal(size=shape)
    _, relevance, _ = explain(model, x, rule)
    assert_close_relative(relevance, ref.lrp(layers, x, rule), 1e-5)


def test_the_replaced_forms_are_the_measured_ones():
    """The forms measured wrong in onnxruntime-web 1.30 (docs/onnxruntime-web-webgpu.md) and right ones."""
    wrong = [(2, 1, 4), (4, 1, 4), (6, 1, 4), (8, 1, 4), (4, 1, 32), (2, 1, 1)]
    right = [(3, 1, 4), (5, 1, 4), (1, 1, 4), (2, 2, 2), (2, 3, 4), (16, 1, 1), (32, 1, 1), (3, 1, 1)]
    assert all(miscomputed_on_the_web(*form) for form in wrong)
    assert not any(miscomputed_on_the_web(*form) for form in right)
