"""Hostile and broken ONNX files: every case ends in a checked model or one OnnxlrpError line."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import (
    check_domains,
    check_resource_bombs,
    check_structure,
    check_tensor_sizes,
    clamp_ir_version,
    load_model,
    save_model_atomic,
)
from onnxlrp.io import checker as checking
from onnxlrp.io import save as saving

REPO = Path(__file__).resolve().parent.parent
CANARY = b"CANARY-7f3a9c-DO-NOT-READ-" * 100  # 2600 bytes; also the exact size some tests claim


# ----------------------------------------------------------------------------------------------
# model builders


def small_model(ir_version: int = 8, opset: int = 17, side: int = 8) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm on a 1x1xSIDExSIDE input, 10 outputs."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(np.linspace(-1, 1, 4).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal((10, 4 * (side - 2) ** 2)).astype(np.float32), "G"),
        numpy_helper.from_array(np.zeros(10, np.float32), "C"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "G", "C"], ["y"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def make_external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> onnx.ModelProto:
    """Move every initializer's bytes into ``folder/location`` (written here), referenced relatively."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    blob = bytearray()
    for t in model.graph.initializer:
        raw = numpy_helper.to_array(t).tobytes()
        offset = len(blob)
        blob += raw
        t.ClearField("raw_data")
        t.ClearField("float_data")
        set_external(t, location, offset, len(raw))
    target = folder / location
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(blob))
    return model


def set_external(t: TensorProto, location: str, offset: int | None = 0, length: int | None = None) -> None:
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)


def canary_model(location: str, *, offset: int = 0, length: int | None = len(CANARY)) -> onnx.ModelProto:
    """A model whose one initializer (650 floats == len(CANARY) bytes) is external at ``location``."""
    t = TensorProto()
    t.name = "secret"
    t.data_type = TensorProto.FLOAT
    t.dims.extend([len(CANARY) // 4])
    set_external(t, location, offset, length)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "secret"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(CANARY) // 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(CANARY) // 4])],
        [t],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def one_line(err: pytest.ExceptionInfo[OnnxlrpError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg
    assert len(msg) < 2000
    return msg


# ----------------------------------------------------------------------------------------------
# valid models


def test_valid_model_loads_checks_and_infers(tmp_path: Path) -> None:
    path = write(small_model(), tmp_path / "m.onnx")
    model = load_model(path)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "Flatten", "Gemm"]
    assert {vi.name for vi in model.graph.value_info} == {"c", "r", "f"}
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(model, x), run_ort(small_model(), x), rtol=1e-6)


def test_external_data_is_read_into_raw_data(tmp_path: Path) -> None:
    base = small_model()
    path = write(make_external(base, tmp_path, "sub/weights.bin"), tmp_path / "m.onnx")
    model = load_model(path)
    for t, ref in zip(model.graph.initializer, base.graph.initializer, strict=True):
        assert t.data_location == TensorProto.DEFAULT and not len(t.external_data)
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(ref))


def test_external_data_without_length_reads_to_end_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "w.bin").parent.mkdir()
    (folder / "w.bin").write_bytes(b"\0" * 8 + CANARY)
    model = load_model(write(canary_model("w.bin", offset=8, length=None), folder / "m.onnx"))
    assert model.graph.initializer[0].raw_data == CANARY


# ----------------------------------------------------------------------------------------------
# not a model


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (np.random.default_rng(5).bytes(4096), "not an ONNX model"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "PNG"),
        (b"\x08\x07", "no graph"),  # parses: ir_version only
        (b"\x3a\x00", "no ir_version"),  # parses: empty graph only
    ],
    ids=["empty", "random", "png", "ir-only", "empty-graph"],
)
def test_not_a_model(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxlrpError) as err:
        load_model(path)
    msg = one_line(err)
    assert str(path) in msg and needle in msg


