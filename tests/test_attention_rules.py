"""The AttnLRP / CP-LRP rules on hand-built ONNX graphs against the float64 numpy reference
(``attention_reference.py``, written from the equations): softmax inside a network with ``-inf``, large negative and
fully masked rows (behind the NaN guard), matrix products of two activations, LXT's epsilon on linear layers, joins
and offsets, LayerNormalization, RMS norm, gates, token inputs, the sequence position, Gather/Where/Expand, and
the composites' plans."""

from __future__ import annotations

import attention_reference as ref
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

import onnxlrp
from onnxlrp.errors import OnnxlrpError
from onnxlrp.runtime import with_target

N, TOKENS, D, CLASSES = 2, 4, 6, 3
LN_EPS = 1e-5


def init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def model(nodes, inputs, outputs, inits, opset=17):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def run(proto, feeds):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = feeds if "target" in feeds else with_target(session, feeds)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def compiled_run(proto, feeds, rule, **kwargs):
    """The compiled model's outputs; asserts that the original outputs are unchanged."""
    out = run(onnxlrp.compile(proto, rule, **kwargs), feeds)
    for name, value in run(proto, feeds).items():
        np.testing.assert_allclose(out[name], value, rtol=1e-6, atol=1e-6)
    return out


def assert_matches(actual, expected, tol=1e-5):
    assert np.all(np.isfinite(actual)), "non-finite relevance"
    scale = np.abs(expected).max()
    assert scale > 0, "the reference is all zero: the case tests nothing"
    assert np.abs(actual - expected).max() <= tol * scale, np.abs(actual - expected).max() / scale


def seed(logits, target=None):
    cls = logits.argmax(-1) if target is None else target
    return np.eye(logits.shape[-1])[cls] * logits


# ---------------------------------------------------------------- an attention block

MASK = np.array([[0, 0, -np.inf, -3.4028234663852886e38],  # -inf (TorchScript) and dynamo's lowest float
                 [0, 0, 0, 0],
                 [-np.inf] * 4,  # a fully masked row: NaN, then the exporter's guard Where(IsNaN(s), 0, s)
                 [0, -1e4, 0, 0]], dtype=np.float32)


def attention_block(seed_=0):
    """``x -> q, k, v (MatMul + bias) -> softmax(q k^T * scale + mask), guarded -> P v -> + x -> LayerNorm ->
    Flatten -> Gemm``."""
    rng = np.random.default_rng(seed_)
    w = {k: rng.standard_normal((D, D)) / np.sqrt(D) for k in "qkv"}
    b = {k: 0.1 * rng.standard_normal(D) for k in "qkv"}
    params = dict(w=w, b=b, gamma=1 + 0.2 * rng.standard_normal(D), beta=0.1 * rng.standard_normal(D),
                  w_out=rng.standard_normal((CLASSES, TOKENS * D)) / np.sqrt(TOKENS * D),
                  b_out=0.1 * rng.standard_normal(CLASSES), scale=1 / np.sqrt(D))
    inits = [init("mask", MASK), init("scale", params["scale"]), init("zero", 0.0), init("gamma", params["gamma"]),
             init("beta", params["beta"]), init("w_out", params["w_out"]), init("b_out", params["b_out"])]
    nodes = []
    for k in "qkv":
        inits += [init(f"W{k}", w[k]), init(f"b{k}", b[k])]
        nodes += [h.make_node("MatMul", ["x", f"W{k}"], [f"{k}0"], name=f"{k}_proj"),
                  h.make_node("Add", [f"{k}0", f"b{k}"], [k], name=f"{k}_bias")]
    nodes += [h.make_node("Transpose", ["k"], ["kT"], perm=[0, 2, 1], name="k_t"),
              h.make_node("MatMul", ["q", "kT"], ["qk"], name="qk"),
              h.make_node("Mul", ["qk", "scale"], ["scaled"], name="scaling"),
              h.make_node("Add", ["scaled", "mask"], ["logits_att"], name="masking"),
              h.make_node("Softmax", ["logits_att"], ["probs"], axis=-1, name="softmax"),
              h.make_node("IsNaN", ["probs"], ["nan"], name="isnan"),
              h.make_node("Where", ["nan", "zero", "probs"], ["p"], name="guard"),
              h.make_node("MatMul", ["p", "v"], ["ctx"], name="pv"),
              h.make_node("Add", ["ctx", "x"], ["res"], name="residual"),
              h.make_node("LayerNormalization", ["res", "gamma", "beta"], ["ln"], axis=-1, epsilon=LN_EPS,
                          name="ln"),
              h.make_node("Flatten", ["ln"], ["flat"], axis=1, name="flatten"),
              h.make_node("Gemm", ["flat", "w_out", "b_out"], ["logits"], transB=1, name="head")]
    proto = model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [N, TOKENS, D])],
                  [h.make_tensor_value_info("logits", T.FLOAT, [N, CLASSES])], inits)
    return proto, params


