"""The compiled model's contract, the Python API and the compile/inspect/rules CLI."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import netspec as ns
import numpy as np
import onnx
import pytest
import reference as ref
from graph_reference import GraphReference
from helpers import assert_close_relative, check_against_graph_reference, session
from onnx import TensorProto, helper, numpy_helper
from spec_zoo import ZOO

import onnxlrp
from onnxlrp.cli import main
from onnxlrp.errors import OnnxlrpError, UnsupportedOpError
from onnxlrp.runtime import with_target

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"


def digits(n=4):
    data = np.load(ROOT / "models" / "digits_test.npz")
    return data["images"][:n, None].astype(np.float32) / 255


def test_contract_inputs_outputs_metadata():
    compiled = onnxlrp.compile(str(DIGITS), "epsilon-plus-flat")
    source = onnx.load(DIGITS)
    assert [i.name for i in compiled.graph.input] == [i.name for i in source.graph.input] + ["target"]
    assert compiled.graph.input[0].type == source.graph.input[0].type  # name, type and dynamic batch kept
    assert [o.name for o in compiled.graph.output] == ["probabilities", "relevance", "explained_class"]
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["onnxlrp.source_sha256"] == hashlib.sha256(DIGITS.read_bytes()).hexdigest()
    assert meta["onnxlrp.version"] == onnxlrp.__version__ and meta["onnxlrp.rule"] == "epsilon-plus-flat"
    plan = json.loads(meta["onnxlrp.plan"])
    assert list(plan.values())[0].startswith("flat") and list(plan.values())[-1].startswith("epsilon")
    assert meta["onnxlrp.explained"].endswith("Gemm_output_0")  # the logits before the Softmax
    assert compiled.ir_version <= 10


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_default_target_and_unchanged_outputs(batch):
    """The bundled model at batch 1 and 5: original outputs unchanged, the predicted class explained, the relevance
    of the float64 graph reference (R-LRP: cosine >= 0.9999 per sample)."""
    x = digits(batch)
    compiled = onnxlrp.compile(str(DIGITS), "rlrp")
    sess = session(compiled)
    probabilities, relevance, cls = sess.run(None, {"image": x, "target": np.full(batch, -1)})  # the predicted class
    expected = session(onnx.load(DIGITS)).run(None, {"image": x})[0]
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(cls, expected.argmax(1))
    assert relevance.shape == x.shape and relevance.dtype == np.float32
    source = onnx.load(DIGITS)
    logits = next(n.input[0] for n in source.graph.node if n.op_type == "Softmax")
    check_against_graph_reference(GraphReference(source, logits, "image"), compiled, x,
                                  {"relevance": relevance, "explained_class": cls}, "rlrp")
    _, _, cls = sess.run(None, {"image": x, "target": np.full(batch, 3, dtype=np.int64)})
    assert list(cls) == [3] * batch


def test_explainer_api_reports_provider():
    explainer = onnxlrp.Explainer(str(DIGITS), rule="epsilon")
    result = explainer(digits(3), target=[1, 2, 3])
    assert explainer.provider == "CPUExecutionProvider"
    assert list(result.explained_class) == [1, 2, 3]
    assert set(result.outputs) == {"probabilities"} and result.relevance.shape == (3, 1, 28, 28)


def test_node_output_and_output_select_the_explained_tensor():
    rng = np.random.default_rng(30)
    layers, shape = ZOO["mlp"](rng)
    x = rng.normal(size=shape)
    model = ns.to_onnx(layers, shape, softmax=True)
    sess = session(onnxlrp.compile(model, "epsilon", node_output="logits"))
    relevance = sess.run(["relevance"], with_target(sess, {"x": x.astype(np.float32)}))[0]
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon"), 1e-5)
    with pytest.raises(OnnxlrpError, match="not a graph output"):
        onnxlrp.compile(model, "epsilon", output="nope")


def unsupported_model():
    """x -> Relu -> (Div of two activations) -> Hardmax-free custom op on the path."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Div", ["a", "a"], ["sq"], name="square"),
             helper.make_node("Weird", ["sq"], ["w"], name="custom", domain="my.domain"),
             helper.make_node("MatMul", ["w", "W"], ["y"], name="dense")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(np.ones((4, 2), np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])


