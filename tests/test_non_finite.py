"""A relevance with NaN or infinite values is never written or returned: ``Explainer`` raises one line naming the
model, ``explain`` and ``evaluate`` exit with one error line naming the model (and the image), and nothing is left in
the output folder, also when the bad image comes in a later batch than files already written.

The compiled graphs keep relevance in range whenever the model's own outputs are finite (tests/test_numerics.py), so
the models here make their own outputs overflow (a dense layer of weight 1e37 on a bright image), or a compiled model
is altered to put a NaN into its relevance output (what a defect would look like).
"""

import subprocess
import sys

import netspec as ns
import numpy as np
import onnx
import pytest
from netspec import Flatten
from onnx import helper
from PIL import Image

import onnxlrp
from onnxlrp.errors import OnnxlrpError


def overflowing_model(path):
    """8 x 8 grey images -> 2 classes through one dense layer of weight 1e37: a black image gives finite logits (0),
    a white one overflows (64e37)."""
    model = ns.to_onnx([Flatten(), ns.Dense(np.full((2, 64), 1e37), None)], (1, 1, 8, 8))
    onnx.save(model, path)
    return path


def nan_relevance_model(source, path):
    """``source`` compiled, with its relevance multiplied by NaN: finite outputs, non-finite relevance."""
    compiled = onnxlrp.compile(str(source), "epsilon")
    graph = compiled.graph
    producer = next(n for n in graph.node if "relevance" in n.output)
    producer.output[0] = "relevance_before"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "not_a_number"))
    graph.node.append(helper.make_node("Mul", ["relevance_before", "not_a_number"], ["relevance"]))
    onnx.save(compiled, path)
    return path


def image(path, value):
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(path)
    return path


def cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxlrp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_explainer_refuses_the_relevance_of_an_overflowing_model(tmp_path):
    path = overflowing_model(tmp_path / "big.onnx")
    explainer = onnxlrp.Explainer(str(path), rule="epsilon")
    dark = np.zeros((2, 1, 8, 8), np.float32)
    assert np.isfinite(explainer(dark).relevance).all()
    mixed = np.stack([dark[0], np.ones((1, 8, 8), np.float32)])
    with pytest.raises(OnnxlrpError) as err:
        explainer(mixed)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "sample 1 " in message
    assert "own outputs are not finite" in message and "nothing was returned" in message


def test_explainer_calls_a_non_finite_relevance_of_finite_outputs_a_defect(tmp_path):
    source = overflowing_model(tmp_path / "big.onnx")
    path = nan_relevance_model(source, tmp_path / "nan.onnx")
    with pytest.raises(OnnxlrpError, match=r"nan\.onnx: the relevance of sample 0, sample 1 is not finite .*defect"):
        onnxlrp.Explainer(str(path))(np.zeros((2, 1, 8, 8), np.float32))
    result = onnxlrp.Explainer(str(path), finite_only=False)(np.zeros((2, 1, 8, 8), np.float32))
    assert np.isnan(result.relevance).all()


def test_explain_refuses_and_removes_what_it_wrote(tmp_path):
    """The black image is explained and written in the first batch; the white one, in the second, overflows: one
    error line naming the model and the image, exit code 1, and the first image's files and the folder removed."""
    model = overflowing_model(tmp_path / "big.onnx")
    images = [image(tmp_path / "a_black.png", 0), image(tmp_path / "b_white.png", 255)]
    out = tmp_path / "heat"
    done = cli("explain", model, *images, "-o", out, "--batch-size", 1, "--rule", "epsilon")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(model) in lines[0] and "b_white.png" in lines[0] and "nothing was written" in lines[0]
    assert not out.exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    (existing / "note.txt").write_text("mine")
    assert cli("explain", model, *images, "-o", existing, "--batch-size", 1, "--rule", "epsilon").returncode == 1
    assert sorted(p.name for p in existing.iterdir()) == ["note.txt"]


def test_evaluate_refuses_and_writes_nothing(tmp_path):
    model = overflowing_model(tmp_path / "big.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, images=np.stack([np.zeros((1, 8, 8)), np.ones((1, 8, 8))]).astype(np.float32),
             labels=np.array([0, 1]))
    out = tmp_path / "eval"
    done = cli("evaluate", model, "--data", data, "--rules", "epsilon", "-o", out)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(model) in lines[0] and "(epsilon)" in lines[0] and "sample 1 " in lines[0]
    assert not out.exists()
