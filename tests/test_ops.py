"""Every op the compiler handles, checked against an independent computation.

Ops the numpy reference has no layer for are checked in two ways:
- re-indexing ops inserted in pairs that cancel (Transpose/Transpose, Pad/Slice, Split/Concat, ...) must leave the
  relevance of the reference network unchanged;
- activations and Gemm/Conv variants are compared with numpy formulas written in this file.
"""

import netspec as ns
import numpy as np
import pytest
import reference as ref
from helpers import assert_close_relative, session
from onnx import TensorProto, helper, numpy_helper
from spec_zoo import ZOO

import onnxlrp
from onnxlrp.runtime import with_target


def spliced(model, after: str, nodes, new_inputs=()):
    """Insert ``nodes`` (reading ``after``, ending in ``after + '/back'``) behind the tensor ``after``."""
    graph = model.graph
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == after:
                node.input[i] = after + "/back"
    position = next(i for i, n in enumerate(graph.node) if after in n.output) + 1
    for k, node in enumerate(nodes):
        graph.node.insert(position + k, node)
    graph.initializer.extend(new_inputs)
    return model


def first_output(model, op_type):
    return next(n.output[0] for n in model.graph.node if n.op_type == op_type)


def relevance_of(model, x, rule="epsilon", **params):
    sess = session(onnxlrp.compile(model, rule, **params))
    return sess.run(["relevance"], with_target(sess, {sess.get_inputs()[0].name: x.astype(np.float32)}))[0]


def i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


CANCELLING = {
    "transpose": lambda t: ([helper.make_node("Transpose", [t], [t + "/t"], perm=[0, 2, 3, 1]),
                             helper.make_node("Transpose", [t + "/t"], [t + "/back"], perm=[0, 3, 1, 2])], []),
    "reshape": lambda t: ([helper.make_node("Reshape", [t, "flat_shape"], [t + "/r"]),
                           helper.make_node("Reshape", [t + "/r", "back_shape"], [t + "/back"])],
                          [i64("flat_shape", [0, -1]), i64("back_shape", [0, 4, 6, 6])]),
    "unsqueeze-squeeze": lambda t: ([helper.make_node("Unsqueeze", [t, "ax"], [t + "/u"]),
                                     helper.make_node("Squeeze", [t + "/u", "ax"], [t + "/back"])], [i64("ax", [2])]),
    "pad-slice": lambda t: ([helper.make_node("Pad", [t, "pads"], [t + "/p"]),
                             helper.make_node("Slice", [t + "/p", "st", "en", "axs"], [t + "/back"])],
                            [i64("pads", [0, 0, 1, 2, 0, 0, 2, 1]), i64("st", [1, 2]), i64("en", [7, 8]),
                             i64("axs", [2, 3])]),
    "split-concat": lambda t: ([helper.make_node("Split", [t, "sizes"], [t + "/a", t + "/b"], axis=1),
                                helper.make_node("Concat", [t + "/a", t + "/b"], [t + "/back"], axis=1)],
                               [i64("sizes", [1, 3])]),
    "mul-div-const": lambda t: ([helper.make_node("Mul", [t, "c"], [t + "/m"]),
                                 helper.make_node("Div", [t + "/m", "c"], [t + "/back"])],
                                [numpy_helper.from_array(np.float32(4.0), "c")]),
    "add-sub-const": lambda t: ([helper.make_node("Add", [t, "c"], [t + "/a"]),
                                 helper.make_node("Sub", [t + "/a", "c"], [t + "/back"])],
                                [numpy_helper.from_array(np.full((4, 1, 1), 0.5, np.float32), "c")]),
    "identity-dropout": lambda t: ([helper.make_node("Identity", [t], [t + "/i"]),
                                    helper.make_node("Dropout", [t + "/i"], [t + "/back"])], []),
}


@pytest.mark.parametrize("rule", ["epsilon", "rlrp"])
@pytest.mark.parametrize("pair", list(CANCELLING))
def test_reindexing_ops_map_relevance_back(pair, rule):
    """A cancelling pair after the first ReLU of the "cnn" net (4 x 6 x 6) leaves the relevance unchanged."""
    rng = np.random.default_rng(40)
    layers, shape = ZOO["cnn"](rng)
    x = rng.normal(size=shape)
    model = ns.to_onnx(layers, shape)
    nodes, inits = CANCELLING[pair](first_output(model, "Relu"))
    changed = relevance_of(spliced(model, first_output(model, "Relu"), nodes, inits), x, rule)
    expected = ref.lrp(layers, x, "epsilon") if rule == "epsilon" else ref.rlrp(layers, x)
    assert_close_relative(changed, expected, 1e-5 if rule == "epsilon" else 1e-4)


