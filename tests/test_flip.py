"""``onnxlrp evaluate --flip K`` (issue 22): the Keras LRP thesis's flip test, against numpy references."""

import csv
import json
from pathlib import Path

import netspec as ns
import numpy as np
import onnx
import pytest

from onnxlrp.apps.flip import flip, flip_changes, flip_mode, summarize
from onnxlrp.cli import main

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"


def test_flip_changes_exactly_the_k_extreme_inputs():
    x = np.array([[0.1, 0.9, 0.5, 0.3], [0.2, 0.4, 0.6, 0.8]], np.float32)
    ranking = np.array([[3.0, -1.0, 0.5, 2.0], [-2.0, 5.0, 1.0, -3.0]])
    most = flip(x, ranking, 2, most=True, mode="invert", pixel=False)
    np.testing.assert_allclose(most, [[0.9, 0.9, 0.5, 0.7], [0.2, 0.6, 0.4, 0.8]], rtol=1e-6)
    least = flip(x, ranking, 1, most=False, mode="negate", pixel=False)
    np.testing.assert_allclose(least, [[0.1, -0.9, 0.5, 0.3], [0.2, 0.4, 0.6, -0.8]])
    images = np.arange(2 * 2 * 2 * 2, dtype=np.float32).reshape(2, 2, 2, 2) / 16
    r = np.zeros((2, 2, 2, 2))
    r[0, 0, 1, 1], r[0, 1, 1, 1] = 1.0, 1.0  # pixel (1, 1) of sample 0: summed over channels, the largest
    r[1, 1, 0, 0] = 5.0
    flipped = flip(images, r, 1, most=True, mode="negate", pixel=True)
    changed = np.argwhere(flipped != images)
    assert changed.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]


def test_flip_mode():
    assert flip_mode(np.array([0.0, 1.0]), "auto") == "invert"
    assert flip_mode(np.array([-0.5, 1.0]), "auto") == "negate"
    assert flip_mode(np.array([0.0, 1.0]), "negate") == "negate"


def test_score_change_of_a_linear_model_is_the_flipped_contributions():
    """For f(x) = W x + b the change of class c is sum over the flipped d of W_cd (x'_d - x_d) (float64 numpy)."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 12)), rng.normal(size=3)
    x = rng.uniform(size=(40, 12))
    classes = (x @ w.T + b).argmax(1)
    relevance = w[classes] * x  # the exact decomposition of a linear model (without the bias)

    def scores(z):
        return {"logits": z @ w.T + b}

    changes = flip_changes(scores, x, relevance, classes, 4, mode="invert", pixel=False)["logits"]
    for which, take in (("most", lambda r: np.argsort(-r)[:4]), ("least", lambda r: np.argsort(r)[:4])):
        expected = [w[c, take(r)] @ (1 - 2 * xi[take(r)]) for c, r, xi in zip(classes, relevance, x, strict=True)]
        np.testing.assert_allclose(changes[which], expected, rtol=1e-12)
    s = summarize(changes["most"])
    assert s["worsened"] + s["improved"] + s["unchanged"] == pytest.approx(1.0)
    assert s["min"] == pytest.approx(min(changes["most"])) and s["mean"] == pytest.approx(np.mean(changes["most"]))


def test_cli_writes_csv_json_and_plot(tmp_path, capsys):
    rng = np.random.default_rng(1)
    layers = [ns.conv(rng, 1, 2, 3, pad=1), ns.Relu(), ns.Flatten(), ns.dense(rng, 2 * 6 * 6, 3)]
    onnx.save(ns.to_onnx(layers, (1, 1, 6, 6)), tmp_path / "m.onnx")
    images = rng.integers(0, 256, size=(12, 6, 6)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.zeros(12, np.int64))
    out = tmp_path / "out"
    assert main(["evaluate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--rules", "lrp0",
                 "--flip", "5", "-o", str(out)]) == 0
    assert "x -> 1 - x (invert)" in capsys.readouterr().out
    results = json.loads((out / "flip.json").read_text())
    assert results["k"] == 5 and results["mode"] == "invert" and results["samples"] == 12
    rows = list(csv.DictReader((out / "flip_samples.csv").open()))
    assert len(rows) == 12 * 1  # one output: the model has no Softmax, its score is the explained tensor
    most = np.array([float(r["change_most"]) for r in rows])
    summary = {(r["output"], r["flipped"]): r for r in csv.DictReader((out / "flip.csv").open())}
    assert float(summary[(rows[0]["output"], "most")]["mean"]) == pytest.approx(most.mean(), rel=1e-5)
    assert (out / "flip.png").stat().st_size > 1000
    assert main(["evaluate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--flip", "37", "-o",
                 str(tmp_path / "o2")]) == 1
    assert "only 36 inputs" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_bundled_digits_most_relevant_flips_lower_the_score(tmp_path, capsys):
    """The thesis's finding on the bundled CNN (100 digits, epsilon): flipping the 10 most relevant pixels lowers
    the explained logit of every sample, flipping the 10 least relevant raises it for most."""
    out = tmp_path / "out"
    assert main(["evaluate", str(MODEL), "--rules", "epsilon", "--flip", "10", "--limit", "100", "-o", str(out)]) == 0
    logits = json.loads((out / "flip.json").read_text())["rules"]["epsilon"]["/classifier/classifier.3/Gemm_output_0"]
    assert logits["most"]["worsened"] == 1.0 and logits["most"]["mean"] < -3
    assert logits["least"]["improved"] > 0.7 and logits["least"]["mean"] > 0.5
