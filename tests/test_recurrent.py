"""LSTM and GRU layers against the float64 reference of Arras et al.'s rule (tests/recurrent_reference.py), on
hand-built ONNX graphs (every direction, peepholes, initial states as inputs, per-sample sequence lengths,
``linear_before_reset``) and on torch exports (both exporters, bidirectional)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import recurrent_reference as rr
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from onnxlrp.errors import OnnxlrpError
from onnxlrp.runtime import with_target

EPS = 0.01
T, B, IN, H, K = 5, 3, 4, 3, 2  # steps, batch, input size, hidden size, classes


def run(model, feeds, rule="epsilon", **params):
    compiled = onnxlrp.compile(model, rule, epsilon=EPS, **params)
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, with_target(session, feeds, feeds.get("target"))), strict=True))


def source_outputs(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def head_relevance(features, w, b):
    """Epsilon on the dense head ``z = features @ w.T + b`` from one_hot(argmax) * z: the relevance of features."""
    z = features @ w.T + b
    r_z = np.zeros_like(z)
    r_z[np.arange(len(z)), z.argmax(1)] = z.max(1)
    return features * ((r_z / (z + EPS * np.where(z >= 0, 1.0, -1.0))) @ w)


def recurrent_model(op, direction, *, peepholes=False, lengths=False, states=False, head="last", before_reset=0):
    """``X [T, B, IN] -> op -> Y_h (head="last") or Y (head="all") -> Gemm``; returns (model, weights dict)."""
    rng = np.random.default_rng(7)
    dirs = 2 if direction == "bidirectional" else 1
    gates = 4 if op == "LSTM" else 3
    w = rng.normal(size=(dirs, gates * H, IN)).astype(np.float32)
    r = rng.normal(size=(dirs, gates * H, H)).astype(np.float32) * 0.5
    bias = rng.normal(size=(dirs, 2 * gates * H)).astype(np.float32) * 0.3
    inits = {"W": w, "R": r, "B": bias}
    inputs = ["X", "W", "R", "B", "lens" if lengths else "", "h0" if states else ""]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, IN])]
    if lengths:
        graph_inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [B]))
    if states:
        graph_inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [dirs, B, H]))
    attrs = {"hidden_size": H, "direction": direction}
    if op == "LSTM":
        inputs.append("c0" if states else "")
        if states:
            graph_inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, [dirs, B, H]))
        if peepholes:
            inits["P"] = rng.normal(size=(dirs, 3 * H)).astype(np.float32)
            inputs.append("P")
    else:
        attrs["linear_before_reset"] = before_reset
    while inputs and not inputs[-1]:
        inputs.pop()
    nodes = [helper.make_node(op, inputs, ["Y", "Y_h"], **attrs)]
    if head == "last":
        nodes += [helper.make_node("Transpose", ["Y_h"], ["Y_hT"], perm=[1, 0, 2]),
                  helper.make_node("Reshape", ["Y_hT", "flat_shape"], ["features"])]
        width = dirs * H
    else:
        nodes += [helper.make_node("Transpose", ["Y"], ["Y_T"], perm=[2, 0, 1, 3]),
                  helper.make_node("Reshape", ["Y_T", "flat_shape"], ["features"])]
        width = T * dirs * H
    inits["flat_shape"] = np.array([B, width], np.int64)
    inits["G"] = rng.normal(size=(K, width)).astype(np.float32)
    inits["g"] = rng.normal(size=K).astype(np.float32)
    nodes.append(helper.make_node("Gemm", ["features", "G", "g"], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "rnn", graph_inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                         [B, K])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), inits


def reference(op, direction, inits, feeds, head, before_reset=0):
    """(R_X [T, B, IN], R_h0 [dirs, B, H] or None) from the float64 reference, per sample and direction."""
    dirs = 2 if direction == "bidirectional" else 1
    x = feeds["X"].astype(np.float64)
    lengths = feeds.get("lens", np.full(B, T)).astype(int)
    h0 = feeds.get("h0", np.zeros((dirs, B, H))).astype(np.float64)
    c0 = feeds.get("c0", np.zeros((dirs, B, H))).astype(np.float64)
    finals, outputs = np.zeros((B, dirs, H)), np.zeros((B, T, dirs, H))
    runs = {}
    for s in range(B):
        for d in range(dirs):
            reverse = direction == "reverse" or d == 1
            order = np.arange(lengths[s])[::-1] if reverse else np.arange(lengths[s])
            args = (x[order, s], inits["W"][d].astype(np.float64), inits["R"][d].astype(np.float64),
                    inits["B"][d].astype(np.float64))
            runs[s, d] = (args, order, reverse)
            hs = forward_states(op, args, h0[d, s], c0[d, s], inits, d, before_reset)
            finals[s, d] = hs[-1] if len(hs) else h0[d, s]
            for k, t in enumerate(order):
                outputs[s, t, d] = hs[k]
    features = finals.reshape(B, -1) if head == "last" else outputs.reshape(B, -1)
    r_features = head_relevance(features, inits["G"].astype(np.float64), inits["g"].astype(np.float64))
    r_x, r_h0 = np.zeros_like(x), np.zeros((dirs, B, H))
    for (s, d), (args, order, _) in runs.items():
        if head == "last":
            r_final, r_y = r_features[s].reshape(dirs, H)[d], None
        else:
            r_final, r_y = None, r_features[s].reshape(T, dirs, H)[order, d]
        if op == "LSTM":
            peep = inits["P"][d].astype(np.float64) if "P" in inits else None
            out = rr.lstm(*args, h0[d, s], c0[d, s], peep=peep, eps=EPS, r_y=r_y, r_h=r_final)
        else:
            out = rr.gru(*args, h0[d, s], linear_before_reset=before_reset, eps=EPS, r_y=r_y, r_h=r_final)
        r_x[order, s] += out[0]
        r_h0[d, s] = out[1]
    return r_x, r_h0


def forward_states(op, args, h0, c0, inits, d, before_reset):
    """The hidden state after each valid step (the reference's own forward, run step by step)."""
    x = args[0]
    states = []
    for k in range(1, len(x) + 1):
        if op == "LSTM":
            peep = inits["P"][d].astype(np.float64) if "P" in inits else None
            states.append(rr.lstm(x[:k], *args[1:], h0, c0, peep=peep)[3])
        else:
            states.append(rr.gru(x[:k], *args[1:], h0, linear_before_reset=before_reset)[2])
    return states


CASES = [
    ("LSTM", "forward", {}),
    ("LSTM", "reverse", {"peepholes": True}),
    ("LSTM", "bidirectional", {"states": True}),
    ("LSTM", "bidirectional", {"lengths": True, "peepholes": True}),
    ("LSTM", "forward", {"head": "all", "lengths": True}),
    ("GRU", "forward", {}),
    ("GRU", "bidirectional", {"states": True, "before_reset": 1}),
    ("GRU", "reverse", {"lengths": True, "head": "all"}),
]


@pytest.mark.parametrize("op,direction,options", CASES, ids=[f"{o}-{d}-{'-'.join(p) or 'plain'}"
                                                              for o, d, p in CASES])
def test_recurrent_layer_matches_arras_reference(op, direction, options):
    head = options.get("head", "last")
    before_reset = options.get("before_reset", 0)
    kwargs = {k: v for k, v in options.items() if k not in ("head", "before_reset")}
    model, inits = recurrent_model(op, direction, head=head, before_reset=before_reset, **kwargs)
    rng = np.random.default_rng(8)
    feeds = {"X": rng.normal(size=(T, B, IN)).astype(np.float32)}
    dirs = 2 if direction == "bidirectional" else 1
    if options.get("lengths"):
        feeds["lens"] = np.array([T, 2, 4], np.int32)
    if options.get("states"):
        feeds["h0"] = rng.normal(size=(dirs, B, H)).astype(np.float32)
        if op == "LSTM":
            feeds["c0"] = rng.normal(size=(dirs, B, H)).astype(np.float32)
    got = run(model, feeds)
    np.testing.assert_array_equal(got["logits"], source_outputs(model, feeds)["logits"])  # the op itself is kept
    expected_x, expected_h0 = reference(op, direction, inits, feeds, head, before_reset)
    relevance = got["relevance.X"] if options.get("states") else got["relevance"]
    scale = np.abs(expected_x).max()
    np.testing.assert_allclose(relevance, expected_x, rtol=1e-3, atol=1e-4 * scale)
    if options.get("states"):
        np.testing.assert_allclose(got["relevance.h0"], expected_h0, rtol=1e-3, atol=1e-4 * scale)


def test_rlrp_refuses_recurrent_layers_in_one_line():
    model, _ = recurrent_model("LSTM", "forward")
    with pytest.raises(OnnxlrpError, match=r"\(LSTM\): R-LRP is defined for feed-forward layers") as err:
        onnxlrp.compile(model, "rlrp")
    assert "\n" not in str(err.value)


def torch_classifier(kind: str, bidirectional: bool):
    torch = pytest.importorskip("torch")

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            cell = torch.nn.LSTM if kind == "LSTM" else torch.nn.GRU
            self.rnn = cell(IN, H, batch_first=True, bidirectional=bidirectional)
            self.head = torch.nn.Linear(H * (2 if bidirectional else 1) * T, K)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y.reshape(y.shape[0], -1))

    torch.manual_seed(0)
    return torch, Classifier().eval()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind,bidirectional", [("LSTM", False), ("LSTM", True), ("GRU", True)])
