"""Semiring LRP (Groudiev): the compiled graphs against the loop-form reference of Eq. K-LRP (semiring_reference.py),
exactly for boolean and counting, within 1e-5 relative for viterbi and real; real against LRP-0 / logit."""

from pathlib import Path

import netspec as ns
import numpy as np
import onnx
import pytest
import reference as ref
import semiring_reference as sref
from helpers import assert_close_relative, run_source, session
from netspec import Relu
from spec_zoo import ZOO

import onnxlrp
from onnxlrp.cli import main
from onnxlrp.errors import OnnxlrpError

MODELS = ["mlp", "cnn", "maxpool", "maxpool_tiles", "avgpool", "global", "residual", "nested", "concat", "sum3",
          "depthwise_strided", "conv1d"]
DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def run(model, x, rule="unused", target=None, **kwargs):
    """All outputs of ``model`` compiled with ``rule``, by name; the original output checked unchanged."""
    compiled = onnxlrp.compile(model, rule, **kwargs)
    sess = session(compiled)
    feeds = {sess.get_inputs()[0].name: x.astype(np.float32)}
    if target is not None:
        feeds["target"] = np.asarray(target, dtype=np.int64)
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    np.testing.assert_allclose(outputs[model.graph.output[0].name], run_source(model, x)[0], rtol=1e-5, atol=1e-6)
    for name, value in outputs.items():
        assert value.dtype.kind != "f" or np.all(np.isfinite(value)), f"{name} is not finite"
    return outputs


def compare(rule, layers, shape, x, reference_rule=None, theta=1e-9, **kwargs):
    """The compiled outputs and the reference relevance (``theta``: the reference's threshold)."""
    model = ns.to_onnx(layers, shape)
    out = run(model, x, rule, **kwargs)
    return out, sref.klrp(layers, x, reference_rule or rule, theta=theta, target=out["explained_class"])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rule", ["boolean", "counting"])
def test_boolean_and_counting_equal_the_reference_exactly(model, rule):
    """B-LRP (Eq. 2.2.1) and N-LRP (Eq. 2.2.2), theta = 1e-9: every relevance equal; counts are float64 and
    the float32 output is their rounding."""
    rng = np.random.default_rng(30)
    layers, shape = ZOO[model](rng)
    x = rng.normal(size=shape)
    out, expected = compare(rule, layers, shape, x)
    assert np.count_nonzero(expected) > 0
    if rule == "counting":
        assert out["relevance_exact"].dtype == np.float64
        np.testing.assert_array_equal(out["relevance_exact"], expected.astype(np.float64))
    else:
        assert "relevance_exact" not in out
    np.testing.assert_array_equal(out["relevance"], expected.astype(np.float32))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rule", ["viterbi", "real"])
def test_viterbi_and_real_match_the_reference(model, rule):
    """The class explained is the one with the largest |logit|: real relevance is LRP-0 / logit, which float32
    cannot follow to 1e-5 when that logit nearly cancels (-8e-4 against terms of 0.1 in one of these nets)."""
    rng = np.random.default_rng(31)
    layers, shape = ZOO[model](rng)
    x = rng.normal(size=shape)
    target = np.abs(ref.forward(layers, x).reshape(len(x), -1)).argmax(1)
    model_proto = ns.to_onnx(layers, shape)
    out = run(model_proto, x, rule, target=target)
    expected = sref.klrp(layers, x, rule, target=target).astype(np.float64)
    assert_close_relative(out["relevance"], expected, 1e-5)


