"""``--node-input TENSOR`` / ``node_input=``: relevance with respect to an intermediate tensor (a spectrogram behind an
STFT front-end, an embedding behind a token lookup) instead of the graph inputs; the nodes before it need no rule, and
the relevance output has that tensor's shape. References: the epsilon rule and R-LRP (Eq. 8) in float64 numpy on the
tensor's forward value."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import zoo_models as zm
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxlrp
from onnxlrp.cli import main
from onnxlrp.errors import OnnxlrpError, UnsupportedOpError

EPS = 1e-6
FRAMES, BINS = 7, 9  # STFT of 64 samples, frame length 16, step 8: 7 frames of 16 // 2 + 1 = 9 bins
RNG = np.random.default_rng(0)
W1 = RNG.normal(0, 0.2, (8, FRAMES * BINS)).astype(np.float32)
W2 = RNG.normal(0, 0.5, (4, 8)).astype(np.float32)


def audio_model() -> onnx.ModelProto:
    """``wave [N, 64, 1]`` -> STFT -> power (ReduceSumSquare) -> log -> ``spec [N, 7, 9]`` -> Flatten -> Gemm ->
    Relu -> Gemm -> ``logits``. STFT, ReduceSumSquare and Log have no LRP rule: only ``spec`` can be explained."""
    nodes = [h.make_node("STFT", ["wave", "step", "window"], ["stft"], onesided=1, name="stft"),
             h.make_node("ReduceSumSquare", ["stft", "last"], ["power"], keepdims=0, name="power"),
             h.make_node("Add", ["power", "floor"], ["power_floor"]),
             h.make_node("Log", ["power_floor"], ["spec"], name="log"),
             h.make_node("Flatten", ["spec"], ["flat"]),
             h.make_node("Gemm", ["flat", "W1"], ["z"], transB=1, name="fc1"),
             h.make_node("Relu", ["z"], ["hid"]),
             h.make_node("Gemm", ["hid", "W2"], ["logits"], transB=1, name="fc2")]
    inits = [nh.from_array(np.array(8, np.int64), "step"), nh.from_array(np.hanning(16).astype(np.float32), "window"),
             nh.from_array(np.array([-1], np.int64), "last"), nh.from_array(np.float32(1.0), "floor"),
             nh.from_array(W1, "W1"), nh.from_array(W2, "W2")]
    graph = h.make_graph(nodes, "audio", [h.make_tensor_value_info("wave", T.FLOAT, ["N", 64, 1])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", 4])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9)


def stab(z):
    return z + EPS * np.where(z >= 0, 1.0, -1.0)


def dense_reference(spec, target, rule):
    """Two dense layers on ``spec`` (float64): epsilon, or R-LRP (Eq. 8, then scaled to ``sum |R| = |logit|``)."""
    flat = spec.reshape(len(spec), -1)
    w1, w2 = W1.astype(np.float64), W2.astype(np.float64)
    z = flat @ w1.T
    hid = np.maximum(z, 0)
    logits = hid @ w2.T
    n = np.arange(len(spec))
    r = np.zeros_like(logits)
    r[n, target] = logits[n, target]
    if rule == "epsilon":
        r_hid = hid * ((r / stab(logits)) @ w2)
        out = flat * ((r_hid / stab(z)) @ w1)
    else:
        z_hid = hid * (r @ w2) / w2.shape[1]
        out = flat * (z_hid @ w1) / w1.shape[1]
        out *= (np.abs(logits[n, target]) / np.abs(out).sum(1))[:, None]
    return out.reshape(spec.shape)


def waves(n=3):
    return np.random.default_rng(1).normal(size=(n, 64, 1)).astype(np.float32)


def test_front_end_without_rule_is_refused_without_node_input():
    with pytest.raises(UnsupportedOpError, match=r"STFT x1 \(stft: no relevance rule"):
        onnxlrp.compile(audio_model(), "epsilon")


@pytest.mark.parametrize("rule", ["epsilon", "rlrp", "epsilon-plus-flat"])
def test_spectrogram_behind_an_stft(rule):
    model = audio_model()
    x = waves()
    logits, spec = zm.run_source(model, {"wave": x}, ["logits", "spec"])
    compiled = onnxlrp.compile(model, rule, node_input="spec")
    assert [o.name for o in compiled.graph.output] == ["logits", "relevance", "explained_class"]
    declared = [d.dim_param or d.dim_value for d in compiled.graph.output[1].type.tensor_type.shape.dim]
    assert declared[1:] == [FRAMES, BINS]
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert json.loads(meta["onnxlrp.relevance_of"]) == {"relevance": "spec"}
    out = zm.run_compiled(compiled, {"wave": x})
    np.testing.assert_array_equal(out["logits"], logits)
    relevance = out["relevance"]
    assert relevance.shape == spec.shape and np.isfinite(relevance).all() and np.abs(relevance).sum() > 0
    if rule != "epsilon-plus-flat":
        expected = dense_reference(spec.astype(np.float64), out["explained_class"], rule)
        np.testing.assert_allclose(relevance, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_inspect_and_cli(tmp_path, capsys):
    path = tmp_path / "audio.onnx"
    onnx.save(audio_model(), path)
    plan = onnxlrp.inspect(path, "epsilon", node_input="spec")
    assert plan.inputs == ["spec"] and plan.unsupported == [] and set(plan.rules) == {"fc1", "fc2"}
    assert main(["inspect", str(path), "--rule", "epsilon", "--node-input", "spec"]) == 0
    assert "relevance inputs: spec" in capsys.readouterr().out
    out = tmp_path / "audio.epsilon.onnx"
    assert main(["compile", str(path), "--rule", "epsilon", "--node-input", "spec", "-o", str(out)]) == 0
    result = onnxlrp.Explainer(str(out), providers=["CPUExecutionProvider"])(waves())
    assert result.relevance.shape == (3, FRAMES, BINS)


def token_model() -> onnx.ModelProto:
    """``ids`` (int64 [N, 5]) -> Gather from a table -> ``emb [N, 5, 6]`` -> ReduceMean over the tokens -> Gemm."""
    rng = np.random.default_rng(2)
    inits = [nh.from_array(rng.normal(size=(11, 6)).astype(np.float32), "table"),
             nh.from_array(rng.normal(0, 0.5, (3, 6)).astype(np.float32), "W"),
             nh.from_array(np.array([1], np.int64), "token_axis")]
    nodes = [h.make_node("Gather", ["table", "ids"], ["emb"], axis=0, name="lookup"),
             h.make_node("ReduceMean", ["emb", "token_axis"], ["pooled"], keepdims=0, name="mean"),
             h.make_node("Gemm", ["pooled", "W"], ["logits"], transB=1, name="fc")]
    graph = h.make_graph(nodes, "tokens", [h.make_tensor_value_info("ids", T.INT64, ["N", 5])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", 3])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9)


def test_embedding_behind_a_token_lookup():
    """No float input at all: with ``node_input`` the relevance has the embedding's shape and, for the Norm rule at
    the mean and epsilon at the dense layer, equals the float64 reference; without it, ``ids`` is a token input and
    ``relevance.ids`` is that relevance summed over the hidden axis."""
    model = token_model()
    ids = np.array([[1, 2, 3, 4, 5], [0, 0, 7, 10, 2]], np.int64)
    emb, logits = zm.run_source(model, {"ids": ids}, ["emb", "logits"])
    out = zm.run_compiled(onnxlrp.compile(model, "epsilon", node_input="emb"), {"ids": ids})
    np.testing.assert_array_equal(out["logits"], logits)
    w = nh.to_array(model.graph.initializer[1]).astype(np.float64)
    e = emb.astype(np.float64)
    pooled = e.mean(1)
    z = pooled @ w.T
    r = np.zeros_like(z)
    r[np.arange(2), out["explained_class"]] = z[np.arange(2), out["explained_class"]]
    r_pooled = pooled * ((r / stab(z)) @ w)
    expected = e * (r_pooled / stab(pooled))[:, None, :] / 5  # Norm at the mean: x * W^T (R / stab(z))
    np.testing.assert_allclose(out["relevance"], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    tokens = zm.run_compiled(onnxlrp.compile(model, "epsilon"), {"ids": ids})
    np.testing.assert_allclose(tokens["relevance.ids"], expected.sum(-1), rtol=0,
                               atol=1e-5 * np.abs(expected).max())


def two_branch_model() -> onnx.ModelProto:
    """``spec`` (as above) and ``energy = ReduceSumSquare(wave, axis 1)`` [N, 1] -> Concat -> Gemm: two node
    inputs."""
    model = audio_model()
    graph = model.graph
    for node in graph.node:
        if node.name == "fc1":
            node.input[0] = "joined"
    graph.node.insert(4, h.make_node("ReduceSumSquare", ["wave", "axes1"], ["energy"], keepdims=0, name="energy"))
    graph.node.insert(6, h.make_node("Concat", ["flat", "energy"], ["joined"], axis=1))
    graph.initializer.append(nh.from_array(np.array([1], np.int64), "axes1"))
    graph.initializer.remove(next(t for t in graph.initializer if t.name == "W1"))
    graph.initializer.append(nh.from_array(np.concatenate([W1, RNG.normal(0, 0.2, (8, 1)).astype(np.float32)], 1),
                                           "W1"))
    return model


def test_two_node_inputs_share_the_relevance():
    model = two_branch_model()
    x = waves()
    compiled = onnxlrp.compile(model, "epsilon", epsilon=1e-9, node_input=["spec", "energy"])
    assert [o.name for o in compiled.graph.output] == ["logits", "relevance.spec", "relevance.energy",
                                                       "explained_class"]
    out = zm.run_compiled(compiled, {"wave": x})
    assert out["relevance.spec"].shape == (3, FRAMES, BINS) and out["relevance.energy"].shape == (3, 1)
    total = out["relevance.spec"].reshape(3, -1).sum(1) + out["relevance.energy"][:, 0]
    np.testing.assert_allclose(total, out["logits"][np.arange(3), out["explained_class"]], rtol=1e-4)


@pytest.mark.parametrize("names,message", [
    (["nowhere"], "'nowhere' is not written by any node"),
    (["W1"], "(it is a constant)"),
    (["spec", "flat"], "'flat' is computed from --node-input 'spec'"),
    (["logits_int"], "is not a float tensor"),
])
def test_bad_node_inputs_are_refused_in_one_line(names, message):
    model = audio_model()
    model.graph.node.append(h.make_node("ArgMax", ["logits"], ["logits_int"], axis=1))
    with pytest.raises(OnnxlrpError) as info:
        onnxlrp.compile(model, "epsilon", node_input=names)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_explain_an_image_model_at_an_inner_tensor(tmp_path, capsys):
    """``explain`` on the bundled digits CNN at the first Relu's output: one ``.npy`` of [32, 26, 26] per image
    and a heatmap drawn without the image under it (other size)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "inner"
    assert main(["explain", str(root / "models" / "digits_cnn.onnx"), str(root / "models" / "samples" / "digit_3.png"),
                 "--rule", "epsilon", "--node-input", "/features/features.1/Relu_output_0", "-o", str(out)]) == 0
    relevance = np.load(out / "digit_3.npy")
    assert relevance.shape == (32, 26, 26) and np.isfinite(relevance).all() and relevance.sum() > 0
    assert (out / "digit_3.png").stat().st_size > 0
