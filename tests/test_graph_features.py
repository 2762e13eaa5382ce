"""Graph features around the relevance path: control flow and custom-domain ops off and on the path, several data
inputs, integer inputs, ``onnxlrp.inspect``, float16/float64 models.

Several tests here are regressions for bugs they exposed (fixed in d486035): an If on the relevance path was not
seen; canonicalization broke subgraphs reading a dropped Identity's output or an initializer used nowhere else; the
opset upgrade dropped model-local functions.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import zoo_models as zm
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxlrp
from onnxlrp.errors import OnnxlrpError, UnsupportedOpError


def init(name: str, value) -> onnx.TensorProto:
    return nh.from_array(np.asarray(value), name)


def vi(name: str, elem=T.FLOAT, shape=None) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


def weight(rng, *shape) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / shape[-1])).astype(np.float32)


CUSTOM_DOMAIN = "custom.example"


def mlp(side_nodes=(), side_outputs=(), side_inits=(), *, logits_from="h1", opset=17, functions=(), seed=0):
    """x [N, 4] -> fc1 (Gemm, no bias) -> relu1 -> [side nodes] -> fc2 (Gemm, no bias) reading ``logits_from``
    -> ``logits`` -> softmax -> ``prob``. ``side_nodes`` may read ``x``, ``h1`` and the constants ``zero``,
    ``trip`` (int64 3), ``s0`` (zeros [4]); their ``side_outputs`` become graph outputs after ``prob``."""
    rng = np.random.default_rng(seed)
    inits = [init("W1", weight(rng, 6, 4)), init("W2", weight(rng, 5, 6)), init("zero", np.float32(0)),
             init("trip", np.array(3, np.int64)), init("s0", np.zeros(4, np.float32)), *side_inits]
    nodes = [h.make_node("Gemm", ["x", "W1"], ["z1"], transB=1, name="fc1"),
             h.make_node("Relu", ["z1"], ["h1"], name="relu1"),
             *side_nodes,
             h.make_node("Gemm", [logits_from, "W2"], ["logits"], transB=1, name="fc2"),
             h.make_node("Softmax", ["logits"], ["prob"], axis=-1, name="softmax")]
    graph = h.make_graph(nodes, "mlp", [vi("x", shape=["N", 4])], [vi("prob", shape=["N", 5]), *side_outputs],
                         initializer=inits)
    opsets = [h.make_opsetid("", opset), h.make_opsetid(CUSTOM_DOMAIN, 1), h.make_opsetid("com.microsoft", 1)]
    model = h.make_model(graph, opset_imports=opsets, ir_version=8, functions=list(functions))
    onnx.checker.check_model(model)
    return model


def twice_function(opset: int) -> onnx.FunctionProto:
    """A custom-domain op defined by a model-local function (onnxruntime inlines it): ``Twice(a) = a + a``."""
    return h.make_function(CUSTOM_DOMAIN, "Twice", ["a"], ["b"], [h.make_node("Add", ["a", "a"], ["b"])],
                           [h.make_opsetid("", opset)])


def if_nodes(out: str, name: str = "the_if"):
    """``If(sum(x) > 0)``: then ``2 * h1``, else ``-h1``; both branches read ``h1`` from the outer scope."""
    then_g = h.make_graph([h.make_node("Mul", ["h1", "two"], ["t_out"])], "then", [], [vi("t_out", shape=["N", 6])],
                          initializer=[init("two", np.float32(2))])
    else_g = h.make_graph([h.make_node("Neg", ["h1"], ["e_out"])], "else", [], [vi("e_out", shape=["N", 6])])
    return [h.make_node("ReduceSum", ["x"], [f"{name}_sx"], keepdims=0, name=f"{name}_rsum"),
            h.make_node("Greater", [f"{name}_sx", "zero"], [f"{name}_cond"], name=f"{name}_gt"),
            h.make_node("If", [f"{name}_cond"], [out], then_branch=then_g, else_branch=else_g, name=name)]


def loop_nodes(out: str, name: str = "the_loop"):
    """Three iterations of ``v = 0.5 * v`` starting at ``h1`` (a loop-carried data input)."""
    body = h.make_graph([h.make_node("Identity", ["cond_in"], ["cond_out"]),
                         h.make_node("Mul", ["v_in", "half"], ["v_out"])], "body",
                        [vi("iter", T.INT64, []), vi("cond_in", T.BOOL, []), vi("v_in", shape=["N", 6])],
                        [vi("cond_out", T.BOOL, []), vi("v_out", shape=["N", 6])],
                        initializer=[init("half", np.float32(0.5))])
    return [h.make_node("Loop", ["trip", "", "h1"], [out], body=body, name=name)]


def scan_nodes(final: str, rows: str, source: str = "x", width: int = 4, name: str = "the_scan"):
    """A running sum over the rows (batch axis) of ``source``; ``rows`` are the partial sums."""
    body = h.make_graph([h.make_node("Add", ["s_in", "row"], ["s_out"]),
                         h.make_node("Identity", ["s_out"], ["row_out"])], "scan_body",
                        [vi("s_in", shape=[width]), vi("row", shape=[width])],
                        [vi("s_out", shape=[width]), vi("row_out", shape=[width])])
    state = "s0" if width == 4 else f"{name}_s0"
    return [h.make_node("Scan", [state, source], [final, rows], body=body, num_scan_inputs=1, name=name)]


def custom_nodes(out: str, name: str = "the_custom"):
    return [h.make_node("Twice", ["h1"], [out], domain=CUSTOM_DOMAIN, name=name)]


def contrib_nodes(out: str, name: str = "the_gelu"):
    """An onnxruntime contrib op (com.microsoft Gelu): onnxruntime runs it, the compiler has no rule for it."""
    return [h.make_node("Gelu", ["h1"], [out], domain="com.microsoft", name=name)]


def sample(n: int = 3, width: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, width)).astype(np.float32)


def source_logits(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return zm.run_source(model, feeds, ["logits"])[0]


# ================================================================ control flow and custom ops OFF the path

SIDE_OUTPUTS = ["if_out", "loop_out", "scan_final", "scan_rows", "custom_out", "gelu_out"]


def off_path_model(opset: int) -> onnx.ModelProto:
    return mlp([*if_nodes("if_out"), *loop_nodes("loop_out"), *scan_nodes("scan_final", "scan_rows"),
                *custom_nodes("custom_out"), *contrib_nodes("gelu_out")],
               [vi("if_out", shape=["N", 6]), vi("loop_out", shape=["N", 6]), vi("scan_final", shape=[4]),
                vi("scan_rows", shape=["N", 4]), vi("custom_out", shape=["N", 6]), vi("gelu_out", shape=["N", 6])],
               opset=opset, functions=[twice_function(opset)])


@pytest.mark.parametrize("opset", [17, 11], ids=["opset17", "opset11-upgraded"])
def test_control_flow_and_custom_ops_off_path(opset):
    """If/Loop/Scan, a custom-domain op (a model-local function) and a com.microsoft op on side outputs: the model
    compiles, those nodes stay, their outputs are unchanged, and relevance is conserved (bias-free, epsilon).
    At opset 11 the compiler upgrades the model to 13; until d486035 the upgrade dropped the model-local function
    and onnxruntime refused the result ('custom.example:Twice(-1) is not a registered function/op')."""
    model = off_path_model(opset)
    x = sample()
    want = dict(zip(["prob", *SIDE_OUTPUTS], zm.session(model).run(None, {"x": x}), strict=True))
    compiled = onnxlrp.compile(model, "epsilon", epsilon=1e-9)
    ops = {(n.domain, n.op_type) for n in compiled.graph.node}
    assert {("", "If"), ("", "Loop"), ("", "Scan"), (CUSTOM_DOMAIN, "Twice"), ("com.microsoft", "Gelu")} <= ops
    assert [f.name for f in compiled.functions] == ["Twice"], "the model-local function was dropped"
    out = zm.run_compiled(compiled, {"x": x})
    for name, value in want.items():
        np.testing.assert_allclose(out[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    logits = source_logits(model, {"x": x})
    explained = logits[np.arange(len(x)), out["explained_class"]]
    np.testing.assert_allclose(out["relevance"].sum(1), explained, rtol=1e-4)


# ================================================================ ... and ON the path

ON_PATH = {
    "loop": (loop_nodes("on_path"), "the_loop", "Loop", "ai.onnx"),
    "scan": (scan_nodes("scan_final", "on_path", source="h1", width=6), "the_scan", "Scan", "ai.onnx"),
    "custom_function": (custom_nodes("on_path"), "the_custom", "Twice", CUSTOM_DOMAIN),
    "contrib_op": (contrib_nodes("on_path"), "the_gelu", "Gelu", "com.microsoft"),
    "if": (if_nodes("on_path"), "the_if", "If", "ai.onnx"),
}


def on_path_model(kind: str) -> onnx.ModelProto:
    nodes = list(ON_PATH[kind][0])
    side_inits = [init("the_scan_s0", np.zeros(6, np.float32))] if kind == "scan" else []
    side_outputs = [vi("scan_final", shape=[6])] if kind == "scan" else []
    return mlp(nodes, side_outputs, side_inits, logits_from="on_path", functions=[twice_function(17)])


@pytest.mark.parametrize("kind", list(ON_PATH))
def test_unsupported_on_path(kind):
    """A node on the relevance path without a rule: UnsupportedOpError naming the node, its op and its domain
    (a domain other than ai.onnx prefixes the op type); inspect gives the domain of every node.
    An If reads its data from the outer scope inside its branches; until d486035 the data-flow view did not see
    that, and the compiler said 'no data path leads from the inputs to ...' instead."""
    _, node, op, domain = ON_PATH[kind]
    with pytest.raises(UnsupportedOpError) as info:
        onnxlrp.compile(on_path_model(kind), "epsilon")
    message = str(info.value)
    assert "\n" not in message
    assert f"{op if domain == 'ai.onnx' else f'{domain}.{op}'} x1 ({node}: " in message
    assert any(f"{node} ({op}, domain {domain}" in line for line in onnxlrp.inspect(on_path_model(kind)).unsupported)


def side_branch(inlined: bool):
    """``joined = h1 + relu(W3 x)``, the second term computed either inside an If's then-branch (which reads ``x``
    and ``W3`` from the outer scope; the condition ``sum(x) > 0`` holds for the test inputs) or inlined."""
    branch = [h.make_node("Gemm", ["x", "W3"], ["side_z"], transB=1), h.make_node("Relu", ["side_z"], ["side"])]
    if inlined:
        nodes = branch
    else:
        then_g = h.make_graph(branch, "then", [], [vi("side", shape=["N", 6])])
        else_g = h.make_graph([h.make_node("Neg", ["h1"], ["e_out"])], "else", [], [vi("e_out", shape=["N", 6])])
        nodes = [*if_nodes("unused", name="cond")[:2],
                 h.make_node("If", ["cond_cond"], ["side"], then_branch=then_g, else_branch=else_g, name="the_if")]
    nodes.append(h.make_node("Add", ["h1", "side"], ["joined"], name="join"))
    w3 = init("W3", weight(np.random.default_rng(5), 6, 4))
    return mlp(nodes, side_inits=[w3], logits_from="joined")


def test_if_on_path_beside_a_supported_branch_is_reported():
    """``logits = fc2(h1 + If(...))`` where the If's branch computes ``relu(W3 x)`` from the outer scope. Until
    d486035 the If was invisible to the data-flow view: the model compiled and the If's output was treated as a
    constant (relevance 9 % (relative L2) away from the same graph with the branch inlined). Now: refused."""
    with pytest.raises(UnsupportedOpError, match=r"If x1 \(the_if: "):
        onnxlrp.compile(side_branch(inlined=False), "epsilon", epsilon=1e-9)
    compiled = onnxlrp.compile(side_branch(inlined=True), "epsilon", epsilon=1e-9)  # the inlined graph is fine
    x = sample()
    out = zm.run_compiled(compiled, {"x": x})
    explained = source_logits(side_branch(inlined=True), {"x": x})[np.arange(len(x)), out["explained_class"]]
    np.testing.assert_allclose(out["relevance"].sum(1), explained, rtol=1e-4)


def test_inspect_lists_every_unsupported_node():
    """Three unsupported nodes on the path (a Loop, a custom op, a quotient of two relevance tensors): inspect
    lists each once; compile raises one UnsupportedOpError naming all three."""
    nodes = [*loop_nodes("looped"), *custom_nodes("twice"),
             h.make_node("Div", ["looped", "twice"], ["quotient"], name="the_quotient")]
    model = mlp(nodes, logits_from="quotient", functions=[twice_function(17)])
    plan = onnxlrp.inspect(model, "epsilon")
    assert plan.rules == {}
    assert len(plan.unsupported) == 3
    for expected in ("the_loop (Loop, domain ai.onnx", f"the_custom (Twice, domain {CUSTOM_DOMAIN}",
                     "the_quotient (Div, domain ai.onnx"):
        assert sum(expected in line for line in plan.unsupported) == 1, expected
    with pytest.raises(UnsupportedOpError) as info:
        onnxlrp.compile(model, "epsilon")
    for grouped in ("Loop x1 (the_loop: ", f"{CUSTOM_DOMAIN}.Twice x1 (the_custom: ", "Div x1 (the_quotient: "):
        assert grouped in str(info.value)
    assert isinstance(info.value, OnnxlrpError) and info.value.exit_code == 2


# ================================================================ subgraphs reading outer-scope tensors


def if_reading(name_in_branch: str, extra_nodes=(), extra_inits=(), logits_from="h1") -> onnx.ModelProto:
    then_g = h.make_graph([h.make_node("Mul", [name_in_branch, "scale"], ["t3"])], "t3g", [],
                          [vi("t3", shape=["N", 6])])
    else_g = h.make_graph([h.make_node("Neg", [name_in_branch], ["e3"])], "e3g", [], [vi("e3", shape=["N", 6])])
    nodes = [*extra_nodes, *if_nodes("unused", name="unused")[:2],
             h.make_node("If", ["unused_cond"], ["if3"], then_branch=then_g, else_branch=else_g, name="if3")]
    return mlp(nodes, [vi("if3", shape=["N", 6])], [init("scale", np.float32(3)), *extra_inits],
               logits_from=logits_from)


def check_side_output(model: onnx.ModelProto, name: str) -> None:
    x = sample()
    want = zm.run_source(model, {"x": x}, [name])[0]
    compiled = onnxlrp.compile(model, "epsilon")
    np.testing.assert_allclose(zm.run_compiled(compiled, {"x": x})[name], want, rtol=1e-6)


def test_subgraph_reads_output_of_dropped_identity():
    """An If branch reads ``h1_id = Identity(h1)`` from the outer scope. Until d486035 canonicalization dropped the
    Identity and renamed its top-level readers only, so the branch's reference dangled ('the model is not valid ...
    Input 0 expected to have type but instead is null')."""
    model = if_reading("h1_id", [h.make_node("Identity", ["h1"], ["h1_id"], name="ident")])
    check_side_output(model, "if3")


