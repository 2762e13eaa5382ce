"""One load path for files and in-memory models, the streamed source digest, the one SIGTERM guard and atomic
writer, and the outer-scope walker (onnxlrp.io, onnxlrp.scopes)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import netspec as ns
import numpy as np
import onnx
import pytest
import reference as ref
from google.protobuf.unknown_fields import UnknownFieldSet
from helpers import assert_close_relative, session
from onnx import TensorProto, helper, numpy_helper
from spec_zoo import ZOO
from test_loading import CANARY, _bomb_model, _tensor_model, canary_model, one_line, small_model, write

import onnxlrp
from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import digest, read_model, sigterm_guard, wire, write_atomic
from onnxlrp.runtime import with_target
from onnxlrp.scopes import implicit_inputs, outer_names

# ----------------------------------------------------------------------------------------------
# one load path


def unsorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its nodes in reverse order (a valid model: ONNX does not require sorted nodes)."""
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    return model


def test_unsorted_nodes_compile_from_memory_and_from_a_file_alike(tmp_path: Path) -> None:
    """Until the one load path, the in-memory compile skipped the sorting and failed with 'Input 0 expected to have
    type but instead is null'."""
    rng = np.random.default_rng(41)
    layers, shape = ZOO["cnn"](rng)
    model = unsorted(ns.to_onnx(layers, shape))
    given = model.SerializeToString()
    path = write(model, tmp_path / "unsorted.onnx")
    from_memory = onnxlrp.compile(model, "epsilon")
    from_file = onnxlrp.compile(str(path), "epsilon")
    assert model.SerializeToString() == given  # the caller's model is not modified
    # the same model: the same graph, and the same source digest (the file holds the model's serialization)
    assert from_memory.SerializeToString() == from_file.SerializeToString()
    x = rng.normal(size=shape)
    sess = session(from_memory)
    relevance = sess.run(["relevance"], with_target(sess, {"x": x.astype(np.float32)}))[0]
    assert_close_relative(relevance, ref.lrp(layers, x, "epsilon"), 1e-5)
    explained = onnxlrp.Explainer(model, rule="epsilon")(x.astype(np.float32))
    np.testing.assert_array_equal(explained.relevance, relevance)


def cycle_model() -> onnx.ModelProto:
    model = small_model()
    model.graph.node[0].input[0] = "f"  # conv reads flatten's output: conv -> relu -> flatten -> conv
    return model


def undefined_input_model() -> onnx.ModelProto:
    model = small_model()
    model.graph.node[1].input[0] = "ghost"
    return model


def unknown_op_model() -> onnx.ModelProto:
    model = small_model()
    model.graph.node[1].op_type = "NoSuchOp"
    return model


def duplicate_output_model() -> onnx.ModelProto:
    model = small_model()
    model.graph.output.append(model.graph.output[0])
    return model


HOSTILE = {
    "2**62 elements": lambda: _tensor_model(
        TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[2**62], raw_data=b"\0\0\0\0")),
    "negative dim": lambda: _tensor_model(TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[-1],
                                                      float_data=[1.0])),
    "cycle": cycle_model,
    "undefined input": undefined_input_model,
    "duplicate outputs": duplicate_output_model,
    "IR 99": lambda: small_model(ir_version=99),
    "opset 99": lambda: small_model(opset=99),
    "ConstantOfShape bomb": lambda: _bomb_model("ConstantOfShape", [np.array([2**40], np.int64)]),
    "unknown op": unknown_op_model,
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_model_in_memory_gets_the_files_error(tmp_path: Path, case: str) -> None:
    """The same checks in the same order: the same one line, with ``model`` where a file has its path."""
    path = write(HOSTILE[case](), tmp_path / "m.onnx")
    with pytest.raises(OnnxlrpError) as from_file:
        onnxlrp.compile(str(path), "epsilon")
    with pytest.raises(OnnxlrpError) as from_memory:
        onnxlrp.compile(HOSTILE[case](), "epsilon")
    file_line = one_line(from_file)
    assert str(path) in file_line
    assert one_line(from_memory) == file_line.replace(str(path), "model")
    with pytest.raises(OnnxlrpError) as inspected:
        onnxlrp.inspect(HOSTILE[case](), "epsilon")
    assert str(inspected.value) == str(from_memory.value)