@pytest.mark.parametrize("model", ["mlp", "avgpool", "residual", "concat", "sum3", "maxpool"])
def test_real_is_lrp0_divided_by_the_logit(model, tmp_path):
    """Sec. 2.1: (R, +, x) with the identity annotation is LRP-0 without the output factor. LRP-0 here: lrp0 on
    linear layers and the Norm rule with stabilizer 0 at joins and average pools (the LRP-0 of a join)."""
    rng = np.random.default_rng(32)
    layers, shape = ZOO[model](rng)
    x = rng.normal(size=shape)
    toml = tmp_path / "lrp0.toml"
    toml.write_text('[[layer]]\nop = ["Add", "Sum", "AveragePool", "GlobalAveragePool"]\nrule = "norm"\n'
                    'stabilizer = 0.0\n[[layer]]\nrule = "lrp0"\n')
    model_proto = ns.to_onnx(layers, shape)
    target = np.abs(ref.forward(layers, x).reshape(len(x), -1)).argmax(1)  # see above: no nearly cancelling logit
    real = run(model_proto, x, "real", target=target)
    lrp0 = run(model_proto, x, composite=toml, target=target)
    logits = real["y"].reshape(len(x), -1)
    explained = logits[np.arange(len(x)), target].reshape(-1, *[1] * (x.ndim - 1))
    assert_close_relative(real["relevance"], lrp0["relevance"] / explained, 1e-5)


def test_real_on_the_digits_cnn():
    images = np.load(DIGITS.parent / "digits_test.npz")["images"][:4].astype(np.float32)[:, None] / 255
    model = onnx.load(DIGITS)
    real, lrp0 = run(model, images, "real"), run(model, images, "lrp0")
    logits_name = "/classifier/classifier.3/Gemm_output_0"
    compiled = onnxlrp.compile(model, "lrp0")
    assert next(p.value for p in compiled.metadata_props if p.key == "onnxlrp.explained") == logits_name
    logits = ref_logits(model, images, logits_name)
    explained = logits[np.arange(len(images)), real["explained_class"]].reshape(-1, 1, 1, 1)
    assert_close_relative(real["relevance"], lrp0["relevance"] / explained, 1e-5)


def ref_logits(model, x, name):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = session(probe)
    return sess.run([name], {sess.get_inputs()[0].name: x})[0]


# ---------------------------------------------------------------- thresholds

def threshold_composite(tmp_path, semiring, thresholds, other=None):
    """One [[layer]] entry per linear layer (position among the linear layers, by op), then a catch-all."""
    text = ""
    for i, t in enumerate(thresholds):
        text += (f'[[layer]]\nrule = "{semiring}"\nop = ["Conv", "Gemm", "MatMul"]\nposition = [{i}, {i}]\n'
                 f'threshold = {t!r}\n')
    text += f'[[layer]]\nrule = "{semiring}"\n' + (f"threshold = {other!r}\n" if other else "")
    path = tmp_path / "thresholds.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("model", ["cnn", "residual", "mlp", "concat", "avgpool"])
@pytest.mark.parametrize("rule", ["boolean", "counting"])
def test_per_layer_thresholds(model, rule, tmp_path):
    """Sec. 4.3: a threshold per layer from a TOML composite. Thresholds this large make most pairs borderline
    (the fast path's pair-by-pair correction does most of the work): the relevance differs from theta = 1e-9's and
    still equals the reference exactly."""
    rng = np.random.default_rng(33)
    layers, shape = ZOO[model](rng)
    x = rng.normal(size=shape)
    thetas = [float(t) for t in rng.uniform(0.02, 0.3, size=len(list(ns.iter_linear(layers))))]
    toml = threshold_composite(tmp_path, rule, thetas, other=0.15)
    model_proto = ns.to_onnx(layers, shape)
    out = run(model_proto, x, composite=toml)
    expected = sref.klrp(layers, x, rule, theta=thetas, theta_other=0.15, target=out["explained_class"])
    default = sref.klrp(layers, x, rule, target=out["explained_class"])
    assert np.any(expected != default), "the thresholds change nothing here"
    np.testing.assert_array_equal(out.get("relevance_exact", out["relevance"]), expected.astype(np.float64))
    plan = onnxlrp.inspect(model_proto, composite=toml)
    assert f"{rule}(threshold={thetas[0]:g})" in plan.rules.values()


def test_threshold_option_and_inspect():
    rng = np.random.default_rng(34)
    layers, shape = ZOO["cnn"](rng)
    x = rng.normal(size=shape)
    out, expected = compare("counting", layers, shape, x, threshold=0.1, theta=0.1)
    np.testing.assert_array_equal(out["relevance_exact"], expected.astype(np.float64))
    plan = onnxlrp.inspect(ns.to_onnx(layers, shape), "boolean", threshold=0.25)
    assert set(plan.rules.values()) == {"boolean(threshold=0.25)"}
    assert plan.family.startswith("semiring (boolean")


