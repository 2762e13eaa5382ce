"""Tiny transformers with seeded random weights, their inputs and their ONNX exports, for the transformer tests.

Every model is built from a config (nothing is downloaded) with 2 layers, hidden size 32, 4 heads and short
sequences, and every parameter is randomised: weights ``N(0, 1/fan_in)``, biases ``N(0, 0.1)``, norm weights
``1 + N(0, 0.2)`` and norm biases ``N(0, 0.1)`` (so that no bias or norm parameter is a neutral 0 or 1).

* :data:`MODELS`: name -> builder. ``bert`` (``BertForSequenceClassification`` fed ``input_ids`` and an
  ``attention_mask`` with padding), ``bert-embeds`` (the same model fed ``inputs_embeds``), ``vit-hf``
  (``ViTForImageClassification``), ``vit-tv`` (torchvision's ``VisionTransformer``, the ``vit_b_16`` architecture
  at 16x16 pixels), ``gpt2`` (``GPT2LMHeadModel``) and ``llama`` (``LlamaForCausalLM`` with RMSNorm, SwiGLU, RoPE,
  grouped-query attention and all biases on), the decoders fed ``input_ids`` and a left-padded ``attention_mask``;
  ``sdpa-bool`` and ``sdpa-causal`` (one ``scaled_dot_product_attention`` layer with a boolean mask or
  ``is_causal``).
* :func:`exported`: the ONNX export by the TorchScript (``"ts"``) or dynamo exporter at an opset, cached in the
  process and on disk (``ONNXLRP_TEST_CACHE``, default a folder in the temp dir), keyed by this file's content and the
  library versions, so that the dynamo exporter (about 9 s per model) runs once per machine.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from vision_models import import_torchvision

os.environ.setdefault("USE_TF", "0")  # transformers would import TensorFlow (seconds) when it is installed

MAX_IR_VERSION = 10
BATCH, TOKENS, VOCAB, HIDDEN, HEADS, IMAGE = 2, 7, 60, 32, 4, 16
SEED = 0


@dataclass
class Model:
    """A torch module whose forward takes the named numpy ``inputs`` (as tensors) and returns the logits."""

    module: nn.Module
    inputs: dict[str, np.ndarray]
    dynamic: dict[str, dict[int, str]]  # TorchScript's dynamic_axes for each input


def randomize(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Seeded random parameters (module docstring); norm layers recognised by their class name."""
    generator = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if id(p) in norms:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(p.numel() / p.shape[0]))
    return model.eval()


class Logits(nn.Module):
    """``model(**inputs).logits`` (Hugging Face) or ``model(x)`` with the inputs named."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], hf: bool = True):
        super().__init__()
        self.model, self.names, self.hf = model, names, hf

    def forward(self, *args):
        if not self.hf:
            return self.model(*args)
        return self.model(**dict(zip(self.names, args, strict=True))).logits


def token_inputs(rng: np.random.Generator, left_pad: bool) -> dict[str, np.ndarray]:
    ids = rng.integers(0, VOCAB, (BATCH, TOKENS)).astype(np.int64)
    mask = np.ones((BATCH, TOKENS), dtype=np.int64)
    if left_pad:
        mask[1, :2] = 0
    else:
        mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hf():
    import_torchvision()  # transformers imports torchvision when it is installed
    import transformers

    return transformers


def build_bert(attn: str, embeds: bool = False) -> Model:
    t = hf()
    config = t.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                          intermediate_size=2 * HIDDEN, max_position_embeddings=16, num_labels=3,
                          attn_implementation=attn)
    model = randomize(t.BertForSequenceClassification(config))
    rng = np.random.default_rng(SEED)
    inputs = token_inputs(rng, left_pad=False)
    if embeds:
        inputs = {"inputs_embeds": rng.standard_normal((BATCH, TOKENS, HIDDEN)).astype(np.float32),
                  "attention_mask": inputs["attention_mask"]}
    names = tuple(inputs)
    dynamic = {name: {0: "batch", 1: "tokens"} for name in names}
    return Model(Logits(model, names), inputs, dynamic)


def build_vit_hf(attn: str) -> Model:
    t = hf()
    config = t.ViTConfig(image_size=IMAGE, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
                         num_attention_heads=HEADS, intermediate_size=2 * HIDDEN, num_labels=5,
                         attn_implementation=attn)
    model = randomize(t.ViTForImageClassification(config))
    x = np.random.default_rng(SEED).standard_normal((BATCH, 3, IMAGE, IMAGE)).astype(np.float32)
    return Model(Logits(model, ("pixel_values",)), {"pixel_values": x}, {"pixel_values": {0: "batch"}})


def build_vit_tv(attn: str) -> Model:
    tv = import_torchvision()
    model = randomize(tv.models.VisionTransformer(image_size=IMAGE, patch_size=4, num_layers=2, num_heads=HEADS,
                                                  hidden_dim=HIDDEN, mlp_dim=2 * HIDDEN, num_classes=5))
    x = np.random.default_rng(SEED).standard_normal((BATCH, 3, IMAGE, IMAGE)).astype(np.float32)
    return Model(Logits(model, ("x",), hf=False), {"x": x}, {"x": {0: "batch"}})


def build_gpt2(attn: str) -> Model:
    t = hf()
    config = t.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=16,
                          attn_implementation=attn, use_cache=False)
    model = randomize(t.GPT2LMHeadModel(config))
    inputs = token_inputs(np.random.default_rng(SEED), left_pad=True)
    return Model(Logits(model, tuple(inputs)), inputs, {n: {0: "batch", 1: "tokens"} for n in inputs})


def build_llama(attn: str) -> Model:
    t = hf()
    config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                           num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, max_position_embeddings=32,
                           attention_bias=True, mlp_bias=True, attn_implementation=attn, use_cache=False)
    model = randomize(t.LlamaForCausalLM(config))
    inputs = token_inputs(np.random.default_rng(SEED), left_pad=True)
    return Model(Logits(model, tuple(inputs)), inputs, {n: {0: "batch", 1: "tokens"} for n in inputs})


class SDPABlock(nn.Module):
    """One attention layer by ``F.scaled_dot_product_attention`` with a boolean ``attn_mask`` (a column masked out;
    the exporters guard its softmax with ``Where(IsNaN(s), 0, s)``) or ``is_causal=True``, then a classifier."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode, self.heads = mode, HEADS
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(TOKENS * HIDDEN, 3)
        allowed = torch.ones(TOKENS, TOKENS, dtype=torch.bool)
        allowed[:, 2] = False
        self.register_buffer("allowed", allowed)

    def forward(self, x):
        n = x.shape[0]
        q, k, v = (t.view(n, TOKENS, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        if self.mode == "bool":
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed)
        else:
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(n, -1))


