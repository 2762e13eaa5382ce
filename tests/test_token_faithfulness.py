"""The AttnLRP paper's faithfulness test for token models (:mod:`onnxlrp.apps.token_faithfulness`) against a numpy
re-implementation on a hand-built token model, and on the tiny BERT of the transformer tests."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxlrp
from onnxlrp.apps.token_faithfulness import token_faithfulness
from onnxlrp.errors import OnnxlrpError

N, TOKENS, VOCAB, HIDDEN, CLASSES = 3, 6, 13, 5, 4
STEPS = 4


def stab(z, eps=1e-6):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def parameters():
    rng = np.random.default_rng(5)
    return (rng.normal(size=(VOCAB, HIDDEN)), rng.normal(0, 0.5, (TOKENS, HIDDEN)),
            rng.normal(0, 0.5, (CLASSES, HIDDEN)))


def token_model():
    """``ids`` -> word embeddings + position embeddings, times the attention mask -> mean over the tokens -> Gemm."""
    table, pos, w = parameters()
    inits = [nh.from_array(table.astype(np.float32), "table"), nh.from_array(pos.astype(np.float32), "pos"),
             nh.from_array(w.astype(np.float32), "W"), nh.from_array(np.array([1], np.int64), "token_axis"),
             nh.from_array(np.array([-1], np.int64), "last")]
    nodes = [h.make_node("Gather", ["table", "ids"], ["emb"], axis=0, name="lookup"),
             h.make_node("Add", ["emb", "pos"], ["with_pos"], name="positions"),
             h.make_node("Cast", ["attention_mask"], ["mask_f"], to=T.FLOAT, name="cast"),
             h.make_node("Unsqueeze", ["mask_f", "last"], ["mask3"], name="unsqueeze"),
             h.make_node("Mul", ["with_pos", "mask3"], ["masked"], name="mask"),
             h.make_node("ReduceMean", ["masked", "token_axis"], ["pooled"], keepdims=0, name="mean"),
             h.make_node("Gemm", ["pooled", "W"], ["logits"], transB=1, name="fc")]
    graph = h.make_graph(nodes, "tokens", [h.make_tensor_value_info("ids", T.INT64, ["N", TOKENS]),
                                           h.make_tensor_value_info("attention_mask", T.INT64, ["N", TOKENS])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", CLASSES])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9)


def feeds():
    rng = np.random.default_rng(6)
    mask = np.ones((N, TOKENS), np.int64)
    mask[1, 4:] = 0  # padding
    return {"ids": rng.integers(0, VOCAB, (N, TOKENS)), "attention_mask": mask}


def reference(ids, mask, steps):
    """float64: the epsilon composite's token relevance (epsilon at the Gemm, Norm at the mean, the position Add an
    offset whose operand carries all of R), then the MoRF/LeRF curves of the explained logit."""
    table, pos, w = parameters()

    def logits(keep):
        masked = (table[ids] * keep[..., None] + pos) * mask[..., None]
        return masked.mean(1) @ w.T, masked

    z, masked = logits(np.ones(ids.shape))
    cls = z.argmax(1)
    r_z = np.zeros_like(z)
    r_z[np.arange(N), cls] = z[np.arange(N), cls]
    pooled = masked.mean(1)
    r_pooled = pooled * ((r_z / stab(z)) @ w)
    relevance = (masked * (r_pooled / stab(pooled))[:, None, :] / TOKENS).sum(-1)
    fractions = np.linspace(0, 1, steps + 1)
    curves = {}
    for label, sign in (("morf", -1), ("lerf", 1)):
        curve = np.zeros((N, steps + 1))
        for s, f in enumerate(fractions):
            keep = np.ones(ids.shape)
            for i in range(N):
                real = np.flatnonzero(mask[i])
                order = real[np.argsort(sign * relevance[i, real], kind="stable")]
                keep[i, order[:int(round(f * len(real)))]] = 0
            curve[:, s] = logits(keep)[0][np.arange(N), cls]
        curves[label] = curve
    area = {k: np.trapezoid(c, fractions, axis=1) for k, c in curves.items()}
    return curves, area


def test_curves_match_numpy():
    f = feeds()
    result = token_faithfulness(onnxlrp.compile(token_model(), "epsilon"), f, steps=STEPS)
    curves, area = reference(f["ids"], f["attention_mask"], STEPS)
    np.testing.assert_allclose(result["morf"], curves["morf"].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result["lerf"], curves["lerf"].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result["delta_af_per_sample"], area["lerf"] - area["morf"], rtol=1e-5, atol=1e-5)
    # for this linear model the epsilon relevance is each token's exact contribution: removing the most relevant
    # tokens first must lower the explained logit at least as fast as removing the least relevant ones
    assert np.all(curves["morf"] <= curves["lerf"] + 1e-9) and result["delta_af"] > 0


def test_refuses_a_model_without_token_input():
    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 3])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9)
    with pytest.raises(OnnxlrpError, match="one token input"):
        token_faithfulness(onnxlrp.compile(model, "epsilon"), {"x": np.ones((1, 3), np.float32)})


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_tiny_bert(rule):
    """The tiny BERT of the transformer tests (padding in its samples): finite curves that start at the model's
    logit of the explained class and end, all real tokens removed, at one value for MoRF and LeRF."""
    pytest.importorskip("transformers", reason="needs Hugging Face transformers")
    import transformer_models as tm
    from helpers import session

    model = tm.exported("bert", "ts", 17, "eager")
    inputs = dict(tm.build("bert", "eager").inputs)
    result = token_faithfulness(onnxlrp.compile(model, rule), inputs, steps=5)
    assert np.all(np.isfinite(result["morf"])) and np.all(np.isfinite(result["lerf"]))
    logits = session(model).run(["logits"], inputs)[0]
    start = logits[np.arange(len(logits)), result["explained_class"]].mean()
    assert result["morf"][0] == pytest.approx(start, rel=1e-5) and result["lerf"][0] == pytest.approx(start, rel=1e-5)
    assert result["morf"][-1] == pytest.approx(result["lerf"][-1], rel=1e-5)
