"""The bundled vision transformer (``models/digits_vit.onnx``, ``tools/train_digits_vit.py``) on the bundled digits.

- It compiles with ``attnlrp`` and ``cp-lrp``; the probabilities stay as they were, the relevance is finite and
  shaped like the image, and the model's accuracy is the one its metadata states.
- Its relevance agrees with LXT's explicit rules (``lxt_reference.vit_tv``, float64) on the same weights: the torch
  model is rebuilt from the ONNX initializers, which keep the parameters' names (the export folds no constants);
  loading them strictly checks the architecture. Needs torch, torchvision and LXT; skipped without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import session
from onnx import numpy_helper

import onnxlrp

MODELS = Path(__file__).resolve().parent.parent / "models"
VIT = MODELS / "digits_vit.onnx"
TOLERANCE = 1e-3  # relative L2 error per sample, as for the transformer tests
RULES = ["attnlrp", "cp-lrp"]


def digit_images(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The bundled held-out digits as the model takes them (``[N, 1, 28, 28]``, pixel / 255) and their labels."""
    data = np.load(MODELS / "digits_test.npz")
    images, labels = data["images"][:n], data["labels"][:n]
    return (images.astype(np.float32) / np.float32(255))[:, None], labels


def run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x}), strict=True))


def test_accuracy_is_the_metadata_s():
    x, labels = digit_images()
    probabilities = run(onnx.load(str(VIT)), x)["probabilities"]
    meta = json.loads((MODELS / "digits_vit.json").read_text(encoding="utf-8"))
    assert float((probabilities.argmax(1) == labels).mean()) == pytest.approx(meta["test_accuracy"], abs=1e-9)


@pytest.mark.parametrize("rule", RULES)
def test_compiles_and_explains(rule):
    x, _ = digit_images(32)
    source = onnx.load(str(VIT))
    out = run(onnxlrp.compile(source, rule), x)
    np.testing.assert_allclose(out["probabilities"], run(source, x)["probabilities"], rtol=1e-6, atol=1e-7)
    r = out["relevance"]
    assert r.shape == x.shape and np.all(np.isfinite(r))
    np.testing.assert_array_equal(out["explained_class"], out["probabilities"].argmax(1))
    assert np.all(np.abs(r).reshape(len(r), -1).max(1) > 0)


@pytest.mark.parametrize("rule", RULES)
def test_agrees_with_lxt(rule):
    torch = pytest.importorskip("torch")
    pytest.importorskip("lxt.explicit.functional", reason="needs LXT 2.1 (lxt==2.1)")
    import lxt_reference as lxt
    from vision_models import import_torchvision

    source = onnx.load(str(VIT))
    net = import_torchvision().models.VisionTransformer(image_size=28, patch_size=7, num_layers=4, num_heads=4,
                                                       hidden_dim=64, mlp_dim=128, num_classes=10)
    net.conv_proj = torch.nn.Conv2d(1, 64, kernel_size=7, stride=7)
    state = {t.name.removeprefix("vit."): torch.from_numpy(numpy_helper.to_array(t).copy())
             for t in source.graph.initializer if t.name.startswith("vit.")}
    net.load_state_dict(state, strict=True)
    net = net.double().eval()
    x, _ = digit_images(16)
    xt = torch.from_numpy(x).double().requires_grad_(True)
    logits = lxt.vit_tv(net, lxt.Rules(cp=rule == "cp-lrp"), xt)
    classes = logits.argmax(-1)
    logits.backward(torch.nn.functional.one_hot(classes, 10).double() * logits.detach())
    expected = xt.grad.numpy()
    out = run(onnxlrp.compile(source, rule), x)
    probabilities = torch.softmax(logits.detach(), -1).numpy()
    np.testing.assert_allclose(out["probabilities"], probabilities, atol=1e-5)
    np.testing.assert_array_equal(out["explained_class"], classes.numpy())
    errors = lxt.relative_error(out["relevance"], expected)
    assert errors.max() <= TOLERANCE, errors
