"""The compiled digits model in onnxruntime-node (tests/js/explain.mjs, the README's Node.js example): ``target``
is among the session's inputs and can be fed, and the relevance equals onnxruntime's (Python, CPU provider) within
1e-5 of the map's peak for three rules, with target -1 (the predicted classes) and 3, at batch 2."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from js_support import JS, node, ort_node

import onnxlrp

RULES = ["rlrp", "epsilon-plus-flat", "epsilon-alpha2-beta1"]


@pytest.mark.parametrize("rule", RULES)
def test_onnxruntime_node_explains_like_python(rule, tmp_path):
    runner = node()
    ort_node()
    model = tmp_path / f"digits.{rule}.onnx"
    onnx.save(onnxlrp.compile("models/digits_cnn.onnx", rule), model)
    data = np.load("models/digits_test.npz")
    x = data[next(k for k in data.files if data[k].ndim >= 3)][:2].reshape(2, 1, 28, 28).astype(np.float32)
    (tmp_path / "x.f32").write_bytes(x.astype("<f4").tobytes())
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for target in (-1, 3):
        done = subprocess.run([runner, str(JS / "explain.mjs"), str(model), str(tmp_path / "x.f32"), "2,1,28,28",
                               str(target), str(tmp_path / "r.f32")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert not done.stderr  # no warning either
        result = json.loads(done.stdout)
        assert result["inputs"] == ["image", "target"]
        got = np.frombuffer((tmp_path / "r.f32").read_bytes(), "<f4").reshape(x.shape)
        want, cls = session.run(["relevance", "explained_class"], {"image": x, "target": np.full(2, target)})
        assert result["explained_class"] == cls.tolist()
        for sample in range(2):
            peak = np.abs(want[sample]).max()
            assert np.abs(got[sample] - want[sample]).max() <= 1e-5 * peak, (rule, target, sample)
