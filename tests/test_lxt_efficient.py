"""The test reference (``lxt_reference.py``: LXT's explicit rule functions placed by hand) against LXT's own
efficient mode (``lxt.efficient.monkey_patch`` on the Hugging Face modules, gradient x input) on the same LLaMA and
GPT-2: the two agree up to their stabilizers (efficient mode has none on linear layers and ``add2``, explicit mode
1e-8, and 1e-6 on LLaMA's ``P V``). Efficient mode patches the transformers modules for the whole process, so it
runs in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the transformer tests need Hugging Face transformers")
pytest.importorskip("lxt.explicit.functional", reason="the transformer tests need LXT 2.1 (lxt==2.1)")

CHILD = """
import importlib, json, sys
import torch
import transformer_models as tm
import lxt_reference as ref
rule = sys.argv[1]
tm.hf()
from lxt.efficient import monkey_patch
import lxt.efficient.models as patches
results = {}
for name in ("llama", "gpt2"):
    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    patch = getattr(patches, name)
    monkey_patch(module, patch.cp_LRP if rule == "cp-lrp" else patch.attnLRP)
    model = tm.build(name, "eager")
    net = model.module.model
    feeds = {k: torch.from_numpy(v) for k, v in model.inputs.items()}
    x = net.get_input_embeddings()(feeds["input_ids"]).detach().requires_grad_(True)
    logits = net(inputs_embeds=x, attention_mask=feeds["attention_mask"]).logits[:, -1]
    classes = logits.argmax(-1)
    logits.gather(1, classes[:, None]).sum().backward()
    efficient = (x * x.grad).detach().sum(-1).numpy()
    _, explicit, explicit_classes = ref.relevance(name, model, model.inputs, cp=rule == "cp-lrp")
    results[name] = {"error": ref.relative_error(efficient, explicit).tolist(),
                     "same_classes": bool((classes.numpy() == explicit_classes).all())}
print(json.dumps(results))
"""


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_reference_agrees_with_lxt_efficient_mode(rule):
    done = subprocess.run([sys.executable, "-c", CHILD, rule], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results) == {"llama", "gpt2"}
    for name, result in results.items():
        assert result["same_classes"], name
        assert max(result["error"]) <= 2e-4, (name, result["error"])