def attention_reference(x, p, cp: bool, target=None):
    """Forward and backward of :func:`attention_block` in float64 (CP-LRP: the probabilities are constants)."""
    f32 = {k: {j: np.float32(v).astype(np.float64) for j, v in d.items()} if isinstance(d, dict)
           else np.asarray(d, np.float32).astype(np.float64) for k, d in p.items()}
    q, k, v = (x @ f32["w"][n] + f32["b"][n] for n in "qkv")
    kt = np.swapaxes(k, 1, 2)
    scaled = (q @ kt) * f32["scale"]
    att = scaled + MASK.astype(np.float64)
    probs = np.nan_to_num(ref.forward_softmax(att), nan=0.0)
    ctx = probs @ v
    res = ctx + x
    mean = res.mean(-1, keepdims=True)
    ln = (res - mean) / np.sqrt(((res - mean) ** 2).mean(-1, keepdims=True) + LN_EPS) * f32["gamma"] + f32["beta"]
    flat = ln.reshape(N, -1)
    logits = flat @ f32["w_out"].T + f32["b_out"]
    r = ref.linear(flat, f32["w_out"].T, f32["b_out"], seed(logits, target)).reshape(ln.shape)
    r = ref.layer_norm(res, f32["gamma"], f32["beta"], r, LN_EPS)
    r_ctx, r_x = ref.join([ctx, x], r)
    r_p, r_v = ref.matmul(probs, v, r_ctx, live=(1,) if cp else (0, 1))
    r_x = r_x + ref.linear(x, f32["w"]["v"], f32["b"]["v"], r_v)
    if not cp:
        r_att = ref.softmax(att, probs, r_p)
        with np.errstate(invalid="ignore"):
            (r_scaled, _) = ref.join([scaled, MASK.astype(np.float64) + 0 * scaled], r_att)
        r_scaled = np.nan_to_num(r_scaled, nan=0.0)  # 0 * -inf where R is 0: the masked entries get none
        r_q, r_kt = ref.matmul(q, kt, r_scaled)
        r_x = r_x + ref.linear(x, f32["w"]["q"], f32["b"]["q"], r_q)
        r_x = r_x + ref.linear(x, f32["w"]["k"], f32["b"]["k"], np.swapaxes(r_kt, 1, 2))
    return logits, r_x


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_attention_block_matches_reference(rule):
    proto, params = attention_block()
    x = np.random.default_rng(1).standard_normal((N, TOKENS, D)).astype(np.float32)
    out = compiled_run(proto, {"x": x}, rule)
    logits, expected = attention_reference(x.astype(np.float64), params, cp=rule == "cp-lrp")
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
    assert_matches(out["relevance"], expected)


def test_masked_entries_get_no_relevance_and_no_nan():
    """Entries masked by ``-inf`` or by the lowest float get exactly 0 at the softmax input, the fully masked row
    included; no NaN anywhere although the source's softmax has a NaN row."""
    proto, params = attention_block()
    x = np.random.default_rng(2).standard_normal((N, TOKENS, D)).astype(np.float32)
    compiled = onnxlrp.compile(proto, "attnlrp")
    r_softmax_input = next(n.output[0] for n in compiled.graph.node
                           if n.name.startswith("lrp/softmax/") and n.op_type == "Mul" and "prod" in n.name)
    compiled.graph.output.append(h.make_tensor_value_info(r_softmax_input, T.FLOAT, None))
    out = run(compiled, {"x": x})
    r_att = out[r_softmax_input]
    assert np.all(np.isfinite(r_att)) and np.all(np.isfinite(out["relevance"]))
    masked = np.broadcast_to(MASK < -1e30, r_att.shape)
    assert masked.sum() == N * 6 and np.all(r_att[masked] == 0) and np.abs(r_att[~masked]).max() > 0


# ---------------------------------------------------------------- a gated MLP behind an RMS norm

