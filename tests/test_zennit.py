"""onnxlrp against Zennit 0.5 on PyTorch-exported models (optional: needs torch and zennit).

For every model (MLP; CNN with max pooling; VGG-like with average pooling; ResNet-like with residual Adds and a
projection shortcut) x exporter (TorchScript, dynamo) x rule or composite, the relevance of the compiled ONNX model
in onnxruntime must match Zennit's (relative L2 error below 1e-3 per sample) for the same target classes.

Zennit side (see ``torch_models.zennit_relevance``): single rules use a LayerMapComposite equivalent to onnxlrp's
plan (Pass on activations, Norm on Sum and average pooling, Pass on stand-alone BatchNorm, the rule on every
convolution and dense layer), named composites use Zennit's own classes (cmp: EpsilonAlpha2Beta1Flat). BatchNorm is
merged into the preceding layer, residual sums use Zennit's stack + Sum pattern, the output relevance is
``one_hot(target) * logits``, and the reference runs in float64. R-LRP has no Zennit counterpart.
"""

import importlib.util

import numpy as np
import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("zennit") is None:
    pytest.skip("zennit is not installed", allow_module_level=True)

import torch_models as tm  # noqa: E402

import onnxlrp  # noqa: E402

tm.import_zennit()

HAVE_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None

ARCHS = ("mlp", "cnn_maxpool", "vgg_avgpool", "resnet_basic")
TOLERANCE = 1e-3
# dynamo exports take seconds per model (TorchScript: a fraction of a second): ``-m "not slow"`` skips them
EXPORTS = ("ts17", pytest.param("dynamo18", marks=pytest.mark.slow))


def targets(arch: str, x: np.ndarray) -> np.ndarray:
    """Sample 0: its predicted class; the others: a class that is not predicted (a negative-logit start)."""
    logits = tm.torch_logits(arch, x)
    t = (logits.argmax(1) + 1 + np.arange(len(x))) % logits.shape[1]
    t[0] = logits[0].argmax()
    return t.astype(np.int64)


@pytest.mark.parametrize("rule", tm.ZENNIT_RULES)
@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_relevance_matches_zennit(arch, export, rule):
    if export.startswith("dynamo") and not HAVE_ONNXSCRIPT:
        pytest.skip("the dynamo exporter needs onnxscript")
    proto = tm.exported(arch, export)
    x = tm.sample_input(arch)
    target = targets(arch, x)
    compiled = onnxlrp.compile(proto, rule)
    out = tm.run_compiled(compiled, x, target)
    z_logits, z_relevance = tm.zennit_relevance(arch, rule, x, target)

    np.testing.assert_array_equal(out["explained_class"], target)
    np.testing.assert_allclose(out[tm.OUTPUT_NAME], z_logits, rtol=1e-4, atol=1e-5)
    relevance = out["relevance"]
    assert relevance.shape == x.shape
    assert np.isfinite(relevance).all()
    assert np.abs(z_relevance).reshape(len(x), -1).max(1).min() > 0, "degenerate reference"
    error = tm.rel_l2(relevance, z_relevance)
    assert error < TOLERANCE, f"relative L2 error {error:.2e} vs Zennit"