def build_sdpa(attn: str, mode: str) -> Model:
    model = randomize(SDPABlock(mode))
    x = np.random.default_rng(SEED).standard_normal((BATCH, TOKENS, HIDDEN)).astype(np.float32)
    return Model(Logits(model, ("x",), hf=False), {"x": x}, {"x": {0: "batch"}})


MODELS = {
    "bert": build_bert,
    "bert-embeds": functools.partial(build_bert, embeds=True),
    "vit-hf": build_vit_hf,
    "vit-tv": build_vit_tv,
    "gpt2": build_gpt2,
    "llama": build_llama,
    "sdpa-bool": functools.partial(build_sdpa, mode="bool"),
    "sdpa-causal": functools.partial(build_sdpa, mode="causal"),
}


@functools.cache
def build(name: str, attn: str = "sdpa") -> Model:
    """The model in eval mode (the wrapper too: the exporters restore the top module's mode, and ``train()`` would
    reach the model's dropouts)."""
    torch.manual_seed(SEED)
    model = MODELS[name](attn)
    model.module.eval()
    return model


def torch_logits(name: str, attn: str = "sdpa") -> np.ndarray:
    model = build(name, attn)
    with torch.no_grad():
        return model.module(*(torch.from_numpy(v) for v in model.inputs.values())).numpy()


def export(model: Model, exporter: str, opset: int) -> onnx.ModelProto:
    """``torch.onnx.export`` with the TorchScript exporter (dynamic batch and tokens) or the dynamo exporter
    (static shapes)."""
    args = tuple(torch.from_numpy(v) for v in model.inputs.values())
    names = list(model.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "ts":
            buffer = io.BytesIO()
            torch.onnx.export(model.module, args, buffer, dynamo=False, opset_version=opset, input_names=names,
                              output_names=["logits"], dynamic_axes={**model.dynamic, "logits": {0: "batch"}})
            proto = onnx.load_from_string(buffer.getvalue())
        elif exporter == "dynamo":
            proto = torch.onnx.export(model.module, args, dynamo=True, opset_version=opset, input_names=names,
                                      output_names=["logits"], verbose=False).model_proto
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto


def cache_key(*parts) -> str:
    import transformers

    source = Path(__file__).read_bytes()
    text = "|".join(map(str, (*parts, torch.__version__, transformers.__version__, onnx.__version__)))
    return hashlib.sha256(source + text.encode()).hexdigest()[:24]


@functools.cache
def _exported_bytes(name: str, exporter: str, opset: int, attn: str) -> bytes:
    folder = Path(os.environ.get("ONNXLRP_TEST_CACHE", Path(tempfile.gettempdir()) / "onnxlrp-test-exports"))
    path = folder / f"{name}-{exporter}{opset}-{attn}-{cache_key(name, exporter, opset, attn)}.onnx"
    if path.is_file():
        return path.read_bytes()
    data = export(build(name, attn), exporter, opset).SerializeToString()
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)
    return data


def exported(name: str, exporter: str = "ts", opset: int = 17, attn: str = "sdpa") -> onnx.ModelProto:
    """A fresh copy of the cached export."""
    return onnx.load_from_string(_exported_bytes(name, exporter, opset, attn))
