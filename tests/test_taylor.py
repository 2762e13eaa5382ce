"""--rule taylor (issue 22): R_d = df/dx_d(x0) * (x_d - x0_d) against float64 references: the matrix of linear models
read off their float64 forward pass, central finite differences at x0, and f(x) = f(x0) + sum R inside one linear
region of a piecewise-linear net."""

import netspec as ns
import numpy as np
import onnx
import pytest
import reference as ref
from helpers import session
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from onnxlrp.cli import main
from onnxlrp.errors import OnnxlrpError, UnsupportedOpError


def run(model, x, **kwargs):
    compiled = onnxlrp.compile(model, "taylor", **kwargs)
    sess = session(compiled)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)}), strict=True))
    for name in ("relevance", "taylor_residual", "taylor_root_value"):
        assert np.all(np.isfinite(out[name])), name
    return out


def gradient_fd(f, x0, cls, h=1e-6):
    """Central finite differences of the ``cls`` score of ``f`` (float64) at ``x0`` [B, ...]."""
    g = np.zeros(x0.shape)
    rows = np.arange(len(x0))
    for idx in np.ndindex(x0.shape[1:]):
        e = np.zeros(x0.shape)
        e[(slice(None), *idx)] = h
        g[(slice(None), *idx)] = (f(x0 + e)[rows, cls] - f(x0 - e)[rows, cls]) / (2 * h)
    return g


def check_against(out, f, x, x0, g, tol=1e-4):
    """Relevance, f(x0) and the residual of the compiled model against ``g`` and ``f`` (float64)."""
    rows = np.arange(len(x))
    cls = out["explained_class"]
    expected = g * (x - x0)
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(out["relevance"] - expected).max() <= tol * scale
    np.testing.assert_allclose(out["taylor_root_value"], f(x0)[rows, cls], rtol=1e-5, atol=1e-5)
    residual = f(x)[rows, cls] - f(x0)[rows, cls] - expected.reshape(len(x), -1).sum(1)
    np.testing.assert_allclose(out["taylor_residual"], residual, rtol=1e-4, atol=tol * scale * x[0].size ** 0.5)