def gated_mlp(seed_=0):
    rng = np.random.default_rng(seed_)
    p = {"g": rng.standard_normal((D, 2 * D)) / np.sqrt(D), "u": rng.standard_normal((D, 2 * D)) / np.sqrt(D),
         "d": rng.standard_normal((2 * D, CLASSES)) / np.sqrt(2 * D), "bg": 0.1 * rng.standard_normal(2 * D),
         "bu": 0.1 * rng.standard_normal(2 * D), "bd": 0.1 * rng.standard_normal(CLASSES),
         "w": 1 + 0.2 * rng.standard_normal(D)}
    inits = [init(f"W{k}", p[k]) for k in "gud"] + [init(k, p[k]) for k in ("bg", "bu", "bd", "w")] + \
        [init("two", 2.0), init("rms_eps", 1e-6), init("axes", [-1], np.int64)]
    nodes = [h.make_node("Pow", ["x", "two"], ["sq"], name="sq"),
             h.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1, name="ms"),
             h.make_node("Add", ["ms", "rms_eps"], ["ms_eps"], name="ms_eps"),
             h.make_node("Sqrt", ["ms_eps"], ["rms"], name="rms"),
             h.make_node("Reciprocal", ["rms"], ["rrms"], name="rrms"),
             h.make_node("Mul", ["x", "rrms"], ["normed"], name="normed"),
             h.make_node("Mul", ["w", "normed"], ["n"], name="weighted"),
             h.make_node("MatMul", ["n", "Wg"], ["g0"], name="gate_proj"),
             h.make_node("Add", ["g0", "bg"], ["g"], name="gate_bias"),
             h.make_node("Sigmoid", ["g"], ["sig"], name="sigmoid"),
             h.make_node("Mul", ["g", "sig"], ["silu"], name="silu"),
             h.make_node("MatMul", ["n", "Wu"], ["u0"], name="up_proj"),
             h.make_node("Add", ["u0", "bu"], ["u"], name="up_bias"),
             h.make_node("Mul", ["silu", "u"], ["gated"], name="gate"),
             h.make_node("MatMul", ["gated", "Wd"], ["d0"], name="down_proj"),
             h.make_node("Add", ["d0", "bd"], ["logits"], name="down_bias")]
    proto = model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [N, D])],
                  [h.make_tensor_value_info("logits", T.FLOAT, [N, CLASSES])], inits, opset=18)
    return proto, {k: np.asarray(v, np.float32).astype(np.float64) for k, v in p.items()}


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_gated_mlp_matches_reference(rule):
    """RMS norm: identity (Prop. 3.4); SiLU: identity; the gate: uniform (AttnLRP Prop. 3.2) or all to the up
    projection (CP-LRP)."""
    proto, p = gated_mlp()
    x = np.random.default_rng(3).standard_normal((N, D)).astype(np.float32)
    out = compiled_run(proto, {"x": x}, rule)
    x64 = x.astype(np.float64)
    n = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * p["w"]
    g, u = n @ p["g"] + p["bg"], n @ p["u"] + p["bu"]
    silu = g / (1 + np.exp(-g))
    logits = (silu * u) @ p["d"] + p["bd"]
    r = ref.linear(silu * u, p["d"], p["bd"], seed(logits))
    r_g, r_u = (r / 2, r / 2) if rule == "attnlrp" else (0 * r, r)
    expected = ref.linear(n, p["g"], p["bg"], r_g) + ref.linear(n, p["u"], p["bu"], r_u)
    assert_matches(out["relevance"], expected)


# ---------------------------------------------------------------- token inputs, the CLS select, positions