ACTIVATIONS = {
    "LeakyRelu": (dict(alpha=0.1), lambda z: np.where(z > 0, z, 0.1 * z)),
    "Clip": (None, lambda z: np.clip(z, 0, 6)),
    "Sigmoid": ({}, lambda z: 1 / (1 + np.exp(-z))),
    "Tanh": ({}, np.tanh),
    "Elu": ({}, lambda z: np.where(z > 0, z, np.expm1(z))),
    "Gelu": ({}, None),
    "Softplus": ({}, lambda z: np.log1p(np.exp(z))),
}


@pytest.mark.parametrize("op", list(ACTIVATIONS))
def test_activations_pass_relevance(op):
    """dense -> activation -> dense, epsilon rule written out in numpy: the activation passes R unchanged."""
    rng = np.random.default_rng(41)
    w1, b1, w2, b2 = rng.normal(size=(5, 6)), rng.normal(size=6), rng.normal(size=(6, 3)), rng.normal(size=3)
    x = rng.normal(size=(4, 5))
    attrs, fn = ACTIVATIONS[op]
    inputs = ["z1"] + (["lo", "hi"] if op == "Clip" else [])
    act = helper.make_node(op, inputs, ["a"], **(attrs or {}))
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"]), act, helper.make_node("Gemm", ["a", "w2", "b2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in
         dict(w1=w1, b1=b1, w2=w2, b2=b2, lo=np.float32(0), hi=np.float32(6)).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    w1, b1, w2, b2 = (v.astype(np.float32).astype(np.float64) for v in (w1, b1, w2, b2))
    x = x.astype(np.float32).astype(np.float64)
    z1 = x @ w1 + b1
    a = fn(z1) if fn else 0.5 * z1 * (1 + np.vectorize(__import__("math").erf)(z1 / np.sqrt(2)))
    z2 = a @ w2 + b2
    r2 = np.zeros_like(z2)
    cls = z2.argmax(1)
    r2[np.arange(len(x)), cls] = z2[np.arange(len(x)), cls]
    r_a = a * ((r2 / ref.stab(z2)) @ w2.T)
    expected = x * ((r_a / ref.stab(z1)) @ w1.T)  # R(a) passes to z1 unchanged
    assert_close_relative(relevance_of(model, x), expected, 1e-4)


def test_gemm_alpha_beta_trans_a_and_auto_pad_and_reduce_mean():
    """Gemm with alpha, beta, transA and transB=0; Conv with auto_pad SAME_UPPER; ReduceMean over space."""
    rng = np.random.default_rng(42)
    wc, bc = rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3)
    wd, bd = rng.normal(size=(3, 4)), rng.normal(size=4)
    x = rng.normal(size=(2, 2, 5, 5))
    nodes = [helper.make_node("Conv", ["x", "wc", "bc"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=0),
             helper.make_node("Transpose", ["m"], ["mt"], perm=[1, 0]),
             helper.make_node("Gemm", ["mt", "wd", "bd"], ["y"], alpha=0.5, beta=2.0, transA=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in
                               dict(wc=wc, bc=bc, wd=wd, bd=bd).items()] + [i64("axes", [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    # the same network as reference layers: SAME_UPPER on 5 with k=3, s=2 -> pads 1/1; ReduceMean = global average
    wc, bc, wd, bd = (v.astype(np.float32).astype(np.float64) for v in (wc, bc, wd, bd))
    layers = [ns.Conv(wc, bc, strides=(2, 2), pads=(1, 1, 1, 1)), ns.Relu(), ns.GlobalAvgPool(), ns.Flatten(),
              ns.Dense(0.5 * wd.T, 2.0 * bd)]
    x = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(session(model).run(None, {"x": x.astype(np.float32)})[0], ref.forward(layers, x),
                               rtol=1e-5, atol=1e-5)
    for rule, expected in (("epsilon", ref.lrp(layers, x, "epsilon")), ("zplus", ref.lrp(layers, x, "zplus")),
                           ("rlrp", ref.rlrp(layers, x))):
        assert_close_relative(relevance_of(model, x, rule), expected, 1e-4 if rule == "rlrp" else 1e-5)