def test_real_png_renamed_onnx(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "cat.onnx"
    Image.new("RGB", (4, 4)).save(path, format="PNG")
    with pytest.raises(OnnxlrpError, match="not an ONNX model.*PNG"):
        load_model(path)


@pytest.mark.parametrize("cut", [1, 7, 100, -30, -1])
def test_truncated_model(tmp_path: Path, cut: int) -> None:
    data = small_model().SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[:cut])
    with pytest.raises(OnnxlrpError) as err:
        load_model(path)
    assert str(path) in one_line(err)


def test_missing_path_folder_and_fifo(tmp_path: Path) -> None:
    with pytest.raises(OnnxlrpError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(OnnxlrpError, match="is a folder"):
        load_model(tmp_path)
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    with pytest.raises(OnnxlrpError, match="not a regular file"):
        load_model(fifo)


def test_unreadable_file(tmp_path: Path) -> None:
    path = write(small_model(), tmp_path / "m.onnx")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading")
        with pytest.raises(OnnxlrpError, match="cannot read"):
            load_model(path)
    finally:
        path.chmod(0o644)


def test_control_characters_in_path_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "evil\x1b[31m\rname.onnx"
    path.write_bytes(b"")
    with pytest.raises(OnnxlrpError) as err:
        load_model(path)
    assert "\\x1b[31m\\rname.onnx" in one_line(err)


def test_invalid_utf8_names_are_refused(tmp_path: Path) -> None:
    data = small_model().SerializeToString().replace(b"relu", b"r\xffl\xfe")
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    with pytest.raises(OnnxlrpError, match="not an ONNX model"):
        load_model(path)


# ----------------------------------------------------------------------------------------------
# external data: nothing outside the model's folder is ever opened


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path, list[str]]]:
    """(model folder, canary path, paths os.open was called with)."""
    folder = tmp_path / "model"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary.bin"
    canary.write_bytes(CANARY)
    opened: list[str] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):  # noqa: ANN001, ANN202
        opened.append(os.path.realpath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    yield folder, canary, opened
    assert os.path.realpath(canary) not in opened, "the canary file was opened"


def _expect_refusal(path: Path, *needles: str) -> str:
    with pytest.raises(OnnxlrpError) as err:
        load_model(path)
    msg = one_line(err)
    assert CANARY[:20].decode() not in msg
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.mark.parametrize(
    "location, needle",
    [
        ("../outside/canary.bin", "'..'"),
        ("sub/../../outside/canary.bin", "'..'"),
        ("..\\outside\\canary.bin", "'..'"),
        ("C:\\outside\\canary.bin", "drive"),
        ("\\\\server\\share\\canary.bin", "absolute"),
        ("", "no location"),
    ],
)
def test_external_location_refused(sandbox: tuple[Path, Path, list[str]], location: str, needle: str) -> None:
    folder, _canary, _ = sandbox
    _expect_refusal(write(canary_model(location), folder / "m.onnx"), needle)


def test_external_absolute_path_refused(sandbox: tuple[Path, Path, list[str]]) -> None:
    folder, canary, _ = sandbox
    _expect_refusal(write(canary_model(str(canary)), folder / "m.onnx"), "absolute")


def test_external_symlinked_file_refused(sandbox: tuple[Path, Path, list[str]]) -> None:
    folder, canary, _ = sandbox
    (folder / "w.bin").symlink_to(canary)
    _expect_refusal(write(canary_model("w.bin"), folder / "m.onnx"), "symbolic link")


def test_external_file_under_symlinked_folder_refused(sandbox: tuple[Path, Path, list[str]]) -> None:
    folder, canary, _ = sandbox
    (folder / "sub").symlink_to(canary.parent, target_is_directory=True)
    _expect_refusal(write(canary_model("sub/canary.bin"), folder / "m.onnx"), "symbolic link")


def test_external_hard_link_refused(sandbox: tuple[Path, Path, list[str]]) -> None:
    folder, canary, _ = sandbox
    try:
        os.link(canary, folder / "w.bin")
    except OSError as err:
        pytest.skip(f"no hard links here: {err}")
    _expect_refusal(write(canary_model("w.bin"), folder / "m.onnx"), "hard links")


@pytest.mark.parametrize(
    "offset, length, needle",
    [
        (-1, len(CANARY), "negative external data offset"),
        (len(CANARY) + 1, 4, "past the end"),
        (8, len(CANARY), "past the end"),
        (0, 2**60, "past the end"),
        (0, -5, "negative external data length"),
        (0, 16, "does not match"),
    ],
)
def test_external_offsets_refused(sandbox: tuple[Path, Path, list[str]], offset: int, length: int, needle: str) -> None:
    folder, _, _ = sandbox
    (folder / "w.bin").write_bytes(b"x" * len(CANARY))
    _expect_refusal(write(canary_model("w.bin", offset=offset, length=length), folder / "m.onnx"), needle)


def test_external_non_numeric_offset(sandbox: tuple[Path, Path, list[str]]) -> None:
    folder, _, _ = sandbox
    (folder / "w.bin").write_bytes(b"x" * len(CANARY))
    model = canary_model("w.bin")
    model.graph.initializer[0].external_data[1].value = "12abc"
    _expect_refusal(write(model, folder / "m.onnx"), "not a number")


def test_external_missing_file_names_tensor_and_path(sandbox: tuple[Path, Path, list[str]]) -> None:
    folder, _, _ = sandbox
    msg = _expect_refusal(write(canary_model("weights/w.bin"), folder / "m.onnx"), "not found")
    assert "'secret'" in msg
    assert str(folder / "weights" / "w.bin") in msg


def test_external_data_is_a_folder(sandbox: tuple[Path, Path, list[str]]) -> None:
    folder, _, _ = sandbox
    (folder / "w.bin").mkdir()
    _expect_refusal(write(canary_model("w.bin"), folder / "m.onnx"), "not a regular file")


def test_external_canary_never_in_model_or_error(sandbox: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    """Every refusal above leaves the canary unread; a valid sibling file is read, and only it."""
    folder, _, opened = sandbox
    (folder / "w.bin").write_bytes(b"\x00" * len(CANARY))
    model = load_model(write(canary_model("w.bin"), folder / "m.onnx"))
    assert model.graph.initializer[0].raw_data == b"\x00" * len(CANARY)
    assert CANARY[:20] not in model.SerializeToString()
    assert os.path.realpath(folder / "w.bin") in opened


# ----------------------------------------------------------------------------------------------
# sizes and resource bombs


def _tensor_model(t: TensorProto) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", [t.name], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", t.data_type, None)],
        [t],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_initializer_claiming_2_62_elements_with_4_bytes(tmp_path: Path) -> None:
    t = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[2**62], raw_data=b"\0\0\0\0")
    path = write(_tensor_model(t), tmp_path / "m.onnx")
    start = time.perf_counter()
    with pytest.raises(OnnxlrpError) as err:
        load_model(path)
    assert time.perf_counter() - start < 5
    assert "'huge'" in one_line(err) and "holds 4 bytes" in str(err.value)