def token_model(head: str, seed_=0):
    """``ids -> table[ids] + position table -> MatMul + bias -> Relu ->`` either the CLS select (``Gather`` of
    token 0) and a Gemm to classes (``head="cls"``), or a MatMul to per-token classes (``head="tokens"``)."""
    rng = np.random.default_rng(seed_)
    p = {"table": rng.standard_normal((10, D)), "pos": 0.5 * rng.standard_normal((TOKENS, D)),
         "w": rng.standard_normal((D, D)) / np.sqrt(D), "b": 0.1 * rng.standard_normal(D),
         "w_out": rng.standard_normal((D, CLASSES)) / np.sqrt(D), "b_out": 0.1 * rng.standard_normal(CLASSES)}
    inits = [init(k, v) for k, v in p.items()] + [init("first", 0, np.int64)]
    nodes = [h.make_node("Gather", ["table", "ids"], ["emb"], axis=0, name="lookup"),
             h.make_node("Add", ["emb", "pos"], ["embedded"], name="positions"),
             h.make_node("MatMul", ["embedded", "w"], ["z0"], name="dense"),
             h.make_node("Add", ["z0", "b"], ["z"], name="dense_bias"),
             h.make_node("Relu", ["z"], ["a"], name="relu")]
    if head == "cls":
        nodes += [h.make_node("Gather", ["a", "first"], ["cls"], axis=1, name="cls_select"),
                  h.make_node("MatMul", ["cls", "w_out"], ["y0"], name="head"),
                  h.make_node("Add", ["y0", "b_out"], ["logits"], name="head_bias")]
        out_shape = ["batch", CLASSES]
    else:
        nodes += [h.make_node("MatMul", ["a", "w_out"], ["y0"], name="head"),
                  h.make_node("Add", ["y0", "b_out"], ["logits"], name="head_bias")]
        out_shape = ["batch", TOKENS, CLASSES]
    proto = model(nodes, [h.make_tensor_value_info("ids", T.INT64, ["batch", TOKENS])],
                  [h.make_tensor_value_info("logits", T.FLOAT, out_shape)], inits)
    return proto, {k: np.asarray(v, np.float32).astype(np.float64) for k, v in p.items()}


def token_reference(ids, p, head, position=-1):
    emb = p["table"][ids]
    embedded = emb + p["pos"]
    z = embedded @ p["w"] + p["b"]
    a = np.maximum(z, 0)
    if head == "cls":
        logits = a[:, 0] @ p["w_out"] + p["b_out"]
        r_a = np.zeros_like(a)
        r_a[:, 0] = ref.linear(a[:, 0], p["w_out"], p["b_out"], seed(logits))
    else:
        logits = a @ p["w_out"] + p["b_out"]
        r_logits = np.zeros_like(logits)
        r_logits[:, position] = seed(logits[:, position])
        r_a = ref.linear(a, p["w_out"], p["b_out"], r_logits)
    r_emb, _ = ref.join([emb, p["pos"] + 0 * emb], ref.linear(embedded, p["w"], p["b"], r_a))
    return r_emb.sum(-1)


@pytest.mark.parametrize("head,position", [("cls", None), ("tokens", None), ("tokens", 1), ("tokens", -3)])
def test_token_input_relevance(head, position):
    """``relevance.ids`` ([batch, tokens]) is the lookup's relevance summed over the hidden axis; the position table
    keeps its share (LXT's ``add2``); a sequence output is explained at ``position`` (default the last)."""
    proto, p = token_model(head)
    ids = np.random.default_rng(4).integers(0, 10, (N, TOKENS)).astype(np.int64)
    out = compiled_run(proto, {"ids": ids}, "attnlrp", position=position)
    assert set(out) == {"logits", "relevance.ids", "explained_class"}
    assert out["relevance.ids"].shape == (N, TOKENS)
    expected = token_reference(ids, p, head, -1 if position is None else position)
    assert_matches(out["relevance.ids"], expected)
    logits = out["logits"] if head == "cls" else out["logits"][:, -1 if position is None else position]
    np.testing.assert_array_equal(out["explained_class"], logits.argmax(-1))


def test_position_on_a_classifier_is_refused():
    proto, _ = token_model("cls")
    with pytest.raises(OnnxlrpError, match="--position needs an explained output shaped"):
        onnxlrp.compile(proto, "attnlrp", position=0)


# ---------------------------------------------------------------- Expand, Where, the zero-denominator guard