def test_every_unsupported_node_is_listed():
    with pytest.raises(UnsupportedOpError) as err:
        onnxlrp.compile(unsupported_model(), "epsilon")
    message = str(err.value)
    assert message.startswith("model: 2 node(s)")  # an in-memory model is named "model"
    assert "Div x1 (square: a quotient" in message and "my.domain.Weird x1 (custom: no relevance rule" in message
    assert "\n" not in message


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxlrp.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_compile_default_output_name_and_no_warnings(tmp_path):
    model = tmp_path / "digits.onnx"
    model.write_bytes(DIGITS.read_bytes())
    done = run_cli("compile", model, "--rule", "cmp", "--flat-layers", "2")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # a normal compile prints no warnings
    written = tmp_path / "digits.cmp.onnx"
    assert written.exists() and "wrote" in done.stdout
    plan = json.loads({p.key: p.value for p in onnx.load(written).metadata_props}["onnxlrp.plan"])
    assert [r.split("(")[0] for r in plan.values()] == ["flat", "flat", "winner-take-all", "epsilon", "epsilon"]


@pytest.mark.parametrize("args,code,text", [
    (["compile", "missing.onnx"], 1, "missing.onnx: no such file"),
    (["compile", "junk.onnx"], 1, "not an ONNX model"),
    (["compile", "model.onnx", "--rule", "nope"], 1, "unknown rule 'nope'; valid rules and composites: lrp0"),
    (["compile", "model.onnx", "--rule", "epsilon", "--gamma", "2"], 1, "does not use --gamma"),
    (["compile", "model.onnx", "--rule", "alpha-beta", "--alpha", "3", "--beta", "1"], 1, "alpha - beta = 1"),
    (["compile", "model.onnx", "--rule", "epsilon", "--epsilon", "-0.01"], 1, "epsilon must be >= 0 (got -0.01)"),
    (["compile", "model.onnx", "--rule", "epsilon", "--epsilon", "nan"], 1, "epsilon must be a finite number"),
    (["compile", "model.onnx", "--rule", "gamma", "--gamma", "-1"], 1, "gamma must be >= 0 (got -1.0)"),
    (["compile", "model.onnx", "--rule", "zbox", "--low", "-inf"], 1, "low must be a finite number"),
    (["compile", "unsupported.onnx"], 2, "2 node(s) on the relevance path have no rule"),
    (["inspect", "unsupported.onnx"], 2, "custom (Weird, domain my.domain"),
])
def test_cli_errors_are_one_line_without_output(tmp_path, args, code, text):
    (tmp_path / "junk.onnx").write_bytes(b"\x89PNG\r\n\x1a\n not a model")
    (tmp_path / "model.onnx").write_bytes(DIGITS.read_bytes())
    onnx.save(unsupported_model(), tmp_path / "unsupported.onnx")
    before = set(tmp_path.iterdir())
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == code
    stream = done.stdout if args[0] == "inspect" else done.stderr
    assert text in stream
    if args[0] == "compile":
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert set(tmp_path.iterdir()) == before  # nothing written