def test_in_memory_model_with_external_data_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No file is read on behalf of a model given in memory: its external data has no folder to be relative to."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(CANARY)
    path = write(canary_model("w.bin"), folder / "m.onnx")
    assert read_model(path)[0].graph.initializer[0].raw_data == CANARY  # from the file: read and checked
    monkeypatch.chdir(folder)  # where a relative location would resolve if anything followed it
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_open(p, *a, **k))
    with pytest.raises(OnnxlrpError) as err:
        read_model(onnx.load(str(path), load_external_data=False))
    assert one_line(err).startswith("model: initializer 'secret' refers to external data ('w.bin')")
    assert not [p for p in opened if p.endswith("w.bin")]


def test_read_model_refuses_what_is_not_a_model() -> None:
    with pytest.raises(OnnxlrpError, match="expected an onnx.ModelProto or the path of an ONNX file, got bytes"):
        read_model(small_model().SerializeToString())


# ----------------------------------------------------------------------------------------------
# the source digest


def test_file_digest_is_the_sha256_of_its_bytes(tmp_path: Path) -> None:
    path = write(unsorted(small_model()), tmp_path / "m.onnx")
    model, sha = read_model(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.SerializeToString() != path.read_bytes()  # sorted and shape-inferred: the file's bytes are hashed


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint, written out here for the test's unknown fields."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out) + bytes([value])


def rich_model() -> onnx.ModelProto:
    """A model with a large initializer and every kind of field protobuf writes: packed and unpacked repeated
    numbers, negative int64 (10-byte varints), strings, bytes, nested and repeated messages, a subgraph, a function,
    metadata, and unknown fields in the model and in a tensor (varint, fixed64, length-delimited, fixed32, group)."""
    rng = np.random.default_rng(7)
    big = numpy_helper.from_array(rng.standard_normal((256, 300)).astype(np.float32), "big")  # 300 KB of raw_data
    floats = TensorProto(name="floats", data_type=TensorProto.FLOAT, dims=[5], float_data=[1.5, -2, 0, 3e38, -1e-38])
    ints = TensorProto(name="ints", data_type=TensorProto.INT64, dims=[3], int64_data=[-1, 2**62, -(2**40)])
    text = TensorProto(name="text", data_type=TensorProto.STRING, dims=[2], string_data=[b"\xff\x00", "é".encode()])
    then_branch = helper.make_graph([helper.make_node("Add", ["big", "inner"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [256, 300])],
                                    [numpy_helper.from_array(np.ones((256, 300), np.float32), "inner")])
    else_branch = helper.make_graph([helper.make_node("Identity", ["big"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [256, 300])])
    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.arange(6.0), "k"), name="κ"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
             helper.make_node("LeakyRelu", ["y"], ["z"], alpha=-0.5, doc_string="ünïcode")]
    graph = helper.make_graph(nodes, "rich", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [256, 300])],
                              [big, floats, ints, text])
    function = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])],
                                    [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[function], doc_string="d" * 100)
    helper.set_model_props(model, {"author": "ß", "empty": ""})
    unknown = (_varint(1000 << 3 | 0) + _varint(2**63 + 5) + _varint(1001 << 3 | 1) + (7).to_bytes(8, "little")
               + _varint(1002 << 3 | 2) + _varint(3) + b"abc" + _varint(1003 << 3 | 5) + (9).to_bytes(4, "little")
               + _varint(1004 << 3 | 3) + _varint(1 << 3 | 0) + _varint(42) + _varint(1004 << 3 | 4))
    model.graph.initializer[0].MergeFromString(unknown)
    model.MergeFromString(unknown)
    return model


@pytest.mark.parametrize("everything_streamed", [False, True], ids=["bulk-streamed", "all-streamed"])
def test_streamed_digest_equals_the_sha256_of_the_serialization(monkeypatch: pytest.MonkeyPatch,
                                                                everything_streamed: bool) -> None:
    """The model, its graph, the tensors and the nodes holding tensors or subgraphs are written field by field (the
    300 kB raw_data goes to the hash on its own); with ``everything_streamed`` so are the small messages (value
    infos, types, opsets...), which are otherwise serialized whole. The reference is protobuf's own serializer."""
    model = rich_model()
    assert len(UnknownFieldSet(model)) == len(UnknownFieldSet(model.graph.initializer[0])) == 5
    reference = model.SerializeToString()
    if everything_streamed:
        monkeypatch.setattr(wire, "streamed", lambda msg: True)
    pieces = list(wire.serialized_pieces(model))
    assert b"".join(pieces) == reference
    assert model.graph.initializer[0].raw_data in pieces  # handed over on its own
    assert wire.serialized_size(model) == len(reference)
    assert digest.model_digest(model) == hashlib.sha256(reference).hexdigest()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-1] + b"\x01"  # one byte changed
    assert digest.model_digest(model) != hashlib.sha256(reference).hexdigest()


