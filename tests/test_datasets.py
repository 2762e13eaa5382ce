"""`onnxlrp explain MODEL DATA`: data sets streamed into relevance shards and an index (image folders, .npy/.npz,
Parquet), unreadable inputs listed and skipped, progress, and resume after SIGKILL/SIGTERM giving the bytes of an
uninterrupted run (onnxlrp.apps.explain_data)."""

from __future__ import annotations

import csv
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnxlrp
from onnxlrp.apps.explain_data import load_relevance
from onnxlrp.apps.shards import read_index
from onnxlrp.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_cnn.onnx"
DIGITS = np.load(ROOT / "models" / "digits_test.npz")
IMAGES, LABELS = DIGITS["images"], DIGITS["labels"]


def _reference(images_uint8: np.ndarray, rule: str = "rlrp", target=None):
    """Relevance, class and probability straight from an Explainer on the whole batch (no streaming)."""
    explainer = onnxlrp.Explainer(str(MODEL), rule=rule)
    out = explainer(images_uint8[:, None].astype(np.float32) / np.float32(255.0), target=target)
    classes = np.asarray(out.explained_class)
    return np.asarray(out.relevance), classes, out.outputs["probabilities"][np.arange(len(classes)), classes]


def _assert_matches_reference(out: Path, images: np.ndarray, ids: np.ndarray, **kw) -> dict:
    index = read_index(out)
    relevance, classes, scores = _reference(images, **kw)
    np.testing.assert_array_equal(index["sample"], ids)
    np.testing.assert_array_equal(index["class"], classes)
    np.testing.assert_allclose(index["score"], scores, rtol=1e-5, atol=1e-7)
    stored = load_relevance(out)
    assert stored.shape == relevance.shape and stored.dtype == np.float32
    peak = np.abs(relevance).max()
    assert peak > 0
    np.testing.assert_allclose(stored, relevance, atol=1e-6 * peak, rtol=0)
    np.testing.assert_allclose(index["relevance_sum"], relevance.reshape(len(relevance), -1).sum(1), rtol=1e-5)
    return index


