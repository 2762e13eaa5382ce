"""AttnLRP and CP-LRP relevance from LXT 2.1's explicit rules, the reference of the transformer tests.

The LXT wheel ships the rule functions (``lxt.explicit.functional``, ``lxt.explicit.rules``) but not its explicit
model files. So each architecture's forward pass is written out here with the torch model's own parameters, in
float64, calling LXT's rule functions where LXT's explicit BERT and LLaMA files call them:

- linear layers and convolutions: ``lf.linear_epsilon`` / ``rules.epsilon_lrp`` with 1e-8 (``rules.EpsilonRule``);
- additions of two tensors (residuals, embeddings plus position or token-type embeddings, scores plus the attention
  mask, RoPE's two terms): ``lf.add2`` (1e-8);
- products with constants (the attention scale, RoPE's cos/sin, the ``-1`` of ``rotate_half``): ``lf.mul2``
  (identity);
- LayerNorm: ``lf.layer_norm`` (sigma detached, epsilon 1e-6 on the output); RMS norm: ``lf.rms_norm_identity``;
- element-wise activations (GELU, tanh, SiLU): ``rules.identity``;
- attention, AttnLRP: ``lf.matmul`` for ``Q K^T`` and ``P V`` (LLaMA's ``P V``: ``rules.UniformEpsilonRule``, 1e-6),
  ``lf.softmax``; SwiGLU's product: ``lf.mul2`` (uniform);
- CP-LRP (``lxt.explicit.models.llama.cp_lrp``): the softmax and the gate's activation stop relevance
  (``rules.stop_relevance_fn``), ``P V`` and the gate's product get ``rules.epsilon_lrp`` (1e-8).

Each forward returns the logits it computes, which the tests compare with the torch model's before they trust the
relevance. Relevance is read as LXT's explicit mode defines it: the gradient field of the input (``x.grad``) after
``logits.backward(one_hot(target) * logits)``; for token models at the word embeddings' output, summed over the
hidden axis.
"""

from __future__ import annotations

import copy
import math

import lxt.explicit.functional as lf
import lxt.explicit.rules as lr
import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-8


class Rules:
    """LXT's rule functions for the composite ``cp`` (CP-LRP) or not (AttnLRP)."""

    def __init__(self, cp: bool):
        self.cp = cp

    @staticmethod
    def linear(x, weight, bias=None):
        return lf.linear_epsilon(x, weight, bias, EPS)

    @staticmethod
    def module(x, layer):
        return lf.linear_epsilon(x, layer.weight, layer.bias, EPS)

    @staticmethod
    def add(a, b):
        return lf.add2(a, b, epsilon=EPS)

    @staticmethod
    def layer_norm(x, norm):
        return lf.layer_norm(x, norm.weight, norm.bias, norm.eps)

    @staticmethod
    def activation(fn, x):
        return lr.identity(fn, x)

    def attention(self, q, k, v, mask, scale, value_rule=None):
        """``softmax(q k^T * scale + mask) v`` over ``[batch, heads, tokens, head_dim]``."""
        scores = lf.add2(lf.mul2(lf.matmul(q, k.transpose(-1, -2), epsilon=EPS), scale), mask, epsilon=EPS)
        if self.cp:
            probs = lr.stop_relevance_fn.apply(lambda s: F.softmax(s, -1), scores)
            return lr.epsilon_lrp(torch.matmul, EPS, probs, v)
        probs = lf.softmax(scores, -1)
        if value_rule is not None:
            return value_rule(probs, v)
        return lf.matmul(probs, v, epsilon=EPS)

    def gate(self, activation, gate, up):
        """``activation(gate) * up`` (SwiGLU)."""
        if self.cp:
            return lr.epsilon_lrp(torch.mul, EPS, lr.stop_relevance_fn.apply(activation, gate), up)
        return lf.mul2(lr.identity(activation, gate), up)