# ---------------------------------------------------------------- user-defined semirings

def semiring_file(tmp_path, body, layers=""):
    path = tmp_path / "mine.toml"
    path.write_text("[semiring]\n" + body + layers)
    return path


TROPICAL = 'plus = "max"\ntimes = "add"\nzero = -1e30\none = 0.0\nannotation = "log-abs-normalized"\n'


@pytest.mark.parametrize("model", ["cnn", "residual", "maxpool", "avgpool", "concat"])
def test_tropical_viterbi_is_the_log_of_viterbi(model, tmp_path):
    """Max-plus with the log of Eq. 2.2.3's annotation: the reference, and log of Viterbi where that is > 0."""
    rng = np.random.default_rng(35)
    layers, shape = ZOO[model](rng)
    x = rng.normal(size=shape)
    out, expected = compare("unused", layers, shape, x, reference_rule=("max", "add", -1e30, 0.0,
                                                                       "log-abs-normalized"),
                            composite=semiring_file(tmp_path, TROPICAL))
    expected = expected.astype(np.float64)
    got = out["relevance"]
    relevant = expected > -1e29
    np.testing.assert_array_equal(got > -1e29, relevant)
    assert_close_relative(got[relevant], expected[relevant], 1e-5)
    viterbi = sref.klrp(layers, x, "viterbi", target=out["explained_class"]).astype(np.float64)
    np.testing.assert_allclose(np.exp(expected[relevant]), viterbi[relevant], rtol=1e-9)


@pytest.mark.parametrize("semiring", [
    ('plus = "max"\ntimes = "mul"\nzero = 0.0\none = 1.0\nannotation = "threshold"\n', ("max", "mul", 0, 1,
                                                                                       "threshold")),
    ('plus = "max"\ntimes = "add"\nzero = -1e30\none = 0.0\nannotation = "log-identity"\n',
     ("max", "add", -1e30, 0.0, "log-identity")),
    ('plus = "min"\ntimes = "add"\nzero = 1e30\none = 0.0\nannotation = "log-threshold"\n',
     ("min", "add", 1e30, 0.0, "log-threshold")),
    ('plus = "sum"\ntimes = "mul"\nzero = 0.0\none = 1.0\nannotation = "abs-normalized"\n',
     ("sum", "mul", 0, 1, "abs-normalized")),
    ('plus = "max"\ntimes = "mul"\nzero = 0.0\none = 1.0\nannotation = "identity"\n',
     ("max", "mul", 0, 1, "identity")),
], ids=["max-threshold", "max-plus-log-identity", "min-plus-log-threshold", "sum-abs", "max-identity"])
@pytest.mark.parametrize("model", ["cnn", "residual", "avgpool"])
def test_user_defined_semirings(semiring, model, tmp_path):
    body, spec = semiring
    rng = np.random.default_rng(36)
    layers, shape = ZOO[model](rng)
    x = rng.normal(size=shape)
    theta = 0.05 if "threshold" in body else 1e-9
    layers_toml = f"[[layer]]\nthreshold = {theta}\n" if "threshold" in body else ""
    out, expected = compare("unused", layers, shape, x, reference_rule=spec, theta=theta,
                            composite=semiring_file(tmp_path, body, layers_toml))
    expected = expected.astype(np.float64)
    got = out["relevance"]
    big = np.abs(expected) < 1e29
    np.testing.assert_array_equal(np.abs(got) < 1e29, big)
    if np.any(expected[big] != 0):
        assert_close_relative(got[big], expected[big], 1e-5)