@pytest.mark.parametrize(
    "tensor, needle",
    [
        (TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[3], float_data=[1.0, 2.0]), "holds 2 values"),
        (TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[-1], float_data=[1.0]), "negative dimension"),
        (TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[5]), "holds no data"),
        (TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[1], int64_data=[1]), "wrong field"),
        (TensorProto(name="t", data_type=99, dims=[1], raw_data=b"\0"), "unknown data type"),
        (TensorProto(name="t", data_type=TensorProto.INT64, dims=[2], raw_data=b"\0" * 15), "holds 15 bytes"),
    ],
)
def test_inconsistent_tensors(tmp_path: Path, tensor: TensorProto, needle: str) -> None:
    with pytest.raises(OnnxlrpError) as err:
        load_model(write(_tensor_model(tensor), tmp_path / "m.onnx"))
    assert needle in one_line(err)


def test_total_bytes_limit(tmp_path: Path) -> None:
    path = write(small_model(), tmp_path / "m.onnx")
    with pytest.raises(OnnxlrpError, match="limit"):
        load_model(path, max_bytes=4096)
    assert check_tensor_sizes(small_model()) == 4 * (36 + 4 + 1440 + 10)


def test_external_claims_count_toward_limit(tmp_path: Path) -> None:
    t = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[2**40])
    set_external(t, "w.bin", 0, 4 * 2**40)
    with pytest.raises(OnnxlrpError, match="limit"):
        load_model(write(_tensor_model(t), tmp_path / "m.onnx"))