def test_in_memory_digest_is_the_digest_of_the_saved_file(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert read_model(model)[1] == read_model(path)[1] == hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# the SIGTERM guard and the atomic writer


@pytest.fixture
def sigterm_recorder():
    """A Python SIGTERM handler that records the signal and returns: the guard must then raise."""
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_a_write_leaves_nothing_and_reaches_the_previous_handler(tmp_path: Path,
                                                                                sigterm_recorder) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def killed_mid_write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(OnnxlrpError) as err:
        write_atomic(target, killed_mid_write)
    assert one_line(err) == f"writing {target} was interrupted by SIGTERM"
    assert sigterm_recorder == [signal.SIGTERM]
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_nested_sigterm_guards_unwind_in_turn(tmp_path: Path, sigterm_recorder) -> None:
    """The inner guard (the writer's) cleans up and hands SIGTERM to the outer one, which unwinds its own block
    (its ``finally`` runs, the rest does not) and hands it to the handler before both."""
    steps: list[str] = []
    with pytest.raises(OnnxlrpError, match="^an app run was interrupted by SIGTERM$"):
        with sigterm_guard("an app run"):
            try:
                write_atomic(tmp_path / "a.bin", lambda tmp: os.kill(os.getpid(), signal.SIGTERM))
                steps.append("after the write")
            finally:
                steps.append("outer finally")
    assert steps == ["outer finally"] and sigterm_recorder == [signal.SIGTERM]
    assert os.listdir(tmp_path) == []
    os.kill(os.getpid(), signal.SIGTERM)  # both guards are gone: the handler from before them gets it
    assert sigterm_recorder == [signal.SIGTERM, signal.SIGTERM]


# ----------------------------------------------------------------------------------------------
# names a subgraph reads from outer scope


def test_outer_names_include_nested_reads_and_returned_outer_tensors() -> None:
    """``then`` returns the outer tensor ``a`` as it is; ``else`` holds a Loop whose body reads ``b`` two scopes
    up and its own input ``i``; locals (``l``, the body's ``i``, ``cond``) are not outer reads."""
    vi = helper.make_tensor_value_info
    body = helper.make_graph([helper.make_node("Add", ["i", "b"], ["o"]), helper.make_node("Identity", ["c"], ["c2"])],
                             "body", [vi("i", TensorProto.INT64, []), vi("c", TensorProto.BOOL, [])],
                             [vi("c2", TensorProto.BOOL, []), vi("o", TensorProto.FLOAT, None)])
    then_branch = helper.make_graph([], "then", [], [vi("a", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["l"], value_int=3),
         helper.make_node("Loop", ["l", "", "a"], ["e"], body=body)],
        "else", [], [vi("e", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)
    assert outer_names(then_branch) == {"a"}
    assert outer_names(body) == {"b"}
    assert outer_names(else_branch) == {"a", "b"}
    assert implicit_inputs(node) == {"a", "b"}


_EXPLAIN_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    import onnxlrp.heatmap
    from onnxlrp.apps import run_explain

    def stalled(path, relevance, **kwargs):
        open(path, "wb").write(b"partial png")
        print("writing", flush=True)
        time.sleep(60)

    onnxlrp.heatmap.save_heatmap = stalled
    run_explain({model!r}, [{samples!r}], out_dir=sys.argv[1])
    print("done", flush=True)
    """
)


def test_sigterm_during_explain_leaves_no_file_and_ends_the_process(tmp_path: Path) -> None:
    """SIGTERM while explain writes its first heatmap: the writer's guard removes the temp file and hands the
    signal to explain's guard, which unwinds the run and hands it to the default handler."""
    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "child.py"
    script.write_text(_EXPLAIN_CHILD.format(repo=str(repo), model=str(repo / "models" / "digits_cnn.onnx"),
                                            samples=str(repo / "models" / "samples" / "digit_0.png")))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = iter(proc.stdout.readline, "")
        assert next(line for line in lines if line.strip() in ("writing", "done")).strip() == "writing"
        assert [p.name for p in out.iterdir() if p.name.startswith(".digit_0.png.")]  # the temp file exists
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == -signal.SIGTERM
    assert os.listdir(out) == []
