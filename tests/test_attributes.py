"""Every node of a compiled graph states its attributes (onnxlrp/attributes.py)."""

import netspec as ns
import numpy as np
import onnx
import pytest
from helpers import session
from netspec import MaxPool
from onnx import AttributeProto, defs
from spec_zoo import ZOO

import onnxlrp
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