def test_subgraph_reads_initializer_after_constant_folding():
    """An If branch reads the initializer ``scale``, used nowhere else. Once constant folding has folded anything
    (here Constant(f64) -> Cast), unused initializers are dropped; until d486035 only top-level reads counted,
    ``scale`` went, and onnxruntime refused the compiled model ('input scale ... is not output of any previous
    nodes')."""
    folded = [h.make_node("Constant", [], ["c64"], value=nh.from_array(np.float64(1.0), "c")),
              h.make_node("Cast", ["c64"], ["c32"], to=T.FLOAT, name="cast_const"),
              h.make_node("Mul", ["h1", "c32"], ["h1s"], name="scale_by_const")]
    model = if_reading("h1", folded, logits_from="h1s")
    check_side_output(model, "if3")


# ================================================================ static batch size


@pytest.mark.parametrize("batch", [1, 2])
def test_static_batch_size(batch):
    """An input with a static batch size (PyTorch exports without dynamic axes, old zoo files). Until 75ceaa0, with
    batch 2, the compiled model declared ``target`` as int64 [2] with the default ``[-1]`` (shape [1]) and
    onnxruntime refused to load it: 'Shape of initializer target does not match. {2} != {1}'."""
    rng = np.random.default_rng(0)
    graph = h.make_graph([h.make_node("Gemm", ["x", "W"], ["logits"], transB=1, name="fc")], "static",
                         [vi("x", shape=[batch, 3])], [vi("logits", shape=[batch, 4])],
                         initializer=[init("W", weight(rng, 4, 3))])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    x = sample(batch, 3)
    out = zm.run_compiled(onnxlrp.compile(model, "epsilon", epsilon=1e-9), {"x": x})
    logits = source_logits(model, {"x": x})
    np.testing.assert_allclose(out["relevance"].sum(1), logits.max(1), rtol=1e-4)
    out = zm.run_compiled(onnxlrp.compile(model, "epsilon"), {"x": x}, target=np.arange(batch))
    np.testing.assert_array_equal(out["explained_class"], np.arange(batch))