@pytest.mark.parametrize("body, message", [
    ('plus = "sum"\ntimes = "add"\nzero = 0.0\none = 0.0\nannotation = "identity"\n', "times = add needs plus"),
    ('plus = "max"\ntimes = "add"\nzero = -inf\none = 0.0\nannotation = "log-identity"\n', "zero must be a finite"),
    ('plus = "or"\ntimes = "mul"\nzero = 0.0\none = 1.0\nannotation = "threshold"\n', "or and and go together"),
    ('plus = "max"\ntimes = "mul"\nzero = 0.0\none = 1.0\nannotation = "log-identity"\n', "log annotation"),
    ('plus = "xor"\ntimes = "mul"\nzero = 0.0\none = 1.0\nannotation = "identity"\n', "plus must be one of"),
    ('plus = "sum"\ntimes = "mul"\nzero = 0.0\none = 1.0\n', "needs annotation"),
    ('plus = "sum"\ntimes = "mul"\nzero = 0.0\none = 1.0\nannotation = "identity"\nname = "real"\n',
     "must be a new name"),
])
def test_invalid_semirings_are_one_line_errors(body, message, tmp_path):
    path = semiring_file(tmp_path, body)
    with pytest.raises(OnnxlrpError, match=message) as err:
        onnxlrp.compile(str(DIGITS), composite=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ('[[layer]]\nrule = "boolean"\nop = "Conv"\n[[layer]]\nrule = "epsilon"\n', "cannot be mixed per layer"),
    ('[[layer]]\nrule = "boolean"\nop = "Conv"\n[[layer]]\nrule = "counting"\n', "one semiring per composite"),
    ('[[layer]]\nrule = "boolean"\nthreshold = 0.0\n', "threshold must be a finite number > 0"),
    ('[[layer]]\nrule = "viterbi"\nthreshold = 0.1\n', "has no threshold"),
    ('[[layer]]\nrule = "boolean"\nepsilon = 0.1\n', "unknown key"),
])
def test_invalid_semiring_composites(text, message, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(OnnxlrpError, match=message):
        onnxlrp.compile(str(DIGITS), composite=path)


def test_threshold_parameter_checks():
    with pytest.raises(OnnxlrpError, match="'viterbi' does not use --threshold"):
        onnxlrp.compile(str(DIGITS), "viterbi", threshold=0.1)
    with pytest.raises(OnnxlrpError, match="'epsilon' does not use --threshold"):
        onnxlrp.compile(str(DIGITS), "epsilon", threshold=0.1)
    with pytest.raises(OnnxlrpError, match="--threshold: threshold must be a finite number > 0"):
        onnxlrp.compile(str(DIGITS), "boolean", threshold=-1.0)


# ---------------------------------------------------------------- counting: exact integers, no overflow

def positive_mlp(width, depth, rng):
    layers = []
    for i in range(depth):
        layers += [ns.Dense(rng.uniform(0.1, 1.0, size=(width if i < depth - 1 else 3, width)),
                            rng.uniform(0.1, 1.0, size=width if i < depth - 1 else 3))]
        if i < depth - 1:
            layers.append(Relu())
    return layers


def test_counts_beyond_float32_stay_exact():
    """Positive weights, inputs and biases: every pair is relevant and the counts are products of the widths,
    40**7 = 1.6e11 > 2**24. float64 holds them exactly (the reference counts with Python integers)."""
    rng = np.random.default_rng(37)
    layers, shape = positive_mlp(40, 8, rng), (2, 40)
    x = rng.uniform(0.1, 1.0, size=shape)
    out, expected = compare("counting", layers, shape, x)
    assert int(expected.max()) == 40 ** 7 > 2 ** 24
    np.testing.assert_array_equal(out["relevance_exact"], expected.astype(np.float64))
    np.testing.assert_array_equal(out["relevance"], expected.astype(np.float64).astype(np.float32))


def test_counts_past_float32_saturate_instead_of_inf():
    """64**24 = 2**144 paths: relevance_exact holds the power of two exactly, relevance saturates at float32's
    largest value (no Inf leaves the graph)."""
    rng = np.random.default_rng(38)
    layers, shape = positive_mlp(64, 25, rng), (1, 64)
    out = run(ns.to_onnx(layers, shape), rng.uniform(0.1, 1.0, size=shape), "counting")
    np.testing.assert_array_equal(out["relevance_exact"], np.full(shape, 2.0 ** 144))
    np.testing.assert_array_equal(out["relevance"], np.full(shape, np.finfo(np.float32).max))


# ---------------------------------------------------------------- the algebra's zero in re-indexing ops

def test_reindexing_fills_with_the_semirings_zero(tmp_path):
    """Slice and Split send the semiring's zero (-1e30 in max-plus) to the inputs they dropped, not 0."""
    rng = np.random.default_rng(39)
    w = rng.uniform(0.1, 1.0, size=(3, 4)).astype(np.float32)
    nodes = [onnx.helper.make_node("Slice", ["x", "start", "end", "axis"], ["s"]),
             onnx.helper.make_node("Split", ["s", "sizes"], ["a", "unused"], axis=1),
             onnx.helper.make_node("Gemm", ["a", "w"], ["y"], transB=1)]
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             (("start", [1]), ("end", [7]), ("axis", [1]), ("sizes", [4, 2]))] + [onnx.numpy_helper.from_array(w, "w")]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, ["batch", 8])],
                                   [onnx.helper.make_tensor_value_info("y", 1, ["batch", 3])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 9
    x = rng.uniform(0.1, 1.0, size=(2, 8))
    out = run(model, x, composite=semiring_file(tmp_path, TROPICAL))
    r = out["relevance"]
    assert np.all(r[:, [0, 5, 6, 7]] == np.float32(-1e30))
    assert np.all(r[:, 1:5] > -1e29)
    boolean = run(model, x, "boolean")["relevance"]
    np.testing.assert_array_equal(boolean[:, [0, 5, 6, 7]], 0)


# ---------------------------------------------------------------- relevance at inner tensors

def first_relu_output(model):
    return next(n.output[0] for n in model.graph.node if n.op_type == "Relu")


@pytest.mark.parametrize("rule", ["epsilon", "boolean", "counting", "viterbi", "rlrp"])
def test_relevance_at_an_inner_tensor(rule):
    """``relevance@T`` is the relevance of T's neurons: the relevance the network behind T gives its input T (the
    references run on that tail with T's activations as input)."""
    rng = np.random.default_rng(40)
    layers, shape = ZOO["cnn"](rng)
    x = rng.normal(size=shape)
    model = ns.to_onnx(layers, shape)
    inner = first_relu_output(model)
    out = run(model, x, rule, relevance_at=[inner])
    head, tail = layers[:3], layers[3:]  # conv, batchnorm, relu | the rest
    hidden = ref.forward(head, x)
    got = out[f"relevance@{inner}"]
    assert got.shape == hidden.shape and got.dtype == np.float32
    target = out["explained_class"]
    if rule == "epsilon":
        assert_close_relative(got, ref.lrp(tail, hidden, "epsilon", target=target, eps=1e-6), 1e-5)
    elif rule == "rlrp":
        expected = ref.rlrp(tail, hidden, target)
        cos = (got * expected).reshape(len(x), -1).sum(1) / (
            np.linalg.norm(got.reshape(len(x), -1), axis=1) * np.linalg.norm(expected.reshape(len(x), -1), axis=1))
        assert cos.min() >= 0.9999
    else:
        expected = sref.klrp(tail, hidden, rule, target=target).astype(np.float64)
        if rule == "viterbi":
            assert_close_relative(got, expected, 1e-5)
        else:
            np.testing.assert_array_equal(got, expected.astype(np.float32))
        if rule == "counting":
            np.testing.assert_array_equal(out[f"relevance_exact@{inner}"], expected)


def test_relevance_at_refuses_tensors_off_the_path():
    model = onnx.load(DIGITS)
    with pytest.raises(OnnxlrpError, match="no tensor of that name"):
        onnxlrp.compile(model, "boolean", relevance_at=["nope"])


# ---------------------------------------------------------------- command line

def test_cli_semirings(tmp_path, capsys):
    assert main(["rules"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("boolean", "counting", "viterbi", "real", "user-defined"))
    assert main(["inspect", str(DIGITS), "--rule", "boolean", "--threshold", "0.001"]) == 0
    assert "boolean(threshold=0.001)" in capsys.readouterr().out
    out = tmp_path / "digits.counting.onnx"
    assert main(["compile", str(DIGITS), "--rule", "counting", "-o", str(out), "--relevance-at",
                 "/classifier/classifier.2/Relu_output_0"]) == 0
    names = [o.name for o in onnx.load(out).graph.output]
    assert names == ["probabilities", "relevance", "relevance_exact",
                     "relevance@/classifier/classifier.2/Relu_output_0",
                     "relevance_exact@/classifier/classifier.2/Relu_output_0", "explained_class"]
    assert main(["compile", str(DIGITS), "--rule", "viterbi", "--threshold", "0.1", "-o", str(tmp_path / "v.onnx")]) \
        == 1
    assert "does not use --threshold" in capsys.readouterr().err
    assert not (tmp_path / "v.onnx").exists()



# ---------------------------------------------------------------- chunks

@pytest.mark.parametrize("rule", ["boolean", "counting", "viterbi", "tropical", "max-threshold"])
@pytest.mark.parametrize("model", ["cnn", "mlp", "depthwise_strided"])
def test_chunked_evaluation_equals_the_reference(rule, model, monkeypatch, tmp_path):
    """Large layers are cut into chunks (output positions, then output channels; the suspicious neurons of the
    threshold fast path in several Loop iterations; a dense layer's 0/1 matrices a few rows at a time). With the
    chunk sizes made tiny every layer here is cut, and the result is unchanged."""
    from onnxlrp.passes import semiring_fast, semiring_pairs

    monkeypatch.setattr(semiring_pairs, "CHUNK_PAIRS", 40)
    monkeypatch.setattr(semiring_fast, "SUSPICIOUS_CHUNK_PAIRS", 30)
    monkeypatch.setattr(semiring_fast, "DENSE_CHUNK", 20)
    rng = np.random.default_rng(41)
    layers, shape = ZOO[model](rng)
    x = rng.normal(size=shape)
    options, spec, theta = {}, rule, 1e-9
    if rule in ("boolean", "counting"):
        theta = 0.1  # many suspicious neurons: several Loop iterations
        options = {"threshold": theta}
    elif rule == "tropical":
        options, spec = {"composite": semiring_file(tmp_path, TROPICAL)}, ("max", "add", -1e30, 0.0,
                                                                          "log-abs-normalized")
    elif rule == "max-threshold":
        theta = 0.05
        body = 'plus = "max"\ntimes = "mul"\nzero = 0.0\none = 1.0\nannotation = "threshold"\n'
        options = {"composite": semiring_file(tmp_path, body, f"[[layer]]\nthreshold = {theta}\n")}
        spec = ("max", "mul", 0, 1, "threshold")
    out, expected = compare(rule if rule in sref.BUILTIN else "unused", layers, shape, x, reference_rule=spec,
                            theta=theta, **options)
    expected = expected.astype(np.float64)
    got = out.get("relevance_exact", out["relevance"])
    if rule in ("boolean", "counting", "max-threshold"):
        np.testing.assert_array_equal(got, expected)
    else:
        relevant = expected > -1e29
        np.testing.assert_array_equal(got > -1e29, relevant)
        assert_close_relative(got[relevant], expected[relevant], 1e-5)


# ---------------------------------------------------------------- file size

@pytest.mark.parametrize("rule", ["boolean", "counting", "viterbi", "real", "tropical"])
def test_compiled_size_holds_each_weight_once(rule, tmp_path):
    """As for the other rules (test_size.py): at most 1.05x the source plus 1 MB. The 0/1 kernels, |W|, log |W| and
    the rearranged weights of the pair-by-pair evaluation are ops over the model's initializers."""
    from test_size import RATIO, SLACK_BYTES, resnet_like, saved_size

    rng = np.random.default_rng(42)
    layers, shape = resnet_like(rng)
    model = ns.to_onnx(layers, shape)
    source_bytes = saved_size(model, tmp_path / "source.onnx")
    options = {"composite": semiring_file(tmp_path, TROPICAL)} if rule == "tropical" else {}
    compiled = onnxlrp.compile(model, rule if rule != "tropical" else "unused", **options)
    assert saved_size(compiled, tmp_path / "compiled.onnx") <= RATIO * source_bytes + SLACK_BYTES
    out = run(model, rng.uniform(-1.0, 1.0, size=shape), rule if rule != "tropical" else "unused", **options)
    assert np.any(out["relevance"] != (-1e30 if rule == "tropical" else 0))
