"""Independent reference for semiring LRP (Groudiev, "Extending Layer-wise Relevance Propagation using Semiring
Annotations"), written from the paper's equations with explicit loops over the pairs (j, k).

For every layer the reference walks the output neurons k and, for each, the input neurons j wired to it (the
unrolled matrices of ``reference.py``, built by loops over neurons: padding and other groups are not wired):

    c_jk = a_j w_jk,  z_k = sum_j c_jk + b_k,  d_jk = c_jk / z_k (0 where z_k = 0)        (LRP-0 coefficients)
    R_j  = plus_k Theta(d)_jk times R_k                                                    (Eq. K-LRP)

with ``R`` = one at the explained class and zero elsewhere (Eq. 2.1.2). Annotations: threshold (Eq. 2.2.1/2.2.2),
identity, abs-normalized (Eq. 2.2.3, ``|c_jk| / (max(|c_j'k|, |b_k|) + 1e-9)``) and their logarithms (``log 0`` =
zero). Joins ``z = sum_i u_i``: ``d_ik = u_ik / z_k`` element-wise. Average pools are linear layers with weights
``1 / divisor``; max pools send each window's relevance to its first arg-max. Activations pass relevance through,
and a tensor read by several branches gets the plus of what they send back.

Arithmetic is exact where the semiring is: counting and boolean relevance are Python integers; the others float64.
"""

from __future__ import annotations

import math

import numpy as np
from netspec import (
    AvgPool,
    Concat,
    Conv,
    Dense,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool,
    Relu,
    Residual,
    Sum,
    sublists,
)
from reference import _Net, fold_batchnorm

VITERBI_EPS = 1e-9


class Semiring:
    """``(K, plus, times, zero, one)`` with an annotation, as plain Python operations."""

    def __init__(self, plus, times, zero, one, annotation):
        self.plus_name, self.times_name, self.annotation = plus, times, annotation
        exact = annotation == "threshold" and plus in ("sum", "or")
        self.zero, self.one = (int(zero), int(one)) if exact else (float(zero), float(one))

    def plus(self, a, b):
        if self.plus_name == "sum":
            return a + b
        if self.plus_name == "or":
            return 1 if (a or b) else 0
        return max(a, b) if self.plus_name == "max" else min(a, b)

    def times(self, a, b):
        if self.times_name == "mul":
            return a * b
        if self.times_name == "and":
            return 1 if (a and b) else 0
        s = a + b  # max-plus / min-plus: the finite zero stays absorbing
        return max(s, self.zero) if self.plus_name == "max" else min(s, self.zero)

    def clamp(self, v):
        if self.plus_name == "max":
            return max(v, self.zero)
        if self.plus_name == "min":
            return min(v, self.zero)
        return v

    def log(self, v):
        return self.clamp(math.log(v)) if v > 0 else self.zero

    def annotate(self, c, z, peak, theta):
        """Theta of one pair: contribution ``c``, ``z_k``, ``peak = max(|c_j'k|, |b_k|)``."""
        d = c / z if z != 0 else 0.0
        kind = self.annotation.removeprefix("log-")
        if kind == "threshold":
            return self.one if d >= theta else self.zero
        if kind == "identity":
            return self.log(d) if self.annotation.startswith("log-") else self.clamp(d)
        value = abs(c) / (peak + VITERBI_EPS)
        return self.log(value) if self.annotation.startswith("log-") else value


BUILTIN = {
    "boolean": ("or", "and", 0, 1, "threshold"),
    "counting": ("sum", "mul", 0, 1, "threshold"),
    "viterbi": ("max", "mul", 0, 1, "abs-normalized"),
    "real": ("sum", "mul", 0, 1, "identity"),
}