def test_cli_debug_shows_the_traceback(tmp_path):
    done = run_cli("--debug", "compile", tmp_path / "missing.onnx")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_rules_lists_rules_and_composites(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for name in ("rlrp", "epsilon", "zbox", "epsilon-gamma-box", "epsilon-alpha2-beta1-flat", "cmp", "uniform",
                 "linearized", "attnlrp", "cp-lrp", "lxt-epsilon", "softmax-taylor", "uniform-epsilon", "lxt-norm",
                 "activation-gate"):
        assert f"  {name} " in out


def test_inspect_prints_the_plan(capsys):
    assert main(["inspect", str(DIGITS), "--rule", "epsilon-gamma-box", "--low", "0", "--high", "1"]) == 0
    out = capsys.readouterr().out
    assert "/features/features.0/Conv: zbox(low=0.0, high=1.0" in out and "gamma(gamma=0.25" in out


def test_float16_model_gives_float16_outputs_and_float32_relevance():
    """A float16 model keeps its float16 forward pass; the relevance is computed in float32 from its values."""
    from onnxlrp.passes.canonicalize import to_float16

    rng = np.random.default_rng(31)
    layers, shape = ZOO["residual"](rng)
    x = rng.normal(size=shape)
    model16 = ns.to_onnx(layers, shape)
    to_float16(model16)
    compiled = onnxlrp.compile(model16, "epsilon")
    # no stand-in for a float16 join's operand (half an ulp of the join's output would be 5e-4 of it)
    assert not any("z_stand_in" in n.name for n in compiled.graph.node)
    sess = session(compiled)
    y, relevance, _ = sess.run(None, with_target(sess, {"x": x.astype(np.float16)}))
    assert y.dtype == np.float16 and relevance.dtype == np.float32
    # onnxruntime's CPU provider runs ops that lack float16 kernels in float32, placing those casts per graph, so
    # the two graphs may differ by an ulp (they are equal with the same placement)
    source = session(model16).run(None, {"x": x.astype(np.float16)})[0]
    ulp = np.spacing(np.abs(source).max())
    assert np.abs(y.astype(np.float64) - source).max() <= 2 * ulp
    expected = ref.lrp(layers, x.astype(np.float16).astype(np.float64), "epsilon")
    assert_close_relative(relevance, expected, 2e-2)  # float16 activations: ~1e-3 relative each
    fp16 = onnxlrp.compile(ns.to_onnx(layers, shape), "rlrp", precision="fp16")
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    fp16_session = session(fp16)
    feeds = with_target(fp16_session, {"x": x.astype(np.float16)})
    assert np.all(np.isfinite(fp16_session.run(["relevance"], feeds)[0]))


def test_static_batch_model_takes_a_target_of_its_batch():
    rng = np.random.default_rng(32)
    layers, shape = ZOO["cnn"](rng)
    x = rng.normal(size=shape)
    model = ns.to_onnx(layers, shape, dynamic_batch=False)
    sess = session(onnxlrp.compile(model, "epsilon"))
    _, relevance, cls = sess.run(None, {"x": x.astype(np.float32), "target": np.array([-1, -1])})
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon"), 1e-5)
    _, _, cls = sess.run(None, {"x": x.astype(np.float32), "target": np.array([1, -1])})
    assert cls[0] == 1 and cls[1] == ref.forward(layers, x)[1].argmax()


def test_open_spatial_dims_ask_for_input_shape(tmp_path, capsys):
    rng = np.random.default_rng(33)
    layers, shape = ZOO["cnn"](rng)
    model = ns.to_onnx(layers, shape)
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.Clear()
        dim.dim_param = "side"
    path, out = tmp_path / "open.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    assert main(["compile", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "input 'x' has open dims" in err and "--input-shape x=-1,2,N,N" in err and not out.exists()
    assert main(["compile", str(path), "-o", str(out), "--input-shape", "x=-1,2,6,6"]) == 0
    x = rng.normal(size=shape)
    sess = session(onnx.load(out))
    relevance = sess.run(["relevance"], with_target(sess, {"x": x.astype(np.float32)}))[0]
    assert_close_relative(relevance, ref.rlrp(layers, x), 1e-4)


def test_models_past_the_protobuf_limit_go_through_external_data(tmp_path, monkeypatch):
    """Models over 2 GB: compile never serializes the whole model, the Explainer and the CLI use external data.
    The thresholds are lowered so that a small model takes the same code paths."""
    import onnxlrp.io.save
    import onnxlrp.runtime

    monkeypatch.setattr(onnxlrp.runtime, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setattr(onnxlrp.io.save, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr("onnxlrp.passes.canonicalize.LIGHT_INITIALIZER_BYTES", 0)
    x = digits(2)
    result = onnxlrp.Explainer(str(DIGITS), rule="epsilon")(x)
    out = tmp_path / "big.onnx"
    assert main(["compile", str(DIGITS), "--rule", "epsilon", "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    again = onnxlrp.Explainer(str(out))(x)
    np.testing.assert_array_equal(again.relevance, result.relevance)
    monkeypatch.undo()
    np.testing.assert_allclose(onnxlrp.Explainer(str(DIGITS), rule="epsilon")(x).relevance, result.relevance,
                               rtol=1e-6)
