"""Weight expressions (onnxlrp/weights.py): the ONNX ops each one emits compute, in onnxruntime, the numpy formula of
the transform it stands for, and so does its float64 value; onnxruntime folds them all when it creates a session."""

import netspec as ns
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import reference as ref
from helpers import assert_close_relative, session
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from onnxlrp.builder import GraphBuilder
from onnxlrp.rules import neg, pos
from onnxlrp.weights import Weight, concat, flip, ones_like, reshape, transpose

RNG = np.random.default_rng(50)
W = RNG.normal(size=(6, 4, 3, 2)).astype(np.float32)  # conv-shaped [Cout, Cin, kh, kw]
S = RNG.uniform(-1.5, 1.5, size=(6, 1, 1, 1))  # per-output-channel factors of both signs (a folded BatchNorm)
W64, SW = W.astype(np.float64), W.astype(np.float64) * S


def swap_flip(a):
    return np.flip(a.swapaxes(0, 1), axis=(2, 3))


def cases():
    """(name, expression over the initializer "W", the numpy formula of its value)"""
    w = Weight.initializer("W", W, readable=True)
    sw = w * S
    gamma = 0.25
    return [
        ("scaled", sw, SW),
        ("scale of a scale", 2.0 * (w * S) * 0.5, SW),
        ("positive part", pos(sw), np.maximum(SW, 0)),
        ("negative part", neg(sw), np.minimum(SW, 0)),
        ("gamma plus", sw + gamma * pos(sw), SW + gamma * np.maximum(SW, 0)),
        ("gamma minus", sw + gamma * neg(sw), SW + gamma * np.minimum(SW, 0)),
        ("minus gamma minus", -(sw + gamma * neg(sw)), -(SW + gamma * np.minimum(SW, 0))),
        ("square", sw ** 2, SW ** 2),
        ("stack", concat([pos(sw), neg(sw)], 0), np.concatenate([np.maximum(SW, 0), np.minimum(SW, 0)])),
        ("scaled stack", concat([2.0 * pos(sw), -1.0 * neg(sw)], 0),
         np.concatenate([2 * np.maximum(SW, 0), -np.minimum(SW, 0)])),
        ("flipped kernel", flip(transpose(sw, (1, 0, 2, 3)), (2, 3)), swap_flip(SW)),
        ("flipped stack", flip(transpose(concat([2.0 * pos(sw), -1.0 * neg(sw)], 0), (1, 0, 2, 3)), (2, 3)),
         swap_flip(np.concatenate([2 * np.maximum(SW, 0), -np.minimum(SW, 0)]))),
        ("flip twice", flip(flip(sw, (2, 3)), (2,)), np.flip(SW, axis=3)),
        ("transpose twice", transpose(transpose(sw, (1, 0, 2, 3)), (0, 1, 3, 2)), SW.transpose(1, 0, 3, 2)),
        ("grouped swap", reshape(transpose(reshape(sw, (2, 3, 4, 3, 2)), (0, 2, 1, 3, 4)), (8, 3, 3, 2)),
         SW.reshape(2, 3, 4, 3, 2).swapaxes(1, 2).reshape(8, 3, 3, 2)),
        ("ones", flip(transpose(ones_like(sw), (1, 0, 2, 3)), (2, 3)), np.ones((4, 6, 3, 2))),
        ("dense transpose", (Weight.initializer("W", W, readable=True).T * 3.0).T, W64 * 3.0),
    ]


@pytest.mark.parametrize("name,expression,expected", cases(), ids=[c[0] for c in cases()])
def test_expression_computes_its_formula(name, expression, expected):
    assert expression.shape == expected.shape
    np.testing.assert_allclose(expression.value, expected, rtol=1e-15, atol=0)
    graph = helper.make_graph([], "weights", [], [], initializer=[numpy_helper.from_array(W, "W")])
    b = GraphBuilder(graph)
    out = expression.emit(b, "out")
    b.commit()
    graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # float32 ops: the gamma forms round (1 + gamma) s W and its product with 1 / (1 + gamma) (a few ulps)
    np.testing.assert_allclose(sess.run(None, {})[0], expected.astype(np.float32), rtol=3e-7, atol=1e-30)


def test_equal_expressions_share_one_tensor():
    """``[W+; W-]`` for the forward product and ``[2 W+; -W-]`` for the transposed one: the second is the first
    times per-channel factors, so W+ and W- are computed once and the join once."""
    w = Weight.initializer("W", W, readable=True) * S
    graph = helper.make_graph([], "weights", [], [], initializer=[numpy_helper.from_array(W, "W")])
    b = GraphBuilder(graph)
    concat([pos(w), neg(w)], 0).emit(b, "forward")
    concat([2.0 * pos(w), -1.0 * neg(w)], 0).emit(b, "backward")
    assert sorted(n.op_type for n in b.nodes) == ["Concat", "Min", "Mul", "Mul", "Relu"]


@pytest.mark.parametrize("rule", ["epsilon", "alpha-beta", "epsilon-gamma-box", "epsilon-plus-flat", "wsquare"])
def test_onnxruntime_folds_every_weight_op(rule, tmp_path):
    """At ORT_ENABLE_BASIC (and above, the default) the optimized graph has no node left that reads only constants:
    every weight op became an initializer when the session was created."""
    rng = np.random.default_rng(51)
    layers = [ns.conv(rng, 3, 16, 3, pad=1), ns.batchnorm(rng, 16), ns.Relu(),
              ns.conv(rng, 16, 16, 3, pad=1, groups=2), ns.batchnorm(rng, 16), ns.Relu(),
              ns.conv(rng, 16, 16, 3, stride=2, pad=1), ns.Relu(), ns.Flatten(), ns.dense(rng, 16 * 3 * 3, 4)]
    compiled = onnxlrp.compile(ns.to_onnx(layers, (1, 3, 6, 6)), rule)
    inputs = {v.name for v in compiled.graph.input}
    initial = {t.name for t in compiled.graph.initializer} - inputs
    assert any(n.input and all(i in initial for i in n.input if i) for n in compiled.graph.node)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(compiled.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    constants = {t.name for t in optimized.graph.initializer} - inputs
    left = [n.op_type for n in optimized.graph.node if n.input and all(i in constants for i in n.input if i)]
    assert left == []


def test_weights_that_are_graph_inputs_are_copied_once(tmp_path):
    """An initializer that is also a graph input (IR >= 4) is a default a caller may override, and onnxruntime folds
    no op that reads it: the rules get one float32 copy of its default (the value the compile-time analysis saw),
    their ops on the copy fold, and the relevance equals the float64 reference."""
    rng = np.random.default_rng(52)
    layers = [ns.conv(rng, 3, 8, 3, pad=1), ns.Relu(), ns.conv(rng, 8, 8, 3, pad=1), ns.Relu(), ns.Flatten(),
              ns.dense(rng, 8 * 4 * 4, 4)]
    model = ns.to_onnx(layers, (2, 3, 4, 4))
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    compiled = onnxlrp.compile(model, "epsilon-alpha2-beta1")
    weights = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer if len(t.dims) > 1}
    copies = [t.name for t in compiled.graph.initializer if numpy_helper.to_array(t).tobytes() in weights.values()]
    assert len(copies) == 2 * len(weights)  # each weight once as the model's and once as the rules' copy
    x = rng.uniform(0.0, 1.0, size=(2, 3, 4, 4))
    relevance = session(compiled).run(["relevance"], {"x": x.astype(np.float32)})[0]
    assert_close_relative(relevance, ref.lrp(layers, x, ["alphabeta", "alphabeta", "epsilon"]), 1e-5)