class _KLRP:
    def __init__(self, semiring: Semiring, theta_linear, theta_other):
        self.s, self.net = semiring, _Net()
        self.theta_linear, self.theta_other = theta_linear, theta_other
        self.linear_index = {}

    def theta_of(self, layer):
        if isinstance(layer, (Dense, Conv)):
            t = self.theta_linear
            return t if not isinstance(t, list) else t[self.linear_index[id(layer)]]
        return self.theta_other

    def new(self, shape):
        out = np.empty(shape, dtype=object)
        out.fill(self.s.zero)
        return out

    def pairs_step(self, layer, a, R, has_bias):
        """Eq. K-LRP over the wired pairs of a Dense/Conv/AvgPool/GlobalAvgPool layer, one sample."""
        M, bias, C = self.net.matrix(layer, a.shape)
        af, Rf = a.reshape(-1), R.reshape(-1)
        out = self.new(af.shape)
        theta = self.theta_of(layer)
        for k in range(M.shape[0]):
            js = np.nonzero(C[k])[0]
            contributions = [M[k, j] * af[j] for j in js]
            b = bias[k] if has_bias else 0.0
            z = sum(contributions) + b
            peak = max([abs(c) for c in contributions] + [abs(b)])
            for j, c in zip(js, contributions, strict=True):
                out[j] = self.s.plus(out[j], self.s.times(self.s.annotate(c, z, peak, theta), Rf[k]))
        return out.reshape(a.shape)

    def max_step(self, layer, a, R):
        _, windows = self.net.windows(layer, a.shape)
        af, Rf = a.reshape(-1), R.reshape(-1)
        out = self.new(af.shape)
        for k, window in enumerate(windows):
            real = [i for i in window if i >= 0]
            winner = real[int(np.argmax(af[real]))]
            out[winner] = self.s.plus(out[winner], self.s.times(self.s.one, Rf[k]))
        return out.reshape(a.shape)

    def join_step(self, outputs, R, theta):
        """Shares of a join ``z = sum_i u_i``: ``Theta(u_i / z) times R`` per element."""
        shares = [self.new(R.shape) for _ in outputs]
        for e in np.ndindex(*R.shape):
            cs = [u[e] for u in outputs]
            z, peak = sum(cs), max(abs(c) for c in cs)
            for share, c in zip(shares, cs, strict=True):
                share[e] = self.s.times(self.s.annotate(c, z, peak, theta), R[e])
        return shares

    def combine(self, parts):
        out = parts[0].copy()
        for p in parts[1:]:
            for e in np.ndindex(*out.shape):
                out[e] = self.s.plus(out[e], p[e])
        return out

    def seq(self, layers, a, R):
        """Relevance at the input ``a`` of ``layers`` (one sample, no batch axis) from the relevance ``R`` of their
        output."""
        acts = [a]
        for layer in layers[:-1]:
            acts.append(self.forward(layer, acts[-1]))
        for layer, x in zip(reversed(layers), reversed(acts), strict=True):
            R = self.step(layer, x, R)
        return R

    def forward(self, layer, a):
        return self.net.layer(layer, a[None])[0]

    def step(self, layer, a, R):
        if isinstance(layer, (Dense, Conv)):
            return self.pairs_step(layer, a, R, True)
        if isinstance(layer, (AvgPool, GlobalAvgPool)):
            return self.pairs_step(layer, a, R, False)
        if isinstance(layer, (MaxPool, GlobalMaxPool)):
            return self.max_step(layer, a, R)
        if isinstance(layer, Relu):
            return R
        if isinstance(layer, Flatten):
            return R.reshape(a.shape)
        if isinstance(layer, (Residual, Sum)):
            branches = sublists(layer)
            outputs = [self.net.seq(branch, a[None])[0] for branch in branches]
            shares = self.join_step(outputs, R, self.theta_other)
            return self.combine([self.seq(branch, a, share) if branch else share
                                 for branch, share in zip(branches, shares, strict=True)])
        if isinstance(layer, Concat):
            parts, offset = [], 0
            for branch in layer.branches:
                size = self.net.seq(branch, a[None])[0].shape[0]
                piece = R[offset:offset + size]
                parts.append(self.seq(branch, a, piece) if branch else piece)
                offset += size
            return self.combine(parts)
        raise TypeError(f"unknown layer {type(layer).__name__}")


def klrp(layers, x, semiring, theta=1e-9, theta_other=None, target=None):
    """K-relevance at the input, ``[B, *x.shape[1:]]`` (dtype object: Python ints for counting and boolean).

    ``semiring``: a built-in name or a (plus, times, zero, one, annotation) tuple. ``theta``: the threshold of
    every Dense/Conv layer, or a list with one per Dense/Conv layer in the order of ``netspec.iter_linear``;
    ``theta_other``: the threshold of joins and average pools (default: ``theta`` when it is a number)."""
    from netspec import iter_linear

    spec = BUILTIN[semiring] if isinstance(semiring, str) else semiring
    s = Semiring(*spec)
    folded = fold_batchnorm(layers)
    run = _KLRP(s, theta, theta if theta_other is None and not isinstance(theta, list) else theta_other)
    run.linear_index = {id(layer): i for i, layer in enumerate(iter_linear(folded))}
    x = np.asarray(x, dtype=np.float64)
    logits = run.net.seq(folded, x).reshape(len(x), -1)
    targets = np.argmax(logits, axis=1) if target is None else np.broadcast_to(np.asarray(target), len(x))
    out = []
    for sample, t in zip(x, targets, strict=True):
        R = run.new(logits.shape[1:])
        R[int(t)] = s.one
        out.append(run.seq(folded, sample, R.reshape(run.net.seq(folded, sample[None])[0].shape)))
    return np.stack(out)