def heads(x, n):
    b, t, d = x.shape
    return x.view(b, t, n, d // n).transpose(1, 2)


def merge(x):
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """0 where attention is allowed, the dtype's lowest value elsewhere (``[batch, 1, queries, keys]``)."""
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(allowed, zero, torch.full((), torch.finfo(torch.float64).min, dtype=torch.float64))


def padding_mask(attention_mask, tokens):
    return additive_mask(attention_mask.bool()[:, None, None, :].expand(-1, 1, tokens, -1))


def causal_mask(attention_mask, tokens):
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    return additive_mask(causal[None, None] & attention_mask.bool()[:, None, None, :])


# ---------------------------------------------------------------- architectures

def bert(model, rules: Rules, x, attention_mask):
    """``BertForSequenceClassification`` on word embeddings ``x`` (``[batch, tokens, hidden]``)."""
    m = model.bert
    e = m.embeddings
    t = x.shape[1]
    h = rules.add(x, e.token_type_embeddings(torch.zeros_like(attention_mask)).detach())
    h = rules.add(h, e.position_embeddings(torch.arange(t))[None].detach())
    h = rules.layer_norm(h, e.LayerNorm)
    mask = padding_mask(attention_mask, t)
    n = m.config.num_attention_heads
    for layer in m.encoder.layer:
        a = layer.attention.self
        q, k, v = (heads(rules.module(h, lin), n) for lin in (a.query, a.key, a.value))
        context = merge(rules.attention(q, k, v, mask, 1 / math.sqrt(q.shape[-1])))
        h = rules.layer_norm(rules.add(rules.module(context, layer.attention.output.dense), h),
                             layer.attention.output.LayerNorm)
        inner = rules.activation(F.gelu, rules.module(h, layer.intermediate.dense))
        h = rules.layer_norm(rules.add(rules.module(inner, layer.output.dense), h), layer.output.LayerNorm)
    pooled = rules.activation(torch.tanh, rules.module(h[:, 0], m.pooler.dense))
    return rules.module(pooled, model.classifier)


def vit_hf(model, rules: Rules, x):
    """``ViTForImageClassification`` on pixels ``x``."""
    m = model.vit
    e = m.embeddings
    conv = e.patch_embeddings.projection
    patches = lr.epsilon_lrp(conv, EPS, x).flatten(2).transpose(1, 2)
    h = torch.cat([e.cls_token.expand(len(x), -1, -1).detach(), patches], dim=1)
    h = rules.add(h, e.position_embeddings.detach())
    mask = torch.zeros(1, 1, 1, h.shape[1], dtype=torch.float64)
    n = m.config.num_attention_heads
    for layer in m.encoder.layer:
        a = layer.attention.attention
        y = rules.layer_norm(h, layer.layernorm_before)
        q, k, v = (heads(rules.module(y, lin), n) for lin in (a.query, a.key, a.value))
        context = merge(rules.attention(q, k, v, mask, 1 / math.sqrt(q.shape[-1])))
        h = rules.add(rules.module(context, layer.attention.output.dense), h)
        y = rules.layer_norm(h, layer.layernorm_after)
        inner = rules.activation(F.gelu, rules.module(y, layer.intermediate.dense))
        h = rules.add(rules.module(inner, layer.output.dense), h)
    h = rules.layer_norm(h, m.layernorm)
    return rules.module(h[:, 0], model.classifier)


def vit_tv(model, rules: Rules, x):
    """torchvision's ``VisionTransformer`` on pixels ``x`` (one fused in-projection per attention)."""
    n_batch = len(x)
    patches = lr.epsilon_lrp(model.conv_proj, EPS, x)
    h = patches.reshape(n_batch, model.hidden_dim, -1).permute(0, 2, 1)
    h = torch.cat([model.class_token.expand(n_batch, -1, -1).detach(), h], dim=1)
    h = rules.add(h, model.encoder.pos_embedding.detach())
    mask = torch.zeros(1, 1, 1, h.shape[1], dtype=torch.float64)
    for layer in model.encoder.layers:
        attention = layer.self_attention
        n = attention.num_heads
        y = rules.layer_norm(h, layer.ln_1)
        q, k, v = (heads(part, n) for part in
                   rules.linear(y, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1))
        context = merge(rules.attention(q, k, v, mask, 1 / math.sqrt(q.shape[-1])))
        h = rules.add(rules.linear(context, attention.out_proj.weight, attention.out_proj.bias), h)
        y = rules.layer_norm(h, layer.ln_2)
        inner = rules.activation(F.gelu, rules.module(y, layer.mlp[0]))
        h = rules.add(rules.module(inner, layer.mlp[3]), h)
    h = rules.layer_norm(h, model.encoder.ln)
    return rules.module(h[:, 0], model.heads.head)


def gpt2(model, rules: Rules, x, attention_mask):
    """``GPT2LMHeadModel`` on token embeddings ``x``; Conv1D layers compute ``x W + b``."""
    m = model.transformer
    t = x.shape[1]
    h = rules.add(x, m.wpe(torch.arange(t))[None].detach())
    mask = causal_mask(attention_mask, t)
    n = m.config.n_head

    def conv1d(y, layer):
        return rules.linear(y, layer.weight.t(), layer.bias)

    for block in m.h:
        y = rules.layer_norm(h, block.ln_1)
        q, k, v = (heads(part, n) for part in conv1d(y, block.attn.c_attn).chunk(3, dim=-1))
        context = merge(rules.attention(q, k, v, mask, 1 / math.sqrt(q.shape[-1])))
        h = rules.add(h, conv1d(context, block.attn.c_proj))
        y = rules.layer_norm(h, block.ln_2)
        inner = rules.activation(block.mlp.act, conv1d(y, block.mlp.c_fc))
        h = rules.add(h, conv1d(inner, block.mlp.c_proj))
    h = rules.layer_norm(h, m.ln_f)
    return rules.linear(h, model.lm_head.weight)


def llama(model, rules: Rules, x, attention_mask):
    """``LlamaForCausalLM`` on token embeddings ``x`` (``lxt.explicit.models.llama``)."""
    m = model.model
    t = x.shape[1]
    config = m.config
    n, n_kv = config.num_attention_heads, config.num_key_value_heads
    mask = causal_mask(attention_mask, t)
    cos, sin = (c.detach()[:, None] for c in m.rotary_emb(x, torch.arange(t)[None]))

    def norm(y, layer):
        return lf.rms_norm_identity(y, layer.weight, layer.variance_epsilon)

    def rotate(y):
        half = y.shape[-1] // 2
        rotated = torch.cat([lf.mul2(y[..., half:], -1), y[..., :half]], dim=-1)
        return rules.add(lf.mul2(y, cos), lf.mul2(rotated, sin))

    def uniform_epsilon(probs, v):
        return lr.uniform_epsilon_lrp_fn.apply(torch.matmul, 1e-6, probs, v)

    h = x
    for layer in m.layers:
        a = layer.self_attn
        y = norm(h, layer.input_layernorm)
        q = rotate(heads(rules.module(y, a.q_proj), n))
        k = rotate(heads(rules.module(y, a.k_proj), n_kv)).repeat_interleave(n // n_kv, dim=1)
        v = heads(rules.module(y, a.v_proj), n_kv).repeat_interleave(n // n_kv, dim=1)
        context = merge(rules.attention(q, k, v, mask, a.scaling, value_rule=uniform_epsilon))
        h = rules.add(h, rules.module(context, a.o_proj))
        y = norm(h, layer.post_attention_layernorm)
        mlp = layer.mlp
        gated = rules.gate(mlp.act_fn, rules.module(y, mlp.gate_proj), rules.module(y, mlp.up_proj))
        h = rules.add(h, rules.module(gated, mlp.down_proj))
    h = norm(h, m.norm)
    return rules.module(h, model.lm_head)


def sdpa_block(model, rules: Rules, x):
    """``transformer_models.SDPABlock``: a fused in-projection, SDPA with a boolean or causal mask, a classifier."""
    n, t = x.shape[:2]
    q, k, v = (heads(part, model.heads) for part in rules.module(x, model.qkv).chunk(3, dim=-1))
    if model.mode == "bool":
        mask = additive_mask(model.allowed[None, None])
    else:
        mask = additive_mask(torch.ones(t, t, dtype=torch.bool).tril()[None, None])
    context = merge(rules.attention(q, k, v, mask, 1 / math.sqrt(q.shape[-1])))
    return rules.module(context.reshape(n, -1), model.out)


# ---------------------------------------------------------------- relevance

def relevance(name: str, model, inputs: dict[str, np.ndarray], cp: bool, target=None):
    """``(logits, relevance, explained class)`` by LXT's rules for test model ``name`` (a key of
    :data:`transformer_models.MODELS`) in float64; for decoders the explained position is the last one. The
    relevance is shaped like the explained input (token models: ``[batch, tokens]``)."""
    net = copy.deepcopy(model.module.model).double().eval()
    rules = Rules(cp)
    feeds = {k: torch.from_numpy(v) for k, v in inputs.items()}
    tokens = "input_ids" in feeds
    if tokens:
        table = net.get_input_embeddings() if hasattr(net, "get_input_embeddings") else None
        x = table(feeds["input_ids"]).detach()
    else:
        x = next(v for k, v in feeds.items() if k != "attention_mask").double()
    x.requires_grad_(True)
    forward = {"bert": bert, "bert-embeds": bert, "vit-hf": vit_hf, "vit-tv": vit_tv, "gpt2": gpt2,
               "llama": llama, "sdpa-bool": sdpa_block, "sdpa-causal": sdpa_block}[name]
    args = (feeds["attention_mask"],) if "attention_mask" in feeds else ()
    logits = forward(net, rules, x, *args)
    explained = logits[:, -1] if logits.ndim == 3 else logits
    classes = explained.argmax(-1) if target is None else torch.as_tensor(target)
    one_hot = F.one_hot(classes, explained.shape[-1]).to(explained.dtype)
    explained.backward(one_hot * explained.detach())
    r = x.grad.sum(-1) if tokens else x.grad
    return logits.detach().numpy(), r.numpy(), classes.numpy()


def relative_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample ``|a - b| / |b|`` (L2 over everything but the batch axis)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)