def _bomb_model(op: str, consts: list[np.ndarray], extra_inputs: int = 0) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Constant", [], [f"k{i}"], value=numpy_helper.from_array(c)) for i, c in enumerate(consts)
    ]
    nodes.append(helper.make_node(op, [f"k{i}" for i in range(len(consts))], ["y"], name="bomb"))
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_constant_of_shape_bomb_refused_without_allocating(tmp_path: Path) -> None:
    path = write(_bomb_model("ConstantOfShape", [np.array([2**40], np.int64)]), tmp_path / "m.onnx")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(OnnxlrpError) as err:
        load_model(path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2 * 2**20, f"peak memory grew by {grown_kib} KiB"
    assert "'bomb'" in one_line(err) and str(2**40) in str(err.value)


@pytest.mark.parametrize(
    "op, consts",
    [
        ("Expand", [np.zeros(1, np.float32), np.array([2**20, 2**20], np.int64)]),
        ("Tile", [np.zeros((2, 2), np.float32), np.array([2**20, 2**20], np.int64)]),
        ("Range", [np.array(0.0, np.float32), np.array(1e12, np.float32), np.array(1.0, np.float32)]),
        ("Range", [np.array(0, np.int64), np.array(10, np.int64), np.array(0, np.int64)]),
        ("ConstantOfShape", [np.array([2**16, 2**16], np.int64)]),
    ],
    ids=["expand", "tile", "range", "range-step0", "cos-2d"],
)
def test_other_bombs_refused(op: str, consts: list[np.ndarray]) -> None:
    with pytest.raises(OnnxlrpError, match="'bomb'"):
        check_resource_bombs(_bomb_model(op, consts))


def test_reasonable_shapes_pass_bomb_check() -> None:
    check_resource_bombs(_bomb_model("ConstantOfShape", [np.array([1, 3, 224, 224], np.int64)]))
    check_resource_bombs(_bomb_model("Range", [np.array(0, np.int64), np.array(1000, np.int64), np.array(1, np.int64)]))


# ----------------------------------------------------------------------------------------------
# versions and domains


def test_ir_version_too_new(tmp_path: Path) -> None:
    with pytest.raises(OnnxlrpError) as err:
        load_model(write(small_model(ir_version=99), tmp_path / "m.onnx"))
    assert "IR version 99" in one_line(err) and str(tmp_path / "m.onnx") in str(err.value)


def test_opset_too_new(tmp_path: Path) -> None:
    with pytest.raises(OnnxlrpError) as err:
        load_model(write(small_model(opset=99), tmp_path / "m.onnx"))
    assert "opset 99" in one_line(err)


def test_custom_domain_loads_but_check_domains_refuses(tmp_path: Path) -> None:
    model = small_model()
    model.graph.node.append(helper.make_node("Mystery", ["y"], ["z"], domain="com.example", name="odd"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    loaded = load_model(write(model, tmp_path / "m.onnx"))
    check_domains(loaded, [n for n in loaded.graph.node if n.domain != "com.example"])
    with pytest.raises(OnnxlrpError, match="unknown operator domain 'com.example'"):
        check_domains(loaded, source=tmp_path / "m.onnx")


# ----------------------------------------------------------------------------------------------
# structure


def test_duplicate_output_names(tmp_path: Path) -> None:
    model = small_model()
    model.graph.output.append(model.graph.output[0])
    with pytest.raises(OnnxlrpError, match="two outputs named 'y'"):
        load_model(write(model, tmp_path / "m.onnx"))


def test_no_outputs(tmp_path: Path) -> None:
    model = small_model()
    del model.graph.output[:]
    with pytest.raises(OnnxlrpError, match="no outputs"):
        load_model(write(model, tmp_path / "m.onnx"))


def test_unsorted_nodes_are_sorted(tmp_path: Path) -> None:
    model = small_model()
    nodes = list(model.graph.node)
    shuffled = [nodes[3], nodes[1], nodes[0], nodes[2]]
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    loaded = load_model(write(model, tmp_path / "m.onnx"))
    assert [n.name for n in loaded.graph.node] == ["conv", "relu", "flatten", "gemm"]
    x = np.ones((1, 1, 8, 8), np.float32)
    np.testing.assert_allclose(run_ort(loaded, x), run_ort(small_model(), x), rtol=1e-6)


def test_cycle(tmp_path: Path) -> None:
    model = small_model()
    model.graph.node[0].input[0] = "f"  # conv now reads flatten's output: conv -> relu -> flatten -> conv
    with pytest.raises(OnnxlrpError) as err:
        load_model(write(model, tmp_path / "m.onnx"))
    msg = one_line(err)
    assert "cycle" in msg and "'conv'" in msg and "'flatten'" in msg


def test_undefined_input_and_double_producer() -> None:
    model = small_model()
    model.graph.node[1].input[0] = "ghost"
    with pytest.raises(OnnxlrpError, match="uses 'ghost', which no node"):
        check_structure(model)
    model = small_model()
    model.graph.node[1].output[0] = "f"
    with pytest.raises(OnnxlrpError, match="produced by two nodes"):
        check_structure(model)


def test_check_structure_keeps_sorted_model_untouched() -> None:
    model = small_model()
    before = model.SerializeToString()
    assert check_structure(model) is model
    assert model.SerializeToString() == before


# ----------------------------------------------------------------------------------------------
# isolation


def test_isolate_valid_model(tmp_path: Path) -> None:
    path = write(small_model(), tmp_path / "m.onnx")
    assert load_model(path, isolate=True).SerializeToString() == load_model(path).SerializeToString()


def test_isolate_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(np.random.default_rng(3).bytes(1000))
    with pytest.raises(OnnxlrpError, match="not an ONNX model"):
        load_model(path, isolate=True)


def test_isolate_reports_checker_errors(tmp_path: Path) -> None:
    model = small_model()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(OnnxlrpError, match="invalid ONNX model.*NoSuchOp"):
        load_model(write(model, tmp_path / "m.onnx"), isolate=True)


def test_isolate_turns_a_crash_into_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-in for a segfault inside onnx's C++ checker: the child kills itself with SIGSEGV.
    monkeypatch.setattr(checking, "_CHILD_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    path = write(small_model(), tmp_path / "m.onnx")
    with pytest.raises(OnnxlrpError) as err:
        load_model(path, isolate=True)
    assert one_line(err) == f"onnx crashed while checking {path} (signal 11, SIGSEGV)"


# ----------------------------------------------------------------------------------------------
# saving


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_save_round_trip_and_ir_clamp(tmp_path: Path) -> None:
    model = small_model(ir_version=11)
    out = save_model_atomic(model, tmp_path / "out.onnx")
    assert out == tmp_path / "out.onnx"
    assert _listing(tmp_path) == ["out.onnx"]
    loaded = load_model(out)
    assert loaded.ir_version == 10
    assert clamp_ir_version(small_model(ir_version=7)).ir_version == 7


def test_save_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OnnxlrpError, match="does not exist"):
        save_model_atomic(small_model(), tmp_path / "nope" / "out.onnx")
    assert _listing(tmp_path) == []


def test_save_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "somefile").write_text("x")
    with pytest.raises(OnnxlrpError, match="not a folder"):
        save_model_atomic(small_model(), tmp_path / "somefile" / "out.onnx")


def test_save_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            # root ignores the mode bits; pretend the kernel said no (as on a read-only mount)
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False)
        with pytest.raises(OnnxlrpError, match="not writable"):
            save_model_atomic(small_model(), folder / "out.onnx")
    finally:
        folder.chmod(0o755)
    assert _listing(folder) == []


def test_save_refuses_symlink_destination(tmp_path: Path) -> None:
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    (tmp_path / "out.onnx").symlink_to(target)
    (tmp_path / "dangling.onnx").symlink_to(tmp_path / "nowhere")
    for name in ("out.onnx", "dangling.onnx"):
        with pytest.raises(OnnxlrpError, match="symbolic link"):
            save_model_atomic(small_model(), tmp_path / name)
    assert target.read_text() == "keep me"
    assert _listing(tmp_path) == ["dangling.onnx", "out.onnx", "target.txt"]


def test_save_refuses_folder_destination(tmp_path: Path) -> None:
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(OnnxlrpError, match="is a folder"):
        save_model_atomic(small_model(), tmp_path / "out.onnx")


def test_existing_file_replaced_only_on_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "out.onnx"
    dest.write_bytes(b"old content")
    dest.chmod(0o640)

    def broken(model: onnx.ModelProto) -> bytes:
        raise ValueError("serialization exploded")

    with monkeypatch.context() as m:
        m.setattr(saving, "_serialize", broken)
        with pytest.raises(OnnxlrpError, match="serialization exploded"):
            save_model_atomic(small_model(), dest)
    assert dest.read_bytes() == b"old content"
    assert _listing(tmp_path) == ["out.onnx"]

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", no_space)
        with pytest.raises(OnnxlrpError, match="no space left"):
            save_model_atomic(small_model(), dest)
    assert dest.read_bytes() == b"old content"
    assert _listing(tmp_path) == ["out.onnx"]

    save_model_atomic(small_model(), dest)
    assert load_model(dest).graph.node[0].name == "conv"
    assert (dest.stat().st_mode & 0o777) == 0o640
    assert _listing(tmp_path) == ["out.onnx"]


def test_keyboard_interrupt_during_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(fd: int, data: bytes) -> None:
        os.write(fd, bytes(data[:10]))
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model_atomic(small_model(), tmp_path / "out.onnx")
    assert _listing(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_save_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(saving, "EXTERNAL_DATA_THRESHOLD", 0)  # pretend the model is over 2 GB
    base = small_model()
    dest = save_model_atomic(base, tmp_path / "out.onnx")
    assert _listing(tmp_path) == ["out.onnx", "out.onnx.data"]
    raw = onnx.ModelProto.FromString(dest.read_bytes())
    big = [t for t in raw.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert {t.name for t in big} == {"G"}  # only initializers of 1 KiB or more
    assert big[0].external_data[0].value == "out.onnx.data"
    loaded = load_model(dest)
    x = np.ones((1, 1, 8, 8), np.float32)
    np.testing.assert_allclose(run_ort(loaded, x), run_ort(base, x), rtol=1e-6)


def test_save_from_a_thread(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            save_model_atomic(small_model(), tmp_path / "out.onnx")
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    th = threading.Thread(target=work)
    th.start()
    th.join()
    assert not errors and _listing(tmp_path) == ["out.onnx"]


_SIGTERM_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxlrp.io import save as saving

    mode = sys.argv[1]
    n = 50_000_000 if mode == "race" else 1000  # 200 MB of float32 for the race
    w = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph)
    del w
    if mode == "stall":
        real = saving.write_all
        def stalled(fd, data):
            real(fd, bytes(data[:100]))
            print("writing", flush=True)
            import time
            time.sleep(60)
        saving.write_all = stalled
    print("ready", flush=True)
    saving.save_model_atomic(model, sys.argv[2])
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["stall", "race"])
def test_sigterm_mid_save_leaves_nothing(tmp_path: Path, mode: str) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    script = tmp_path / "child.py"
    script.write_text(_SIGTERM_CHILD.format(repo=str(REPO)))
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(folder / "big.onnx")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        if mode == "stall":
            assert proc.stdout.readline().strip() == "writing"
        else:
            deadline = time.monotonic() + 60
            while not os.listdir(folder) and time.monotonic() < deadline:
                time.sleep(0.0005)
            assert os.listdir(folder), "the child never started writing"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = os.listdir(folder)
    if mode == "race" and rc == 0:
        # under load the save may finish before the signal lands: then the file must be whole, never partial
        assert left == ["big.onnx"]
        assert len(load_model(folder / "big.onnx").graph.initializer[0].raw_data) == 200_000_000
        return
    assert rc == -signal.SIGTERM
    assert left == []


# ----------------------------------------------------------------------------------------------
# mutation corpus


def _base_cases(folder: Path) -> list[bytes]:
    """The plain model and its external-data variant (whose weights.bin is written into folder).

    A 4x4 input keeps the weights small, so most mutations hit the structure rather than the floats.
    """
    base = small_model(side=4)
    return [base.SerializeToString(), make_external(base, folder, "weights.bin").SerializeToString()]


def mutated_models(seed: int, n: int, bases: list[bytes] | None = None) -> Iterator[bytes]:
    """``n`` seeded byte-level mutations of small valid models.

    Without ``bases`` the plain Conv->Relu->Flatten->Gemm model is mutated; pass ``_base_cases(folder)``
    to include the external-data variant (its data file must then sit next to the mutated file).
    Mutations: flip 1-8 bytes, set a byte to 0x00/0xff/0x7f/0x80, truncate, cut a slice out, duplicate a
    slice, insert random bytes.
    """
    rng = np.random.default_rng(seed)
    if bases is None:
        bases = [small_model(side=4).SerializeToString()]
    kinds = np.array([0.4, 0.2, 0.1, 0.1, 0.1, 0.1])
    for _ in range(n):
        data = bytearray(bases[int(rng.integers(len(bases)))])
        kind = int(rng.choice(6, p=kinds))
        if kind == 0:
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
                data[int(pos)] ^= int(rng.integers(1, 256))
        elif kind == 1:
            data[int(rng.integers(len(data)))] = int(rng.choice([0x00, 0xFF, 0x7F, 0x80]))
        elif kind == 2:
            del data[int(rng.integers(len(data))) :]
        elif kind == 3:
            a = int(rng.integers(len(data)))
            del data[a : a + int(rng.integers(1, 32))]
        elif kind == 4:
            a = int(rng.integers(len(data)))
            b = min(len(data), a + int(rng.integers(1, 64)))
            data[a:a] = data[a:b]
        else:
            a = int(rng.integers(len(data) + 1))
            data[a:a] = rng.bytes(int(rng.integers(1, 16)))
        yield bytes(data)


class _CaseTimeout(Exception):
    pass


def test_mutation_corpus(tmp_path: Path) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    bases = _base_cases(folder)
    path = folder / "m.onnx"
    outcomes = {"model": 0, "error": 0}
    bad: list[str] = []

    def on_alarm(signum: int, frame: object) -> None:
        raise _CaseTimeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for i, data in enumerate(mutated_models(seed=1234, n=1200, bases=bases)):
            if i == 1100:  # the last cases also see a damaged data file
                (folder / "weights.bin").write_bytes((folder / "weights.bin").read_bytes()[:-7])
            path.write_bytes(data)
            signal.setitimer(signal.ITIMER_REAL, 5.0)
            try:
                model = check_structure(load_model(path))
                assert isinstance(model, onnx.ModelProto)
                outcomes["model"] += 1
            except OnnxlrpError as err:
                msg = str(err)
                if "\n" in msg or CANARY[:10].decode() in msg:
                    bad.append(f"case {i}: multi-line message {msg!r}")
                outcomes["error"] += 1
            except _CaseTimeout:
                bad.append(f"case {i}: took more than 5 s")
            except BaseException as err:  # noqa: BLE001 - the point of the test
                bad.append(f"case {i}: {type(err).__name__}: {err}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not bad, "\n".join(bad[:20])
    assert outcomes["error"] > 100 and outcomes["model"] + outcomes["error"] == 1200