def test_torch_recurrent_classifiers(kind, bidirectional, dynamo, tmp_path):
    """Both exporters: the ONNX LSTM/GRU op is found and explained; R-LRP is refused; the relevance equals the
    reference computed from the exported weights."""
    torch, module = torch_classifier(kind, bidirectional)
    x = torch.randn(B, T, IN)
    path = tmp_path / "rnn.onnx"
    torch.onnx.export(module, (x,), str(path), dynamo=dynamo, opset_version=18 if dynamo else 17)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    if kind not in ops:
        pytest.fail(f"the {'dynamo' if dynamo else 'TorchScript'} exporter wrote no {kind} op: {sorted(ops)}")
    feeds = {model.graph.input[0].name: x.numpy()}
    for rule in ("epsilon", "epsilon-plus-flat"):
        got = run(model, feeds, rule)
        np.testing.assert_allclose(got[model.graph.output[0].name], module(x).detach().numpy(), rtol=1e-4,
                                   atol=1e-5)
        assert np.isfinite(got["relevance"]).all() and np.abs(got["relevance"]).sum() > 0
    with pytest.raises(OnnxlrpError, match="R-LRP is defined for feed-forward layers"):
        onnxlrp.compile(model, "rlrp")
    # epsilon everywhere: the reference from the exported weights (the head sees Y in [B, T, dirs*H] order)
    node = next(n for n in model.graph.node if n.op_type == kind)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {"W": inits[node.input[1]], "R": inits[node.input[2]], "B": inits[node.input[3]],
               "G": module.head.weight.detach().numpy(), "g": module.head.bias.detach().numpy()}
    direction = "bidirectional" if bidirectional else "forward"
    before_reset = next((a.i for a in node.attribute if a.name == "linear_before_reset"), 0)  # torch's GRU: 1
    expected, _ = reference(kind, direction, weights, {"X": x.numpy().transpose(1, 0, 2)}, "all", before_reset)
    got = run(model, feeds, "epsilon")["relevance"]
    np.testing.assert_allclose(got, expected.transpose(1, 0, 2), rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_keras_lstm_through_tf2onnx():
    """tf2onnx writes Keras' LSTM as the ONNX op (time-major behind a Transpose, zero initial states built from
    Shape): the relevance equals the reference from the exported weights."""
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((T, IN), name="x")
    dense = tf.keras.layers.Dense(K)
    keras_model = tf.keras.Model(inputs, dense(tf.keras.layers.LSTM(H)(inputs)))
    spec = [tf.TensorSpec((None, T, IN), tf.float32, name="x")]
    model, _ = tf2onnx.convert.from_keras(keras_model, input_signature=spec, opset=17)
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kernel, bias = (v.numpy() for v in dense.weights)
    weights = {"W": inits[node.input[1]], "R": inits[node.input[2]], "B": inits[node.input[3]], "G": kernel.T,
               "g": bias}
    x = np.random.default_rng(9).normal(size=(B, T, IN)).astype(np.float32)
    got = run(model, {"x": x})
    np.testing.assert_allclose(got[model.graph.output[0].name], keras_model(x).numpy(), rtol=1e-4, atol=1e-5)
    expected, _ = reference("LSTM", "forward", weights, {"X": x.transpose(1, 0, 2)}, "last")
    np.testing.assert_allclose(got["relevance"], expected.transpose(1, 0, 2), rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())
