"""The benchmark's gradient probe (tools/gradient_probe.py) computes what it says: gradient x input."""

import importlib.util
from pathlib import Path

import netspec as ns
import numpy as np
import pytest
import reference as ref
from helpers import session
from netspec import Flatten, MaxPool, Relu

import onnxlrp
from onnxlrp.runtime import with_target

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mask", ["where", "sign"])
def test_gradient_probe_is_gradient_times_input(mask):
    rng = np.random.default_rng(21)
    eps = 0.5  # large, so that the epsilon rule's ratios v / (v + eps) are far from the ReLU masks
    layers = [ns.conv(rng, 2, 4, 3, pad=1), Relu(), MaxPool((2, 2), (2, 2)), ns.conv(rng, 4, 4, 3, pad=1), Relu(),
              ns.conv(rng, 4, 3, 3), Flatten()]  # the last Conv sees all 3x3 positions: its outputs are the logits
    x = rng.normal(size=(1, 2, 6, 6))
    logits = ref.forward(layers, x)[0]
    t = int(np.argmax(logits))
    h, n = 1e-6, x.size  # central finite differences of the float64 forward
    E = np.eye(n).reshape((n,) + x.shape[1:]) * h
    f = ref.forward(layers, np.concatenate([x + E, x - E]))[:, t]
    gradient_x_input = ((f[:n] - f[n:]) / (2 * h)).reshape(x.shape) * x
    # the probe keeps the first division, of the logit by itself plus its stabilizer
    top_ratio = logits[t] / (logits[t] + eps * np.sign(logits[t]))

    compiled = onnxlrp.compile(ns.to_onnx(layers, x.shape), "epsilon", epsilon=eps)
    sess = session(compiled)
    feed = with_target(sess, {sess.get_inputs()[0].name: x.astype(np.float32)})
    epsilon_relevance = sess.run(["relevance"], feed)[0]
    assert load_tool("gradient_probe").masks_for_ratios(compiled, mask) == 2  # one per Relu
    probe_relevance = session(compiled).run(["relevance"], feed)[0]

    expected = top_ratio * gradient_x_input
    scale = np.abs(expected).max()
    np.testing.assert_allclose(probe_relevance, expected, rtol=1e-4, atol=1e-5 * scale)
    assert np.abs(epsilon_relevance - expected).max() > 0.05 * scale  # what the probe replaced mattered