# ================================================================ several data inputs


def two_input_model(bias: bool = False, seed: int = 0) -> onnx.ModelProto:
    """image [N, 1, 6, 6] -> Conv 3x3 (2 ch) -> Relu -> Flatten (32) ; meta [N, 4] ; Concat -> Gemm -> Relu -> Gemm
    -> Softmax."""
    rng = np.random.default_rng(seed)
    inits = [init("Wc", weight(rng, 2, 1, 3, 3)), init("W1", weight(rng, 12, 36)), init("W2", weight(rng, 5, 12))]
    conv_in, g1_in, g2_in = ["image", "Wc"], ["joined", "W1"], ["h", "W2"]
    if bias:
        inits += [init("bc", rng.normal(0, 0.1, 2).astype(np.float32)),
                  init("b1", rng.normal(0, 0.1, 12).astype(np.float32)),
                  init("b2", rng.normal(0, 0.1, 5).astype(np.float32))]
        conv_in, g1_in, g2_in = conv_in + ["bc"], g1_in + ["b1"], g2_in + ["b2"]
    nodes = [h.make_node("Conv", conv_in, ["c"], kernel_shape=[3, 3], name="conv"),
             h.make_node("Relu", ["c"], ["cr"], name="relu_c"),
             h.make_node("Flatten", ["cr"], ["cf"], name="flatten"),
             h.make_node("Concat", ["cf", "meta"], ["joined"], axis=1, name="concat"),
             h.make_node("Gemm", g1_in, ["z"], transB=1, name="fc1"),
             h.make_node("Relu", ["z"], ["h"], name="relu_1"),
             h.make_node("Gemm", g2_in, ["logits"], transB=1, name="fc2"),
             h.make_node("Softmax", ["logits"], ["prob"], axis=-1, name="softmax")]
    graph = h.make_graph(nodes, "two_inputs", [vi("image", shape=["N", 1, 6, 6]), vi("meta", shape=["N", 4])],
                         [vi("prob", shape=["N", 5])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def two_feeds(n: int = 3) -> dict:
    rng = np.random.default_rng(2)
    return {"image": rng.uniform(0, 1, (n, 1, 6, 6)).astype(np.float32),
            "meta": rng.uniform(0, 1, (n, 4)).astype(np.float32)}


@pytest.mark.parametrize("rule,params", [("epsilon", {"epsilon": 1e-9}), ("lrp0", {})], ids=["epsilon", "lrp0"])
def test_two_inputs_one_relevance_each_and_conservation(rule, params):
    model = two_input_model()
    feeds = two_feeds()
    compiled = onnxlrp.compile(model, rule, **params)
    names = [o.name for o in compiled.graph.output]
    assert names == ["prob", "relevance.image", "relevance.meta", "explained_class"]
    out = zm.run_compiled(compiled, feeds)
    r_image, r_meta = out["relevance.image"], out["relevance.meta"]
    assert r_image.shape == feeds["image"].shape and r_meta.shape == feeds["meta"].shape
    assert np.abs(r_image).sum() > 0 and np.abs(r_meta).sum() > 0
    logits = source_logits(model, feeds)
    explained = logits[np.arange(3), out["explained_class"]]
    total = r_image.reshape(3, -1).sum(1) + r_meta.sum(1)
    np.testing.assert_allclose(total, explained, rtol=1e-4)


def test_two_inputs_rlrp_and_explainer():
    """R-LRP scales both inputs together: sum|R_image| + sum|R_meta| == |logit|. The Explainer returns a dict."""
    model = two_input_model(bias=True)
    feeds = two_feeds()
    explainer = onnxlrp.Explainer(model, rule="rlrp", providers=["CPUExecutionProvider"])
    result = explainer(**feeds)
    assert set(result.relevance) == {"relevance.image", "relevance.meta"}
    logits = source_logits(model, feeds)
    explained = logits[np.arange(3), result.explained_class]
    mass = np.abs(result.relevance["relevance.image"]).reshape(3, -1).sum(1) + \
        np.abs(result.relevance["relevance.meta"]).sum(1)
    np.testing.assert_allclose(mass, np.abs(explained), rtol=1e-4)
    plan = onnxlrp.inspect(model, "epsilon-gamma-box")
    assert plan.inputs == ["image", "meta"] and plan.unsupported == [] and plan.explained == "logits"
    assert plan.rules["conv"].startswith("zbox") and plan.rules["fc1"].startswith("epsilon")
    assert plan.rules["fc2"].startswith("epsilon") and set(plan.rules) == {"conv", "fc1", "fc2"}


# ================================================================ integer inputs


def int_input_model(seed: int = 0) -> onnx.ModelProto:
    """``idx`` (int64 [N]) picks a row of an embedding table (Gather) that is concatenated with ``x`` [N, 4];
    ``count`` (int64 [N, 1]) is Cast to float and added to the hidden layer."""
    rng = np.random.default_rng(seed)
    inits = [init("table", rng.standard_normal((5, 3)).astype(np.float32)), init("W1", weight(rng, 6, 7)),
             init("W2", weight(rng, 4, 6))]
    nodes = [h.make_node("Gather", ["table", "idx"], ["emb"], axis=0, name="embed"),
             h.make_node("Concat", ["x", "emb"], ["joined"], axis=1, name="concat"),
             h.make_node("Gemm", ["joined", "W1"], ["z"], transB=1, name="fc1"),
             h.make_node("Cast", ["count"], ["count_f"], to=T.FLOAT, name="cast_count"),
             h.make_node("Add", ["z", "count_f"], ["z2"], name="add_count"),
             h.make_node("Relu", ["z2"], ["hid"], name="relu"),
             h.make_node("Gemm", ["hid", "W2"], ["logits"], transB=1, name="fc2")]
    graph = h.make_graph(nodes, "int_inputs", [vi("x", shape=["N", 4]), vi("idx", T.INT64, ["N"]),
                                               vi("count", T.INT64, ["N", 1])],
                         [vi("logits", shape=["N", 4])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_integer_inputs_token_lookup_gets_relevance_count_none():
    """``idx`` indexes an embedding table: it is a token input, whose relevance is its row's relevance summed over the
    row (``relevance.idx``, shaped like ``idx``); ``count`` is cast and added: it carries none. The sum of both
    relevances is the explained logit (epsilon rule, no biases; the added count passes relevance unchanged)."""
    model = int_input_model()
    feeds = {"x": sample(), "idx": np.array([0, 3, 4], np.int64), "count": np.array([[1], [0], [2]], np.int64)}
    compiled = onnxlrp.compile(model, "epsilon")
    assert [i.name for i in compiled.graph.input] == ["x", "idx", "count", "target"]
    assert [o.name for o in compiled.graph.output] == ["logits", "relevance", "relevance.idx", "explained_class"]
    out = zm.run_compiled(compiled, feeds)
    logits = zm.run_source(model, feeds, ["logits"])[0]
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-6)
    assert out["relevance"].shape == feeds["x"].shape and np.isfinite(out["relevance"]).all()
    assert out["relevance.idx"].shape == feeds["idx"].shape and np.isfinite(out["relevance.idx"]).all()
    explained = logits[np.arange(len(logits)), out["explained_class"]]
    np.testing.assert_allclose(out["relevance"].sum(1) + out["relevance.idx"], explained, rtol=1e-4)
    plan = onnxlrp.inspect(model, "epsilon")
    assert plan.inputs == ["x", "idx"]
    result = onnxlrp.Explainer(compiled, providers=["CPUExecutionProvider"])(**feeds)
    assert set(result.relevance) == {"relevance", "relevance.idx"}


# ================================================================ float16 / float64 models


def typed_model(elem: int, dtype) -> onnx.ModelProto:
    """x [N, 8] -> MatMul + Add -> Relu -> MatMul + Add -> Softmax, every tensor of type ``elem`` (ops that
    onnxruntime's CPU provider runs in float16 and float64)."""
    rng = np.random.default_rng(0)
    inits = [init("W1", rng.standard_normal((8, 6)).astype(dtype)), init("b1", np.full(6, 0.1, dtype)),
             init("W2", rng.standard_normal((6, 5)).astype(dtype)), init("b2", np.zeros(5, dtype))]
    nodes = [h.make_node("MatMul", ["x", "W1"], ["m1"], name="fc1"), h.make_node("Add", ["m1", "b1"], ["z1"]),
             h.make_node("Relu", ["z1"], ["r"], name="relu"),
             h.make_node("MatMul", ["r", "W2"], ["m2"], name="fc2"), h.make_node("Add", ["m2", "b2"], ["y"]),
             h.make_node("Softmax", ["y"], ["p"], axis=-1, name="softmax")]
    graph = h.make_graph(nodes, "typed", [vi("x", elem, ["N", 8])], [vi("p", elem, ["N", 5])], initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("rule", ["epsilon", "rlrp"])
@pytest.mark.parametrize("elem,dtype", [(T.FLOAT16, np.float16), (T.DOUBLE, np.float64)], ids=["float16", "float64"])
def test_non_float32_model_compiles_to_a_runnable_model_or_is_refused(elem, dtype, rule):
    """A float16 (or float64) model: either refused at compile time in one line, or compiled into a model that
    onnxruntime runs, with its original output unchanged and a float32 relevance close to that of the same model
    in float32. (Until 250c0aa the compiled model mixed the model's tensors with float32 constants and
    onnxruntime refused it: 'Type parameter (T) of Optype (GreaterOrEqual) bound to different types
    (tensor(float16) and tensor(float)'.)"""
    model = typed_model(elem, dtype)
    try:
        compiled = onnxlrp.compile(model, rule)
    except OnnxlrpError as err:
        assert "\n" not in str(err)
        return
    x = np.random.default_rng(1).uniform(0, 1, (2, 8)).astype(dtype)
    try:
        out = zm.run_compiled(compiled, {"x": x})
    except Exception as err:  # noqa: BLE001 - onnxruntime's load errors have several types
        pytest.fail(f"compiled, but onnxruntime refuses the result: {str(err).splitlines()[0][:300]}")
    assert out["relevance"].dtype == np.float32 and np.isfinite(out["relevance"]).all()
    np.testing.assert_array_equal(out["p"], zm.run_source(model, {"x": x}, ["p"])[0])
    reference = zm.run_compiled(onnxlrp.compile(typed_model(T.FLOAT, np.float32), rule), {"x": x.astype(np.float32)})
    difference = np.linalg.norm(out["relevance"] - reference["relevance"]) / np.linalg.norm(reference["relevance"])
    assert difference < (2e-2 if dtype == np.float16 else 1e-5)