def save(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return str(path)


# ------------------------------------------------------------------ linear models: R = w * (x - x0)

LINEAR_NETS = {
    "gemm": lambda rng: ([ns.dense(rng, 7, 5), ns.dense(rng, 5, 3)], (1, 7), {}),
    "matmul": lambda rng: ([ns.dense(rng, 7, 5), ns.dense(rng, 5, 3)], (1, 7), {"dense_as": "matmul"}),
    "conv_avgpool": lambda rng: ([ns.conv(rng, 2, 3, 3, pad=1), ns.batchnorm(rng, 3), ns.AvgPool((2, 2), (2, 2)),
                                  ns.Flatten(), ns.dense(rng, 27, 4)], (1, 2, 6, 6), {}),
}


@pytest.mark.parametrize("net", sorted(LINEAR_NETS))
@pytest.mark.parametrize("baseline", ["zeros", "mean", "file"])
def test_linear_models_give_weights_times_step(net, baseline, tmp_path):
    rng = np.random.default_rng(1)
    layers, shape, options = LINEAR_NETS[net](rng)
    model = ns.to_onnx(layers, shape, **options)
    x = rng.normal(size=(4, *shape[1:]))
    data = rng.normal(size=(20, *shape[1:])) + 0.5
    kwargs, x0 = {}, np.zeros((1, *shape[1:]))
    if baseline == "mean":
        kwargs = {"baseline": "mean", "baseline_data": save(tmp_path, "data.npy", data)}
        x0 = data.mean(0, keepdims=True)
    elif baseline == "file":
        x0 = rng.normal(size=(1, *shape[1:]))
        kwargs = {"baseline": save(tmp_path, "x0.npy", x0[0])}  # one sample's shape, without the batch axis
    out = run(model, x, **kwargs)

    def f(z):
        return ref.forward(layers, z)

    n = int(np.prod(shape[1:]))
    basis = np.eye(n).reshape(n, *shape[1:])
    matrix = (f(basis) - f(np.zeros((1, *shape[1:])))).T  # [classes, inputs]: f(x) = A x + c
    g = matrix[out["explained_class"]].reshape(x.shape)
    check_against(out, f, x, np.broadcast_to(x0, x.shape), g)
    assert np.abs(out["taylor_residual"]).max() < 1e-4 * np.abs(f(x)).max()  # a linear model has no higher orders


# ------------------------------------------------------------------ ReLU nets: the gradient at x0

RELU_NETS = {
    "conv_bn_maxpool": lambda rng: [ns.conv(rng, 2, 3, 3, pad=1), ns.batchnorm(rng, 3), ns.Relu(),
                                    ns.MaxPool((2, 2), (2, 2)), ns.Flatten(), ns.dense(rng, 27, 5), ns.Relu(),
                                    ns.dense(rng, 5, 4)],
    "residual_concat_gap": lambda rng: [ns.conv(rng, 2, 4, 3, pad=1), ns.Relu(),
                                        ns.Residual([ns.conv(rng, 4, 4, 3, pad=1), ns.Relu()]),
                                        ns.Concat([[ns.conv(rng, 4, 2, 1)], []]), ns.Relu(), ns.GlobalAvgPool(),
                                        ns.Flatten(), ns.dense(rng, 6, 3)],
    "strided_globalmax": lambda rng: [ns.conv(rng, 2, 4, 3, stride=2, pad=1), ns.Relu(), ns.GlobalMaxPool(),
                                      ns.Flatten(), ns.dense(rng, 4, 3)],
}


@pytest.mark.parametrize("net", sorted(RELU_NETS))
def test_relu_nets_match_finite_differences_at_the_baseline(net, tmp_path):
    rng = np.random.default_rng(2)
    layers = RELU_NETS[net](rng)
    model = ns.to_onnx(layers, (1, 2, 6, 6), softmax=True)
    x = rng.normal(size=(3, 2, 6, 6))
    x0 = rng.normal(size=(1, 2, 6, 6))  # random: no ties in the max pools, no ReLU input at exactly 0
    out = run(model, x, baseline=save(tmp_path, "x0.npy", x0))

    def f(z):
        return ref.forward(layers, z)

    x0 = np.broadcast_to(x0, x.shape)
    check_against(out, f, x, x0, gradient_fd(f, x0, out["explained_class"]))
    predicted = f(x).argmax(1)  # target -1: the class predicted at x, not at x0
    np.testing.assert_array_equal(out["explained_class"], predicted)


def test_target_class_is_explained(tmp_path):
    rng = np.random.default_rng(3)
    layers = RELU_NETS["conv_bn_maxpool"](rng)
    model = ns.to_onnx(layers, (1, 2, 6, 6))
    x, x0 = rng.normal(size=(2, 2, 6, 6)), rng.normal(size=(1, 2, 6, 6))
    sess = session(onnxlrp.compile(model, "taylor", baseline=save(tmp_path, "x0.npy", x0)))
    relevance, cls = sess.run(["relevance", "explained_class"],
                              {"x": x.astype(np.float32), "target": np.array([1, 2], np.int64)})
    np.testing.assert_array_equal(cls, [1, 2])
    x0 = np.broadcast_to(x0, x.shape)
    expected = gradient_fd(lambda z: ref.forward(layers, z), x0, cls) * (x - x0)
    assert np.abs(relevance - expected).max() <= 1e-4 * np.abs(expected).max()


def test_piecewise_linear_net_is_conserved_inside_one_linear_region(tmp_path):
    """x near x0: no ReLU or max-pool switches between them (checked on the float64 forward pass: f is affine on the
    segment), so f(x) = f(x0) + sum R exactly, up to float32 rounding."""
    rng = np.random.default_rng(4)
    layers = RELU_NETS["conv_bn_maxpool"](rng)
    model = ns.to_onnx(layers, (1, 2, 6, 6))
    x0 = rng.normal(size=(1, 2, 6, 6))
    x = x0 + 1e-3 * rng.normal(size=(3, 2, 6, 6))

    def f(z):
        return ref.forward(layers, z)

    mid = f((np.broadcast_to(x0, x.shape) + x) / 2)
    assert np.abs(mid - (f(np.broadcast_to(x0, x.shape)) + f(x)) / 2).max() < 1e-12, "the case left its region"
    out = run(model, x, baseline=save(tmp_path, "x0.npy", x0))
    rows, cls = np.arange(3), out["explained_class"]
    change = f(x)[rows, cls] - f(np.broadcast_to(x0, x.shape))[rows, cls]
    total = out["relevance"].reshape(3, -1).astype(np.float64).sum(1)
    assert np.abs(change).min() > 1e-4
    np.testing.assert_allclose(out["taylor_root_value"] + total, f(x)[rows, cls], rtol=0, atol=2e-5)
    np.testing.assert_allclose(total, change, rtol=2e-3)
    assert np.abs(out["taylor_residual"]).max() < 2e-5


# ------------------------------------------------------------------ smooth activations and products

def smooth_model():
    """x [B, 4] -> Gemm -> Tanh -> Mul(h, Sigmoid(h)) -> Softplus -> Div(., 2) -> Sub(., Sqrt(Pow(u, 2) + 1))
    -> Exp(-.) ... -> Gemm -> logits, and its float64 forward."""
    rng = np.random.default_rng(5)
    w1, b1, w2 = rng.normal(size=(5, 4)), rng.normal(size=5), rng.normal(size=(3, 5))
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (np.array(2.0), "two"), (np.array(1.0), "one"))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Sigmoid", ["t"], ["s"]),
             helper.make_node("Mul", ["t", "s"], ["silu"]),
             helper.make_node("Softplus", ["silu"], ["sp"]),
             helper.make_node("Div", ["sp", "two"], ["u"]),
             helper.make_node("Pow", ["u", "two"], ["u2"]),
             helper.make_node("Add", ["u2", "one"], ["u21"]),
             helper.make_node("Sqrt", ["u21"], ["r"]),
             helper.make_node("Sub", ["u", "r"], ["d"]),
             helper.make_node("Div", ["d", "r"], ["q"]),
             helper.make_node("LeakyRelu", ["q"], ["lr"], alpha=0.2),
             helper.make_node("Gemm", ["lr", "w2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "smooth", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)

    def f(x):
        t = np.tanh(x @ w1.T + b1)
        u = np.log1p(np.exp(t / (1 + np.exp(-t)))) / 2
        r = np.sqrt(u ** 2 + 1)
        q = (u - r) / r
        return np.where(q > 0, q, 0.2 * q) @ w2.T

    return model, f


def test_smooth_activations_products_and_quotients_match_finite_differences(tmp_path):
    model, f = smooth_model()
    rng = np.random.default_rng(6)
    x, x0 = rng.normal(size=(5, 4)), rng.normal(size=(1, 4))
    out = run(model, x, baseline=save(tmp_path, "x0.npy", x0))
    x0 = np.broadcast_to(x0, x.shape)
    check_against(out, f, x, x0, gradient_fd(f, x0, out["explained_class"]))
    assert np.abs(out["taylor_residual"]).max() > 1e-3  # a curved model: the first order leaves a residual


# ------------------------------------------------------------------ errors and the command line

def test_errors_are_one_line(tmp_path):
    rng = np.random.default_rng(7)
    model = ns.to_onnx([ns.dense(rng, 4, 3)], (1, 4))
    with pytest.raises(OnnxlrpError, match="--baseline mean needs --baseline-data"):
        onnxlrp.compile(model, "taylor", baseline="mean")
    with pytest.raises(OnnxlrpError, match=r"a baseline of shape \[1, 5\] does not fit input 'x'"):
        onnxlrp.compile(model, "taylor", baseline=save(tmp_path, "bad.npy", np.zeros(5)))
    with pytest.raises(OnnxlrpError, match="valid: zeros, mean or a .npy file"):
        onnxlrp.compile(model, "taylor", baseline="ones")
    with pytest.raises(OnnxlrpError, match="finite numbers"):
        onnxlrp.compile(model, "taylor", baseline=save(tmp_path, "nan.npy", np.full(4, np.nan)))
    with pytest.raises(OnnxlrpError, match="are for --rule taylor"):
        onnxlrp.compile(model, "epsilon", baseline="zeros")
    with pytest.raises(OnnxlrpError, match="'taylor' does not use --epsilon"):
        onnxlrp.compile(model, "taylor", epsilon=0.1)
    sin = helper.make_model(helper.make_graph(
        [helper.make_node("Sin", ["x"], ["y"])], "sin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOpError, match="the taylor rule has no gradient for Sin"):
        onnxlrp.compile(sin, "taylor")


def test_cli_compile_with_a_mean_baseline(tmp_path, capsys):
    rng = np.random.default_rng(8)
    layers = [ns.dense(rng, 4, 6), ns.Relu(), ns.dense(rng, 6, 3)]
    path = tmp_path / "m.onnx"
    onnx.save(ns.to_onnx(layers, (1, 4)), path)
    data = rng.normal(size=(30, 4))
    assert main(["compile", str(path), "--rule", "taylor", "--baseline", "mean", "--baseline-data",
                 save(tmp_path, "data.npy", data), "-o", str(tmp_path / "t.onnx")]) == 0
    x = rng.normal(size=(2, 4))
    out = run(onnx.load(tmp_path / "m.onnx"), x, baseline="mean", baseline_data=str(tmp_path / "data.npy"))
    sess = session(onnx.load(tmp_path / "t.onnx"))
    np.testing.assert_allclose(sess.run(["relevance"], {"x": x.astype(np.float32)})[0], out["relevance"])
    meta = {p.key: p.value for p in onnx.load(tmp_path / "t.onnx").metadata_props}
    assert meta["onnxlrp.baseline"] == "mean of data.npy" and meta["onnxlrp.rule"] == "taylor"
    x0 = np.broadcast_to(data.mean(0, keepdims=True), x.shape)
    f = lambda z: ref.forward(layers, z)  # noqa: E731
    check_against(out, f, x, x0, gradient_fd(f, x0, out["explained_class"]))
    capsys.readouterr()
    assert main(["compile", str(path), "--rule", "taylor", "--baseline", "mean", "-o", str(tmp_path / "u.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "m.onnx: --baseline mean needs --baseline-data" in err
    assert not (tmp_path / "u.onnx").exists()


def test_two_inputs_each_get_their_share():
    """y = tanh(a W1^T) W3^T + b W2^T at the zero baseline: relevance.a and relevance.b against finite differences,
    and their sum with f(0) and the residual recovers f(a, b)."""
    rng = np.random.default_rng(9)
    w1, w2, w3 = rng.normal(size=(4, 3)), rng.normal(size=(2, 5)), rng.normal(size=(2, 4))
    inits = [numpy_helper.from_array(w.astype(np.float32), n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))]
    nodes = [helper.make_node("Gemm", ["a", "w1"], ["h"], transB=1), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Gemm", ["t", "w3"], ["u"], transB=1),
             helper.make_node("Gemm", ["b", "w2"], ["v"], transB=1), helper.make_node("Add", ["u", "v"], ["y"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", 3]),
                                             helper.make_tensor_value_info("b", TensorProto.FLOAT, ["B", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 5))
    sess = session(onnxlrp.compile(model, "taylor"))
    ra, rb, residual, root, cls = sess.run(["relevance.a", "relevance.b", "taylor_residual", "taylor_root_value",
                                            "explained_class"], {"a": a.astype(np.float32), "b": b.astype(np.float32)})

    def f(a_, b_):
        return np.tanh(a_ @ w1.T) @ w3.T + b_ @ w2.T

    rows = np.arange(3)
    np.testing.assert_allclose(rb, w2[cls] * b, rtol=1e-5, atol=1e-6)  # linear in b
    grad_a = w3[cls] @ w1  # tanh'(0) = 1
    np.testing.assert_allclose(ra, grad_a * a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(root, np.zeros(3), atol=1e-7)
    total = f(a, b)[rows, cls] - ra.sum(1) - rb.sum(1)
    np.testing.assert_allclose(residual, total, rtol=1e-4, atol=1e-5)
    with pytest.raises(OnnxlrpError, match="--baseline mean needs a model with one float input"):
        onnxlrp.compile(model, "taylor", baseline="mean", baseline_data="unused.npy")


def attention_model():
    """x [B, 3, 4] -> single-head self-attention (Softmax(q k^T / 2) v) -> Erf/Elu/Softsign/HardSigmoid/Max
    branches -> mean over tokens -> logits, and its float64 forward."""
    rng = np.random.default_rng(10)
    wq, wk, wv, wo = (rng.normal(size=(4, 4)) for _ in range(4))
    w = rng.normal(size=(4, 3))
    arrays = {"wq": wq, "wk": wk, "wv": wv, "wo": wo, "w": w, "half": np.array(0.5), "axes": np.array([1])}
    inits = [numpy_helper.from_array(v.astype(np.int64 if k == "axes" else np.float32), k) for k, v in arrays.items()]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "half"], ["s2"]),
             helper.make_node("Softmax", ["s2"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["c"]),
             helper.make_node("MatMul", ["c", "wo"], ["o"]), helper.make_node("Erf", ["o"], ["e"]),
             helper.make_node("Elu", ["o"], ["l"], alpha=0.7), helper.make_node("Softsign", ["o"], ["ss"]),
             helper.make_node("HardSigmoid", ["o"], ["hs"], alpha=0.3, beta=0.4),
             helper.make_node("Max", ["e", "l"], ["m"]), helper.make_node("Sum", ["m", "ss", "hs"], ["t"]),
             helper.make_node("ReduceMean", ["t", "axes"], ["r"], keepdims=0),
             helper.make_node("MatMul", ["r", "w"], ["y"])]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    from scipy.special import erf

    def f(x):
        q, k, v = x @ wq, x @ wk, x @ wv
        s = q @ k.transpose(0, 2, 1) * 0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        o = (p / p.sum(-1, keepdims=True)) @ v @ wo
        elu = np.where(o > 0, o, 0.7 * (np.exp(o) - 1))
        t = np.maximum(erf(o), elu) + o / (1 + np.abs(o)) + np.clip(0.3 * o + 0.4, 0, 1)
        return t.mean(1) @ w

    return model, f


def test_attention_and_more_activations_match_finite_differences(tmp_path):
    model, f = attention_model()
    rng = np.random.default_rng(11)
    x, x0 = rng.normal(size=(2, 3, 4)), rng.normal(size=(1, 3, 4))
    out = run(model, x, baseline=save(tmp_path, "x0.npy", x0))
    x0 = np.broadcast_to(x0, x.shape)
    check_against(out, f, x, x0, gradient_fd(f, x0, out["explained_class"]))


def test_no_finite_derivative_at_the_baseline_gives_zero_and_shows_in_the_residual():
    """y = sqrt(x) . w at x0 = 0: d sqrt / dx is infinite there; R = 0 and the residual is all of f(x) - f(0)."""
    w = np.array([1.0, -2.0, 0.5], np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])], "sqrt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2])],
        [numpy_helper.from_array(np.stack([w, -w], 1), "w")]), opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[0.25, 1.0, 4.0], [0.0, 0.5, 2.0]])
    out = run(model, x)
    np.testing.assert_array_equal(out["relevance"], 0.0)
    f = np.sqrt(x) @ np.stack([w, -w], 1)
    np.testing.assert_allclose(out["taylor_residual"], f[np.arange(2), out["explained_class"]], rtol=1e-6)