def _png_folder(folder: Path, count: int, broken: bool = True) -> list[Path]:
    paths = []
    for i in range(count):
        p = folder / str(LABELS[i]) / f"d{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(IMAGES[i]).save(p)
        paths.append(p)
    if broken:
        (folder / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # truncated PNG
        (folder / "7" / "empty.png").write_bytes(b"")
    return paths


def _errors(out: Path) -> list[list[str]]:
    with open(out / "errors.csv", newline="") as f:
        return list(csv.reader(f))[1:]


def _no_temp_files(out: Path) -> None:
    assert not [p for p in out.rglob(".*")], "temp files left behind"


def test_image_folder_streams_into_shards_and_lists_bad_images(tmp_path, capsys):
    paths = _png_folder(tmp_path / "data", 60)
    out = tmp_path / "out"
    assert main(["explain", str(MODEL), str(tmp_path / "data"), "-o", str(out), "--batch-size", "8",
                 "--shard-size", "20"]) == 0
    printed = capsys.readouterr()
    # the listing order: by relative path (class folder, then name), bad files among them
    listed = sorted([str(p.relative_to(tmp_path / "data")) for p in paths] + ["3/broken.png", "7/empty.png"],
                    key=lambda s: s.split("/"))
    bad = {listed.index("3/broken.png"), listed.index("7/empty.png")}
    good = [i for i in range(len(listed)) if i not in bad]
    order = [int(Path(listed[i]).stem[1:]) for i in good]
    index = _assert_matches_reference(out, IMAGES[order], np.asarray(good))
    assert list(index["source"]) == [listed[i] for i in good]
    # shards of 20 samples: offsets count the explained samples of each shard
    assert list(index["shard"]) == [i // 20 for i in good]
    for k in set(index["shard"]):
        rows = index["shard"] == k
        assert list(index["offset"][rows]) == list(range(rows.sum()))
        assert len(np.load(out / "shards" / f"relevance-{k:05d}.npy")) == rows.sum()
    errors = _errors(out)
    assert [(int(s), src) for s, src, _ in errors] == sorted((i, listed[i]) for i in bad)
    assert "not an image" in errors[0][2] and "empty" in errors[1][2]
    assert not list(out.glob("*.png")) and not (out / "heatmaps").exists()  # arrays only, without --heatmaps
    import pyarrow.parquet as pq

    table = pq.read_table(out / "index.parquet").to_pydict()
    assert table["sample"] == index["sample"].tolist() and table["source"] == index["source"].tolist()
    assert "62/62 samples" in printed.err and "samples/s" in printed.err  # the plain progress line at the end
    assert "60 sample(s) explained, 2 unreadable" in printed.out
    _no_temp_files(out)


def test_array_files_and_heatmaps(tmp_path, capsys):
    np.save(tmp_path / "digits.npy", IMAGES[:30])
    np.savez(tmp_path / "digits.npz", images=IMAGES[:30, :, :, None], labels=LABELS[:30])  # [N, H, W, C]
    for name in ("digits.npy", "digits.npz"):
        out = tmp_path / f"out-{name}"
        assert main(["explain", str(MODEL), str(tmp_path / name), "-o", str(out), "--rule", "epsilon",
                     "--target", "4", "--heatmaps", "--quiet"]) == 0
        assert capsys.readouterr() == ("", "")  # --quiet: nothing but errors
        index = _assert_matches_reference(out, IMAGES[:30], np.arange(30), rule="epsilon", target=4)
        assert set(index["class"]) == {4}
        assert index["source"][3] == (f"{name}[3]" if name.endswith("npy") else f"{name}:images[3]")
        heatmap = out / index["heatmap"][3]
        assert heatmap.name == "03-digits.png"
        with Image.open(heatmap) as im:
            assert im.size == (224, 224)  # 28 x 28 upscaled 8x, as for image files


def test_parquet_image_bytes_and_tensor_columns(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    folder = tmp_path / "pq"
    folder.mkdir()
    cells = [png(a) for a in IMAGES[:24]]
    cells[5] = b"not an image"
    pq.write_table(pa.table({"image": cells[:14], "label": LABELS[:14]}), folder / "part-0.parquet", row_group_size=5)
    pq.write_table(pa.table({"image": cells[14:], "label": LABELS[14:24]}), folder / "part-1.parquet")
    out = tmp_path / "out-bytes"
    assert main(["explain", str(MODEL), str(folder), "-o", str(out), "--batch-size", "4", "--quiet"]) == 0
    good = [i for i in range(24) if i != 5]
    index = _assert_matches_reference(out, IMAGES[good], np.asarray(good))
    assert index["source"][0] == "part-0.parquet[0]" and index["source"][-1] == "part-1.parquet[9]"
    assert [row[:2] for row in _errors(out)] == [["5", "part-0.parquet[5]"]]

    # Hugging Face datasets' Image feature: a struct with the bytes (and a path)
    hf = pa.table({"image": pa.array([{"bytes": c, "path": f"{i}.png"} for i, c in enumerate(cells[:6])])})
    pq.write_table(hf, tmp_path / "hf.parquet")
    out = tmp_path / "out-hf"
    assert main(["explain", str(MODEL), str(tmp_path / "hf.parquet"), "-o", str(out), "--quiet"]) == 0
    _assert_matches_reference(out, IMAGES[[0, 1, 2, 3, 4]], np.arange(5))

    tensors = [(a / 255.0).tolist() for a in IMAGES[:12]]  # nested lists [28][28], the model's [1, 28, 28]
    tensors[2] = tensors[2][:27]  # the wrong size: listed, skipped
    tensors[7][0][0] = float("nan")
    pq.write_table(pa.table({"id": list(range(12)), "pixels": tensors}), tmp_path / "t.parquet")
    out = tmp_path / "out-tensor"
    assert main(["explain", str(MODEL), str(tmp_path / "t.parquet"), "-o", str(out), "--column", "pixels",
                 "--quiet"]) == 0
    good = [i for i in range(12) if i not in (2, 7)]
    _assert_matches_reference(out, IMAGES[good], np.asarray(good))
    reasons = [row[2] for row in _errors(out)]
    assert "holds 756 values, the model takes 784" in reasons[0] and "NaN" in reasons[1]


def test_non_image_model_from_a_npy(tmp_path):
    """A dense model [N, 6]: samples in its own shape, relevance checked against the Explainer."""
    import netspec as ns

    rng = np.random.default_rng(5)
    model = ns.to_onnx([ns.dense(rng, 6, 5), ns.Relu(), ns.dense(rng, 5, 3)], (1, 6))
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model.SerializeToString())
    x = rng.normal(size=(17, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    assert main(["explain", str(path), str(tmp_path / "x.npy"), "-o", str(out), "--rule", "epsilon",
                 "--quiet"]) == 0
    expected = onnxlrp.Explainer(str(path), rule="epsilon")(x)
    np.testing.assert_allclose(load_relevance(out), expected.relevance, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(read_index(out)["class"], expected.explained_class)
    assert main(["explain", str(path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "o2"), "--preprocess",
                 "imagenet"]) == 1


def test_data_set_errors_are_one_line(tmp_path, capsys):
    np.save(tmp_path / "wrong.npy", np.zeros((3, 27, 28), np.uint8))
    assert main(["explain", str(MODEL), str(tmp_path / "wrong.npy"), "-o", str(tmp_path / "o")]) == 1
    assert "samples have shape [27, 28]; the model takes [1, 28, 28] or [28, 28, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    np.save(tmp_path / "ok.npy", IMAGES[:3])
    assert main(["explain", str(MODEL), str(tmp_path / "ok.npy"), "--target", "10", "-o", str(tmp_path / "o")]) == 1
    assert "only 10 classes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # a run that fails before its first shard leaves nothing
    assert main(["explain", str(MODEL), str(tmp_path / "ok.npy"), str(tmp_path / "ok.npy"), "-o",
                 str(tmp_path / "o")]) == 1
    assert "give one data set" in capsys.readouterr().err
    assert main(["explain", str(MODEL), str(ROOT / "models" / "samples" / "digit_0.png"), "--resume", "-o",
                 str(tmp_path / "o")]) == 1
    assert "--resume applies to a data set" in capsys.readouterr().err
    assert main(["explain", str(MODEL), str(tmp_path / "ok.npy"), "-o", str(tmp_path / "o"), "-q"]) == 0
    assert main(["explain", str(MODEL), str(tmp_path / "ok.npy"), "-o", str(tmp_path / "o")]) == 1
    assert "holds an earlier run (1 of 1 shards done); --resume continues it" in capsys.readouterr().err
    assert main(["explain", str(MODEL), str(tmp_path / "ok.npy"), "-o", str(tmp_path / "o"), "--resume",
                 "--rule", "epsilon"]) == 1
    assert "the earlier run was a different job (plan_sha256" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ resume


def _explain_cli(data: Path, out: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onnxlrp.cli", "explain", str(MODEL), str(data), "-o", str(out),
                             "--batch-size", "10", "--shard-size", "40", *extra], cwd=ROOT, **popen)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """1,000 digits (.npy) explained in one run: shards of 40, batches of 10."""
    folder = tmp_path_factory.mktemp("resume")
    np.save(folder / "digits.npy", IMAGES)
    out = folder / "whole"
    assert _explain_cli(folder / "digits.npy", out, "--quiet").wait(timeout=300) == 0
    return folder / "digits.npy", _files(out)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_a_kill_gives_the_bytes_of_an_uninterrupted_run(tmp_path, uninterrupted, how):
    data, expected = uninterrupted
    out = tmp_path / "out"
    proc = _explain_cli(data, out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "shards" / "index-00002.csv").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(how)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -how
    if how == signal.SIGTERM:
        assert "shards are complete" in err and "--resume" in err
    assert not (out / "index.csv").exists()
    done = sorted(p.name for p in (out / "shards").glob("index-*.csv"))
    assert 3 <= len(done) < 25
    for name in done:  # every shard with an index part is complete
        k = name[6:11]
        assert (out / "shards" / f"relevance-{k}.npy").read_bytes() == expected[f"shards/relevance-{k}.npy"]
    resumed = _explain_cli(data, out, "--resume", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    assert f"{len(done)} done already" in stdout
    got = _files(out)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name


def test_progress_bar_on_a_terminal(tmp_path):
    np.save(tmp_path / "d.npy", IMAGES[:200])
    leader, follower = pty.openpty()
    proc = _explain_cli(tmp_path / "d.npy", tmp_path / "out", stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    assert "explain: 100%" in text and "200/200" in text and "samples/s" in text  # tqdm: count, rate, ETA


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_streams_any_source_and_batching_does_not_change_the_numbers(tmp_path, capsys):
    """100 digits as a .npz (batch 64) and as Parquet image bytes with a corrupt row (batch 7): the same numbers,
    the corrupt row skipped and listed."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    np.savez(tmp_path / "d.npz", images=IMAGES[:100], labels=LABELS[:100])
    cells = []
    for a in IMAGES[:100]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        cells.append(buf.getvalue())
    cells.insert(40, b"\x89PNG\r\n\x1a\n broken")
    labels = list(LABELS[:100])
    labels.insert(40, 0)
    pq.write_table(pa.table({"img": cells, "label": labels}), tmp_path / "d.parquet", row_group_size=30)
    results = []
    for data, batch in (("d.npz", "64"), ("d.parquet", "7")):
        out = tmp_path / f"ev-{data}"
        assert main(["evaluate", str(MODEL), "--data", str(tmp_path / data), "--rules", "rlrp,epsilon", "--percent",
                     "5,25,75", "--batch-size", batch, "-o", str(out), "--quiet"]) == 0
        assert capsys.readouterr() == ("", "")
        results.append(json.loads((out / "results.json").read_text()))
        errors = _errors(out)
        assert errors == ([] if data == "d.npz" else [["40", "d.parquet[40]", errors[0][2]]])
    a, b = results
    assert a["samples"] == b["samples"] == 100 and b["unreadable"] == 1
    assert a["correctly_classified"] == b["correctly_classified"]
    for rule in ("rlrp", "epsilon"):
        ra, rb = a["rules"][rule], b["rules"][rule]
        assert ra["accuracy_correct"] == rb["accuracy_correct"] and ra["accuracy_all"] == rb["accuracy_all"]
        np.testing.assert_allclose(ra["perturbation_curve"], rb["perturbation_curve"], rtol=1e-5)
        assert ra["aopc"] == pytest.approx(rb["aopc"], rel=1e-5) and ra["aopc_std"] == pytest.approx(rb["aopc_std"],
                                                                                                     rel=1e-4)


def test_evaluate_memory_stays_that_of_a_few_batches(tmp_path, monkeypatch):
    """200 RGB images of 128 x 128 (39 MB as float32) through a small CNN in batches of 2: the traced peak while
    streaming stays far below the data set's size."""
    import tracemalloc

    import netspec as ns

    from onnxlrp.apps import evaluate as evaluate_module

    rng = np.random.default_rng(3)
    model = ns.to_onnx([ns.conv(rng, 3, 4, 3, stride=2), ns.Relu(), ns.GlobalAvgPool(), ns.Flatten(),
                        ns.dense(rng, 4, 3)], (1, 3, 128, 128))
    (tmp_path / "cnn.onnx").write_bytes(model.SerializeToString())
    images = rng.integers(0, 256, (200, 3, 128, 128), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", images=images, labels=rng.integers(0, 3, 200))
    streamed = evaluate_module.read_ahead
    peaks = []

    def read_ahead(source, units):  # the peak from the first batch (after compiling) to the last (before plotting)
        for k, item in enumerate(streamed(source, units)):
            if k == 0:
                tracemalloc.reset_peak()
            yield item
        peaks.append(tracemalloc.get_traced_memory()[1])

    monkeypatch.setattr(evaluate_module, "read_ahead", read_ahead)
    tracemalloc.start()
    try:
        results = onnxlrp.apps.run_evaluate(str(tmp_path / "cnn.onnx"), data=str(tmp_path / "big.npz"),
                                            rules="epsilon", percent="10,50", batch_size=2, out_dir=tmp_path / "ev",
                                            quiet=True)
    finally:
        tracemalloc.stop()
    assert results["samples"] == 200 and results["rules"]["epsilon"]["steps"] == 20
    assert peaks[0] < images.size * 4 / 3, f"peak {peaks[0] / 2**20:.1f} MiB"
