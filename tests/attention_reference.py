"""Float64 numpy re-implementations of the AttnLRP / CP-LRP rules, written from the equations (AttnLRP Eq. 8,
Prop. 3.1-3.4; LXT's explicit functions), for the hand-built graphs of ``test_attention_rules.py``.

Every function takes the forward values and the relevance ``R`` of the output and returns the relevance of the
inputs; ``eps`` is LXT's stabilizer ``z + eps`` (a denominator that is exactly 0 becomes ``eps``).
"""

from __future__ import annotations

import numpy as np

LXT_EPS = 1e-8


def divide(r, z, eps=LXT_EPS):
    denominator = z + eps
    return r / np.where(denominator == 0, eps, denominator)


def linear(x, w, b, r, eps=LXT_EPS):
    """Eq. 8 for ``z = x w + b`` (``w``: [in, out]): ``x * ((R / (z + eps)) w^T)``."""
    z = x @ w + (0 if b is None else b)
    return x * (divide(r, z, eps) @ w.T)


def join(operands, r, eps=LXT_EPS):
    """``z = sum u_k``: ``R_k = u_k * R / (z + eps)`` (LXT's ``add2``; an offset is a join whose other operands keep
    their share)."""
    s = divide(r, sum(operands), eps)
    return [u * s for u in operands]


def softmax(x, s, r, axis=-1):
    """Prop. 3.1: ``x * (R - s * sum R)``, ``-inf`` entries of ``x`` as 0 (``lxt.explicit.functional.softmax``)."""
    x = np.where(np.isneginf(x), 0.0, x)
    return x * (r - s * r.sum(axis, keepdims=True))


def matmul(a, b, r, live=(0, 1), eps=LXT_EPS):
    """Prop. 3.3 for ``c = a b``: ``N = R / (n c + eps)``, ``R_a = a * (N b^T)``, ``R_b = b * (a^T N)`` over the
    operands in ``live`` (``n`` of them); the others get None."""
    n = len(live)
    s = divide(r, n * (a @ b), eps)
    return (a * (s @ np.swapaxes(b, -1, -2)) if 0 in live else None,
            b * (np.swapaxes(a, -1, -2) @ s) if 1 in live else None)


def layer_norm(x, w, b, r, ln_eps, eps=1e-6):
    """LXT's LayerNorm: ``x * (g - mean g)``, ``g = w * R / (sigma (y + eps))``, ``sigma`` a constant."""
    mean = x.mean(-1, keepdims=True)
    sigma = np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + ln_eps)
    y = (x - mean) / sigma * w + b
    g = w * divide(r, y, eps) / sigma
    return x * (g - g.mean(-1, keepdims=True))


def forward_softmax(x, axis=-1):
    """Softmax with rows of ``-inf`` as NaN, as onnxruntime computes them."""
    with np.errstate(invalid="ignore"):
        e = np.exp(x - x.max(axis, keepdims=True))
        return e / e.sum(axis, keepdims=True)
