"""Transformers compiled with ``attnlrp`` and ``cp-lrp`` against LXT 2.1's explicit rules on the same torch models.

The models (``transformer_models.py``: BERT fed ``input_ids`` with padding and fed ``inputs_embeds``, HF ViT,
torchvision's ViT, GPT-2, LLaMA with RMSNorm/SwiGLU/RoPE/GQA/causal mask; random weights, every bias and norm
parameter randomised) are exported by the TorchScript exporter (opset 17, eager attention) and the dynamo exporter
(opset 18, SDPA), and a few also at opsets 20 and 23 (the fused ``Attention`` and ``RMSNormalization`` ops). For
each: the original outputs are unchanged, the relevance is finite, the explained class is LXT's, and the relevance
agrees with LXT's (``lxt_reference.py``, float64) to a relative L2 error of 1e-3 per sample.

Needs torch, transformers and LXT (the test environment of the README); without them the module is skipped with
the reason.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("transformers", reason="the transformer tests need Hugging Face transformers")
pytest.importorskip("lxt.explicit.functional", reason="the transformer tests need LXT 2.1 (lxt==2.1)")

import lxt_reference as lxt  # noqa: E402
import transformer_models as tm  # noqa: E402

import onnxlrp  # noqa: E402
from onnxlrp.runtime import with_target  # noqa: E402

TOLERANCE = 1e-3
EXPORTS = [("ts", 17, "eager"), ("dynamo", 18, "sdpa")]
MORE_OPSETS = [("bert", "ts", 20, "sdpa"), ("gpt2", "ts", 20, "sdpa"), ("llama", "dynamo", 20, "sdpa"),
               ("vit-tv", "dynamo", 20, "sdpa"), ("bert", "dynamo", 23, "sdpa"), ("llama", "dynamo", 23, "sdpa")]


def run(proto: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    return dict(zip([o.name for o in session.get_outputs()],
                    session.run(None, feeds if "target" in feeds else with_target(session, feeds)), strict=True))


@functools.cache
def reference(name: str, attn: str, rule: str):
    """LXT's logits, relevance and explained class; its forward checked against the torch model first."""
    model = tm.build(name, attn)
    logits, relevance, classes = lxt.relevance(name, model, model.inputs, cp=rule == "cp-lrp")
    expected = tm.torch_logits(name, attn)
    last = (slice(None), -1) if expected.ndim == 3 else (slice(None),)
    np.testing.assert_allclose(logits[last], expected[last], rtol=1e-4, atol=1e-4)
    return relevance, classes


def relevance_output(out: dict) -> np.ndarray:
    (name,) = [k for k in out if k.startswith("relevance")]
    return out[name]


def check(name: str, exporter: str, opset: int, attn: str, rule: str) -> onnx.ModelProto:
    proto = tm.exported(name, exporter, opset, attn)
    compiled = onnxlrp.compile(proto, rule)
    feeds = tm.build(name, attn).inputs
    out = run(compiled, feeds)
    np.testing.assert_allclose(out["logits"], run(proto, feeds)["logits"], rtol=1e-5, atol=1e-5)
    relevance = relevance_output(out)
    assert np.isfinite(relevance).all()
    expected, classes = reference(name, attn, rule)
    np.testing.assert_array_equal(out["explained_class"], classes)
    error = lxt.relative_error(relevance, expected)
    assert np.all(error <= TOLERANCE), f"relative L2 error per sample {error}"
    return compiled


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("exporter,opset,attn", EXPORTS)
@pytest.mark.parametrize("name", list(tm.MODELS))
def test_agrees_with_lxt(name, exporter, opset, attn, rule):
    check(name, exporter, opset, attn, rule)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name,exporter,opset,attn", MORE_OPSETS)
def test_agrees_with_lxt_at_other_opsets(name, exporter, opset, attn, rule):
    compiled = check(name, exporter, opset, attn, rule)
    if opset >= 23:  # the exporter fuses attention: the op itself is explained, not a decomposition
        assert "Attention" in {n.op_type for n in compiled.graph.node}


@pytest.mark.parametrize("exporter,opset", [("ts", 17), ("dynamo", 18)])
def test_boolean_sdpa_mask_has_the_nan_guard(exporter, opset):
    """Both exporters guard the softmax of a boolean-masked SDPA with ``Where(IsNaN(s), 0, s)``; the rules read
    ``s`` behind it (the agreement itself is in test_agrees_with_lxt[sdpa-bool-...])."""
    ops = {n.op_type for n in tm.exported("sdpa-bool", exporter, opset, "sdpa" if exporter == "dynamo" else
                                          "eager").graph.node}
    assert {"IsNaN", "Where", "Softmax"} <= ops


@pytest.mark.parametrize("name", ["bert", "vit-tv", "llama"])
def test_dynamic_batch(name):
    """TorchScript exports keep the batch (and the tokens) dynamic: one sample alone gets the relevance it gets in
    the batch (the CLS token joins a batch-sized Expand, the masks follow the batch)."""
    compiled = onnxlrp.compile(tm.exported(name, "ts", 17, "eager"), "attnlrp")
    feeds = tm.build(name, "eager").inputs
    both = relevance_output(run(compiled, feeds))
    alone = relevance_output(run(compiled, {k: v[1:] for k, v in feeds.items()}))
    np.testing.assert_allclose(alone[0], both[1], rtol=1e-4, atol=1e-6 * np.abs(both[1]).max())


def test_cli_compiles_a_decoder_at_a_position(tmp_path):
    path = tmp_path / "gpt2.onnx"
    onnx.save(tm.exported("gpt2", "ts", 17, "eager"), path)
    result = subprocess.run([sys.executable, "-m", "onnxlrp.cli", "compile", str(path), "--rule", "cp-lrp",
                             "--position", "3", "-o", str(tmp_path / "out.onnx")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    compiled = onnx.load(tmp_path / "out.onnx")
    assert [o.name for o in compiled.graph.output] == ["logits", "relevance.input_ids", "explained_class"]
    feeds = tm.build("gpt2", "eager").inputs
    out = run(compiled, feeds)
    np.testing.assert_array_equal(out["explained_class"], out["logits"][:, 3].argmax(-1))
    assert np.all(out["relevance.input_ids"][:, 4:] == 0)  # causal: later tokens cannot matter at position 3
