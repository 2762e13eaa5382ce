"""`explain --engine ray` on a local Ray cluster that the test starts (2 CPUs, 2 actors): a 2,000-image folder
gives the single-process run's index and relevance; an actor killed mid-job is restarted by Ray and the output is
still complete and correct."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from onnxlrp.apps.explain_data import load_relevance
from onnxlrp.apps.shards import read_index
from onnxlrp.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_cnn.onnx"
SIZES = ["--batch-size", "50", "--shard-size", "250"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs whose workers import this checkout; its GCS address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """2,000 PNGs (the 1,000 bundled test digits and their transposes) in class folders, and the single-process
    run's output."""
    digits = np.load(ROOT / "models" / "digits_test.npz")
    folder = tmp_path_factory.mktemp("ray") / "digits"
    for i, (image, label) in enumerate(zip(digits["images"], digits["labels"], strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / str(label) / f"{i:04d}.png")
        Image.fromarray(np.ascontiguousarray(image.T)).save(folder / str(label) / f"{i:04d}t.png")
    single = folder.parent / "single"
    assert main(["explain", str(MODEL), str(folder), "-o", str(single), "--quiet", *SIZES]) == 0
    return folder, single


def _assert_same_run(out: Path, single: Path) -> None:
    got, want = read_index(out), read_index(single)
    assert len(want["sample"]) == 2000
    for column in ("sample", "source", "class", "shard", "offset"):
        np.testing.assert_array_equal(got[column], want[column])
    for column in ("score", "relevance_sum"):
        np.testing.assert_allclose(got[column], want[column], rtol=1e-6, atol=1e-9)
    relevance, reference = load_relevance(out), load_relevance(single)
    assert relevance.shape == reference.shape == (2000, 1, 28, 28)
    np.testing.assert_allclose(relevance, reference, atol=1e-6, rtol=0)
    assert (out / "errors.csv").read_text() == "sample,source,reason\n"


def test_ray_engine_equals_the_single_process_run(cluster, digits_folder, tmp_path, capsys):
    folder, single = digits_folder
    assert main(["explain", str(MODEL), str(folder), "-o", str(tmp_path / "out"), "--engine", "ray",
                 "--num-workers", "2", *SIZES]) == 0
    assert "on Ray: 2 actor(s), 1 CPU thread(s) each (2 CPUs)" in capsys.readouterr().out
    _assert_same_run(tmp_path / "out", single)


def _map_workers() -> list[int]:
    """Process ids of this cluster's Ray Data actors (children of its raylet)."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if parent == raylet and cmdline.startswith(b"ray::MapWorker"):
            found.append(int(pid))
    return found


def test_a_killed_worker_is_retried_and_the_output_is_complete(cluster, digits_folder, tmp_path):
    """The CLI joins the test's cluster (--address); one actor is SIGKILLed once two of eight shards are written."""
    folder, single = digits_folder
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "onnxlrp.cli", "explain", str(MODEL), str(folder), "-o", str(out),
                             "--engine", "ray", "--address", cluster, "--num-workers", "2", "--quiet", *SIZES],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "shards" / "index-00001.csv").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        workers = _map_workers()
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        assert not (out / "index.csv").exists()  # killed mid-job
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert workers[0] not in _map_workers()
    _assert_same_run(out, single)