def test_expand_and_where_route_relevance_back():
    """``x [N, 2, D] -> Unsqueeze -> Expand [N, 2, 3, D] -> Reshape [N, 6, D] -> Where(keep, ., 0) -> Flatten ->
    Gemm``: each copy's relevance is summed back; the entries Where replaced get none."""
    rng = np.random.default_rng(5)
    keep = rng.random((6, 1)) > 0.3
    w = rng.standard_normal((CLASSES, 6 * D)) / np.sqrt(6 * D)
    inits = [init("axes", [2], np.int64), init("shape3", [N, 2, 3, D], np.int64), init("shape6", [N, 6, D], np.int64),
             init("keep", keep, np.bool_), init("zero", 0.0), init("w", w)]
    nodes = [h.make_node("Unsqueeze", ["x", "axes"], ["x4"], name="unsqueeze"),
             h.make_node("Expand", ["x4", "shape3"], ["copies"], name="expand"),
             h.make_node("Reshape", ["copies", "shape6"], ["heads"], name="reshape"),
             h.make_node("Where", ["keep", "heads", "zero"], ["kept"], name="where"),
             h.make_node("Flatten", ["kept"], ["flat"], axis=1, name="flatten"),
             h.make_node("Gemm", ["flat", "w"], ["logits"], transB=1, name="head")]
    proto = model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [N, 2, D])],
                  [h.make_tensor_value_info("logits", T.FLOAT, [N, CLASSES])], inits)
    x = rng.standard_normal((N, 2, D)).astype(np.float32)
    out = compiled_run(proto, {"x": x}, "attnlrp")
    kept = np.where(keep, np.repeat(x.astype(np.float64)[:, :, None], 3, axis=2).reshape(N, 6, D), 0)
    w64 = w.astype(np.float32).astype(np.float64)
    r = ref.linear(kept.reshape(N, -1), w64.T, None, seed(kept.reshape(N, -1) @ w64.T)).reshape(N, 6, D)
    expected = (np.where(keep, r, 0)).reshape(N, 2, 3, D).sum(2)
    assert_matches(out["relevance"], expected)


def test_zero_denominator_stays_finite():
    """``z + eps`` exactly 0 (``z = -eps``, from a bias at ``x = 0``) divides by ``eps`` instead: finite relevance."""
    eps = np.float32(1e-8)
    inits = [init("w", [[1.0, 2.0]]), init("b", [-eps, 0.5]), init("w2", [[1.0], [1.0]])]
    nodes = [h.make_node("MatMul", ["x", "w"], ["z0"], name="dense"),
             h.make_node("Add", ["z0", "b"], ["z"], name="bias"),
             h.make_node("MatMul", ["z", "w2"], ["logits"], name="head")]
    proto = model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 1])],
                  [h.make_tensor_value_info("logits", T.FLOAT, [1, 1])], inits)
    out = compiled_run(proto, {"x": np.zeros((1, 1), np.float32)}, "attnlrp")
    assert np.isfinite(out["relevance"]).all() and out["relevance"].item() == 0.0


# ---------------------------------------------------------------- composites and families

def test_composites_plan_the_transformer_kinds():
    proto, _ = attention_block()
    attn = onnxlrp.inspect(proto, "attnlrp").rules
    cp = onnxlrp.inspect(proto, "cp-lrp").rules
    assert attn["softmax"] == "softmax-taylor" and cp["softmax"] == "constant"
    assert attn["pv"].startswith("uniform-epsilon") and attn["q_proj"].startswith("lxt-epsilon")
    assert attn["masking"].startswith("lxt-epsilon") and attn["residual"].startswith("lxt-epsilon")
    zennit = onnxlrp.inspect(proto, "epsilon").rules  # Zennit's rules where it has them, AttnLRP's elsewhere
    assert zennit["q_proj"].startswith("epsilon(") and zennit["residual"].startswith("norm")
    assert zennit["softmax"] == "softmax-taylor" and "masking" not in zennit


def test_toml_composite_sets_gamma_on_linear_layers(tmp_path):
    """LXT's choice for vision transformers: gamma on the linear layers, AttnLRP elsewhere; and per-op rules."""
    path = tmp_path / "vit.toml"
    path.write_text('[[layer]]\nop = ["MatMul", "Gemm"]\nrule = "gamma"\ngamma = 0.25\n'
                    '[[layer]]\nop = "Softmax"\nrule = "constant"\n'
                    '[[layer]]\nrule = "lxt-epsilon"\n[[layer]]\nrule = "uniform-epsilon"\n')
    proto, _ = attention_block()
    rules = onnxlrp.inspect(proto, composite=path).rules
    assert rules["q_proj"].startswith("gamma(") and rules["head"].startswith("gamma(")
    assert rules["softmax"] == "constant" and rules["residual"].startswith("lxt-epsilon")
    x = np.random.default_rng(6).standard_normal((N, TOKENS, D)).astype(np.float32)
    assert np.isfinite(compiled_run(proto, {"x": x}, "epsilon", composite=path)["relevance"]).all()


def test_rlrp_refuses_attention_in_one_line():
    proto, _ = attention_block()
    with pytest.raises(OnnxlrpError, match="node 'qk' .*R-LRP .* no rule for a matmul layer.* --rule attnlrp"):
        onnxlrp.compile(proto, "rlrp")
