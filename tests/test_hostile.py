"""Hostile inputs through the whole compile: a seeded mutation corpus and resource bombs on the relevance path."""

import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_loading import _base_cases, mutated_models

from onnxlrp.cli import main


class CaseTimeout(Exception):
    pass


def test_mutation_corpus_compiles_or_fails_cleanly(tmp_path: Path, capsys):
    """1,000 byte-flipped or truncated models: a correct compile (a valid output that onnxruntime loads) or one
    line of error with no output file; never an internal error, a traceback, or more than 30 s."""
    import onnxruntime as ort

    folder = tmp_path / "case"
    folder.mkdir()
    bases = _base_cases(folder)
    path, out = folder / "m.onnx", tmp_path / "out.onnx"
    outcomes = {"compiled": 0, "error": 0}
    bad = []

    def on_alarm(signum, frame):
        raise CaseTimeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for i, data in enumerate(mutated_models(seed=99, n=1000, bases=bases)):
            path.write_bytes(data)
            out.unlink(missing_ok=True)
            signal.setitimer(signal.ITIMER_REAL, 30.0)
            try:
                code = main(["compile", str(path), "--rule", "epsilon", "-o", str(out)])
            except CaseTimeout:
                bad.append(f"case {i}: more than 30 s")
                continue
            except BaseException as err:  # noqa: BLE001 - the point of the test
                bad.append(f"case {i}: escaped {type(err).__name__}: {err}")
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            err = capsys.readouterr().err
            if code == 0:
                ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
                outcomes["compiled"] += 1
            elif "internal error" in err or "Traceback" in err or err.count("\n") != 1 or out.exists():
                bad.append(f"case {i}: exit {code}, output left: {out.exists()}, stderr {err!r}")
            else:
                outcomes["error"] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not bad, "\n".join(bad[:20])
    assert outcomes["compiled"] > 10 and outcomes["error"] > 100


def bomb_model(tmp_path: Path) -> Path:
    """x + ConstantOfShape([2**40]) on the relevance path."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=helper.make_tensor("v", 1, [1], [0.0])),
             helper.make_node("Add", ["x", "zeros"], ["y"])]
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([2**40], dtype=np.int64), "shape")])
    path = tmp_path / "bomb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_constant_of_shape_bomb_is_refused_without_allocating(tmp_path, capsys):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(["compile", str(bomb_model(tmp_path)), "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and "ConstantOfShape" in err and err.count("\n") == 1
    assert not (tmp_path / "out.onnx").exists()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2 * 1024 * 1024, f"peak memory grew by {grown_kib} KiB"


@pytest.mark.parametrize("name", ["../escape", "a/b", "ctl\x1b[31m\x07", "x" * 10_000])
def test_hostile_node_names_are_escaped_in_output(tmp_path, capsys, name):
    """Node names reach the terminal only escaped (inspect prints them)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name=name),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="dense")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(np.ones((3, 2), np.float32), "W")])
    path = tmp_path / "named.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["inspect", str(path), "--rule", "epsilon"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
