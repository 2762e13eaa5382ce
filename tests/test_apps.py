"""`onnxlrp explain`, `evaluate` and `demo` end to end on the bundled digits CNN (onnxlrp.apps)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from onnxlrp import apps
from onnxlrp.apps.explain import unique_stems
from onnxlrp.cli import main
from onnxlrp.compiler import is_compiled
from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import write_atomic
from onnxlrp.metrics import masked_accuracy

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_cnn.onnx"
SAMPLES = ROOT / "models" / "samples"
CARD = json.loads((ROOT / "models" / "digits_cnn.json").read_text())
LINE = re.compile(r"^(?P<file>.+): class (?P<k>\d+) \(score (?P<s>[-+.\deE]+)\) -> (?P<png>.+\.png)$")


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _no_leftovers(folder: Path) -> None:
    hidden = [p.name for p in folder.rglob(".*")]
    assert not hidden, f"temp files left behind: {hidden}"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxlrp.cli", *args], capture_output=True, text=True, timeout=120)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------- explain


def test_explain_bundled_samples(tmp_path, capsys):
    out = tmp_path / "heat"
    assert main(["explain", str(MODEL), str(SAMPLES), "-o", str(out)]) == 0
    lines = [m for m in map(LINE.match, capsys.readouterr().out.splitlines()) if m]
    assert len(lines) == 10
    for m in lines:
        digit = int(re.search(r"digit_(\d)\.png$", m["file"])[1])
        assert int(m["k"]) == digit  # every bundled sample is classified correctly (models/digits_cnn.json)
        assert float(m["s"]) == pytest.approx(CARD["samples"][str(digit)]["probability"], abs=1e-4)
        png, npy = out / f"digit_{digit}.png", out / f"digit_{digit}.npy"
        assert Path(m["png"]) == png
        rgb = _rgb(png)
        assert rgb.shape == (224, 224, 3)  # 28 x 28 upscaled 8x
        rel = np.load(npy)
        assert rel.shape == (1, 28, 28) and rel.dtype == np.float32 and np.isfinite(rel).all()
        assert rel.sum() > 0
        r, c = np.unravel_index(np.argmax(rel[0]), (28, 28))
        red = rgb[r * 8 + 4, c * 8 + 4]
        assert red[0] > 200 and red[1] < 120 and red[2] < 120, f"most relevant pixel is not red: {red}"
        zero = np.argwhere(rel[0] == 0)[0]  # background: zero relevance, black input -> grey, not red
        grey = rgb[zero[0] * 8 + 4, zero[1] * 8 + 4]
        assert max(grey) - min(grey) < 10
    _no_leftovers(out)


def test_explain_target_and_no_overlay(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["explain", str(MODEL), str(SAMPLES / "digit_3.png"), "--target", "8", "--no-overlay",
                 "--rule", "epsilon", "--epsilon", "0.01", "-o", str(out)]) == 0
    m = LINE.match(capsys.readouterr().out.splitlines()[-1])
    assert int(m["k"]) == 8 and float(m["s"]) < 0.01  # a class the model does not predict, explained anyway
    rel = np.load(out / "digit_3.npy")
    r, c = np.unravel_index(np.argmax(rel[0]), (28, 28))
    assert tuple(_rgb(out / "digit_3.png")[r * 8 + 4, c * 8 + 4]) == (255, 0, 0)  # pure heatmap: saturated red


def test_explain_empty_image_subprocess(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    out = tmp_path / "out"
    done = _cli("explain", str(MODEL), str(bad), "-o", str(out))
    assert done.returncode == 1 and done.stdout == ""
    assert str(bad) in _one_error_line(done.stderr) and "empty" in done.stderr
    assert not (out / "bad.png").exists() and not (out / "bad.npy").exists()


def test_explain_text_named_png(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a png\n")
    out = tmp_path / "out"
    assert main(["explain", str(MODEL), str(bad), "-o", str(out)]) == 1
    assert str(bad) in _one_error_line(capsys.readouterr().err)
    assert not (out / "notes.png").exists() and not (out / "notes.npy").exists()


def test_explain_bad_image_among_good_ones_writes_nothing(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # truncated PNG
    out = tmp_path / "out"
    assert main(["explain", str(MODEL), str(SAMPLES / "digit_0.png"), str(tmp_path / "broken.png"),
                 "-o", str(out)]) == 1
    assert "broken.png" in _one_error_line(capsys.readouterr().err)
    assert not out.exists() or not any(out.iterdir())


def test_explain_errors(tmp_path, capsys):
    assert main(["explain", str(MODEL), str(SAMPLES / "digit_0.png"), "--preprocess", "imagenet",
                 "-o", str(tmp_path / "o")]) == 1
    assert "RGB" in _one_error_line(capsys.readouterr().err)
    assert main(["explain", str(MODEL), str(SAMPLES / "digit_0.png"), "--target", "10", "-o", str(tmp_path / "o")]) == 1
    assert "10 classes" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
    toml = tmp_path / "pre.toml"
    toml.write_text("mean = [0.5]\nsdt = [0.5]\n")
    assert main(["explain", str(MODEL), str(SAMPLES / "digit_0.png"), "--preprocess", str(toml),
                 "-o", str(tmp_path / "o")]) == 1
    assert "sdt" in _one_error_line(capsys.readouterr().err)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OnnxlrpError, match="is a file"):
        apps.run_explain(str(MODEL), [str(SAMPLES / "digit_0.png")], out_dir=a_file)


def test_preprocess_toml(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text("scale = 2.0\nmean = [1.0]\nstd = [0.5]\n")
    pre = apps.make_preprocess(str(toml), 1)
    np.testing.assert_allclose(pre(np.full((1, 1, 2, 2), 0.75, np.float32)), 1.0)  # (0.75 * 2 - 1) / 0.5
    rgb = apps.make_preprocess("imagenet", 3)(np.zeros((1, 3, 1, 1), np.float32)).reshape(3)
    np.testing.assert_allclose(rgb, -np.array(apps.IMAGENET_MEAN) / np.array(apps.IMAGENET_STD), rtol=1e-6)


def test_unique_stems_and_atomic_write(tmp_path):
    stems = unique_stems([Path("a/x.png"), Path("b/x.png"), Path("c/X.jpg")])
    assert stems == ["x", "x-2", "X-3"]
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def fails(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OnnxlrpError, match="f.bin"):
        write_atomic(target, fails)
    assert target.read_bytes() == b"old"
    _no_leftovers(tmp_path)
    write_atomic(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"


# ---------------------------------------------------------------------------------------------------- evaluate


def test_parse_rules_paper_notation():
    specs = {s.label: s for s in apps.parse_rules("rlrp,lrp0,epsilon:0.01,gamma:0.25,alpha-beta:2,-1,"
                                                  "epsilon-gamma-box:gamma=0.5")}
    assert specs["epsilon:0.01"].params == {"epsilon": 0.01}
    assert specs["alpha-beta:2,-1"].params == {"alpha": 2.0, "beta": 1.0}  # paper (2, -1) = Zennit (2, 1)
    assert specs["epsilon-gamma-box:gamma=0.5"].params == {"gamma": 0.5}
    assert apps.parse_rules("alpha-beta:2,1")[0].params == {"alpha": 2.0, "beta": 1.0}
    with pytest.raises(OnnxlrpError, match="cannot be expressed"):
        apps.parse_rules("alpha-beta:0.5,0.5")
    for bad in ("nope", "rlrp:1", "epsilon:x", "alpha-beta:3,1", "1,rlrp", "rlrp,,lrp0"):
        with pytest.raises(OnnxlrpError):
            apps.parse_rules(bad)


def test_evaluate_builtin_digits(tmp_path, capsys):
    out = tmp_path / "ev"
    start = time.perf_counter()
    assert main(["evaluate", str(MODEL), "--data", "builtin:digits", "--limit", "100", "--rules", "rlrp,epsilon",
                 "-o", str(out)]) == 0
    assert time.perf_counter() - start < 40
    printed = capsys.readouterr().out
    assert re.search(r"^rlrp\s+[\d.]+", printed, re.M) and re.search(r"^epsilon\s+[\d.]+", printed, re.M)
    res = json.loads((out / "results.json").read_text())

    # independent check of the model accuracy on the same 100 digits
    data = np.load(ROOT / "models" / "digits_test.npz")
    x = data["images"][:100].astype(np.float32)[:, None] / 255
    labels = data["labels"][:100]
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    predicted = sess.run(None, {"image": x})[0].argmax(1)
    accuracy = float((predicted == labels).mean())
    assert res["samples"] == 100 and res["model_accuracy"] == pytest.approx(accuracy)
    assert res["correctly_classified"] == int((predicted == labels).sum())
    random_rel = np.random.default_rng(0).standard_normal(x.shape)
    correct = predicted == labels
    baseline = masked_accuracy(lambda b: sess.run(None, {"image": b})[0], x[correct], labels[correct],
                               random_rel[correct], [5], absolute=False, per_pixel=False)[5]
    assert set(res["rules"]) == {"rlrp", "epsilon"}
    for rule in res["rules"].values():
        acc, acc_all = rule["accuracy_correct"], rule["accuracy_all"]
        assert acc["99"] >= 0.98 and acc_all["99"] == pytest.approx(accuracy, abs=0.015)
        assert acc["99"] > acc_all["99"]  # the misclassified digits count only in accuracy_all
        assert acc["1"] < acc["99"] and acc_all["1"] < acc_all["99"]
        assert acc["5"] > baseline + 0.3, (acc["5"], baseline)  # the relevance ranking beats a random one
        assert len(rule["perturbation_curve"]) == 21 and rule["aopc"] > 0
        assert rule["perturbation_curve"][-1] < rule["perturbation_curve"][0]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len([r for r in rows if r["metric"] == "accuracy_correct"]) == 2 * 15
    assert float(next(r["value"] for r in rows if r["rule"] == "rlrp" and r["metric"] == "aopc")) == \
        pytest.approx(res["rules"]["rlrp"]["aopc"], rel=1e-5)
    for name in ("masked_accuracy.png", "aopc.png"):
        assert _rgb(out / name).shape[0] > 100
    _no_leftovers(out)


def test_evaluate_errors_subprocess(tmp_path):
    done = _cli("evaluate", str(MODEL), "--rules", "rlrp,alpha-beta:0.5,0.5", "-o", str(tmp_path / "e"))
    assert done.returncode == 1 and "cannot be expressed" in _one_error_line(done.stderr)
    assert not (tmp_path / "e").exists()


def test_evaluate_bad_data(tmp_path, capsys):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    assert main(["evaluate", str(MODEL), "--data", str(tmp_path / "data"), "-o", str(tmp_path / "e")]) == 1
    assert "'cat' is not a class index" in _one_error_line(capsys.readouterr().err)
    np.savez(tmp_path / "wrong.npz", images=np.zeros((4, 32, 32), np.uint8), labels=np.zeros(4, np.int64))
    assert main(["evaluate", str(MODEL), "--data", str(tmp_path / "wrong.npz"), "-o", str(tmp_path / "e")]) == 1
    assert "[N, 1, 28, 28]" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------------------- demo


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    compiled = onnx.load(str(out / "digits_cnn.rlrp.onnx"))
    assert is_compiled(compiled) and {"relevance", "explained_class"} <= {o.name for o in compiled.graph.output}
    assert sorted(p.name for p in (out / "heatmaps").glob("*.png")) == [f"digit_{k}.png" for k in range(10)]
    assert len(list((out / "heatmaps").glob("*.npy"))) == 10
    assert str(out / "heatmaps") in printed and ".npy" in printed
    res = json.loads((out / "evaluate" / "results.json").read_text())
    assert res["samples"] == 200 and list(res["rules"]) == ["rlrp", "lrp0", "epsilon"]
    _no_leftovers(out)


def test_evaluate_with_boxes_reports_localization(tmp_path):
    """Boxes around the bright strokes of each digit: every rule points inside them, and mu is high."""
    data = np.load(ROOT / "models" / "digits_test.npz")
    images = data["images"][:40]
    boxes = []
    for image in images:
        ys, xs = np.nonzero(image > 64)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    np.savez(tmp_path / "boxes.npz", boxes=np.array(boxes))
    out = tmp_path / "eval"
    code = main(["evaluate", str(MODEL), "--limit", "40", "--rules", "rlrp,epsilon", "--masks",
                 str(tmp_path / "boxes.npz"), "-o", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for rule in ("rlrp", "epsilon"):
        numbers = results["rules"][rule]["localization"]
        assert numbers["pointing_game"] >= 0.9 and numbers["mu"] > 0.9 and numbers["mu_w"] > 1.0
    assert "pointing_game" in (out / "results.csv").read_text()
    np.savez(tmp_path / "bad.npz", other=np.zeros(3))
    assert main(["evaluate", str(MODEL), "--limit", "40", "--masks", str(tmp_path / "bad.npz"),
                 "-o", str(tmp_path / "eval2")]) == 1
    assert not (tmp_path / "eval2").exists()
