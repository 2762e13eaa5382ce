"""LRP rules for linear layers, one class per rule, following Zennit 0.5's conventions.

Notation: a linear layer computes ``z = W x + b``; ``R`` is the relevance of ``z``; ``W^T g`` is the transposed
product (:meth:`Linear.transpose`). ``x+ = max(x, 0)``, ``x- = min(x, 0)``, likewise ``W+``, ``W-``, ``b+``,
``b-``. ``stab(z) = z + eps * sign(z)`` with ``sign(0) = +1``. Weight transforms are expressions over the model's
initializers (:mod:`onnxlrp.weights`) that onnxruntime folds when the session is created; bias transforms are
numpy, evaluated at compile time (one value per output). The stabilized quotients and relevance products the rules
are built from are in :mod:`onnxlrp.quotients`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .builder import GraphBuilder
from .errors import OnnxlrpError
from .layers import Linear
from .quotients import (
    SATURATE,
    cofactor_quotient,
    divide_behind_relu,
    divide_relevance,
    divide_signed,
    mul,
    own_output,
    product,
    quotient,
    safe_divide,
    within,
)
from .weights import Weight, concat, negative_part, ones_like, positive_part

STABILIZER = 1e-6


def pos(a: Weight | np.ndarray) -> Weight | np.ndarray:
    """``a+ = max(a, 0)`` of a weight (an expression) or a bias (an array)."""
    return positive_part(a) if isinstance(a, Weight) else np.maximum(a, 0)


def neg(a: Weight | np.ndarray) -> Weight | np.ndarray:
    """``a- = min(a, 0)`` of a weight (an expression) or a bias (an array)."""
    return negative_part(a) if isinstance(a, Weight) else np.minimum(a, 0)


def stabilized_bias(layer: Linear, bias: np.ndarray | None, eps: float) -> np.ndarray:
    """``bias + eps`` per output: a one-sided stabilizer (``z+ >= 0`` gets ``+eps``, ``z- <= 0`` gets ``-eps``)
    folded into the bias at compile time, so that the layer's output is already the denominator."""
    return np.full(outputs(layer), eps) + (0.0 if bias is None else bias)


def outputs(layer: Linear) -> int:
    return layer.weight.shape[0] if layer.kind == "conv" else layer.weight.shape[1]


def stack(layer: Linear, first: Weight, second: Weight) -> Weight:
    """Two weights of one layer stacked along the output axis (``[first; second]``)."""
    return concat([first, second], axis=0 if layer.kind == "conv" else 1)


def at_least(b: GraphBuilder, z: str, eps: float) -> str:
    """``max(z, eps)`` as a Clip, which onnxruntime fuses into the Conv or Gemm that produces ``z``."""
    return b.op("Clip", [z, b.const(eps), b.const(float(np.finfo(np.float32).max), "float_max")], "stab")


def split_halves(b: GraphBuilder, layer: Linear, z: str) -> str:
    """``[N, 2C, ...]`` (a stacked product) as ``[N, 2, C, ...]``."""
    spatial = list(layer.window.out_spatial) if layer.kind == "conv" else []
    return b.op("Reshape", [z, b.const([0, 2, outputs(layer), *spatial], "shape", np.int64)], "z_halves")


def merge_halves(b: GraphBuilder, layer: Linear, g: str) -> str:
    spatial = list(layer.window.out_spatial) if layer.kind == "conv" else []
    return b.op("Reshape", [g, b.const([0, 2 * outputs(layer), *spatial], "shape", np.int64)], "s")


def unsqueeze_halves(b: GraphBuilder, t: str) -> str:
    """``[N, C, ...]`` as ``[N, 1, C, ...]``, to broadcast against both halves."""
    return b.op("Unsqueeze", [t, b.const([1], "axes", np.int64)], "halves")


def split_sign(b: GraphBuilder, x: str, nonneg: bool = False) -> tuple[str, str | None]:
    """``(x+, x-)``; ``(x, None)`` when ``x`` is known to be non-negative (``x- = 0``)."""
    if nonneg:
        return x, None
    xp = b.op("Relu", [x], "x_pos")
    return xp, b.op("Sub", [x, xp], "x_neg")


def add(b: GraphBuilder, *terms: str) -> str:
    return terms[0] if len(terms) == 1 else b.op("Sum", list(terms), "sum")


@dataclass(frozen=True)
class Rule:
    """A relevance rule: for linear layers ``relevance(layer, R) -> R_in`` emitted into the graph; rules for other
    node kinds (:mod:`onnxlrp.node_rules`) have a method per kind instead.

    ``kinds``: the node kinds a composite may give the rule to. ``multiplies_by_input``: the relevance it sends back
    is the layer input times a cofactor, so it vanishes wherever the input does (the engine then lets a Relu's output
    stand in for a stabilized denominator upstream, :meth:`RelevancePass.relu_behind`)."""

    name = "rule"
    summary = ""
    kinds = ("linear",)
    multiplies_by_input = False
    preserves_zero = False  # the relevance it sends back vanishes where the input does, if its own vanishes there

    def relevance(self, b: GraphBuilder, layer: Linear, r: str) -> str:
        raise NotImplementedError

    def linear(self, ctx, layer: Linear, r: str) -> str:
        """What the sweep calls for a linear layer; rules that need the pass itself (``ctx``: shapes, the algebra,
        the opset) override it, the others implement :meth:`relevance`."""
        return self.relevance(ctx.b, layer, r)

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.__dict__.items())
        return f"{self.name}({params})" if params else self.name


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon: ``R_in = x * W^T (R / stab(z))`` with ``z = W x + b``, the forward pre-activation reused."""

    epsilon: float = 1e-6
    multiplies_by_input = True
    name = "epsilon"
    summary = "x * W^T (R / (z + eps sign z)); default eps 1e-6"

    def relevance(self, b, layer, r):
        if layer.relu_out is not None and self.epsilon > 0:
            s = divide_behind_relu(b, r, layer.relu_out, self.epsilon)
        else:
            s = divide_relevance(b, r, layer.z, self.epsilon)
        return product(b, layer.x, layer.transpose(b, s, layer.weight, "W"))


@dataclass(frozen=True)
class LRP0(Epsilon):
    """LRP-0: LRP-epsilon with ``epsilon = 0`` (quotients with ``z == 0`` are set to 0)."""

    epsilon: float = 0.0
    name = "lrp0"
    summary = "x * W^T (R / z)"

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class ZPlus(Rule):
    """LRP-z+: ``z = W+ x+ + b+ + W- x-``, ``R_in = x+ * W+^T g + x- * W-^T g`` with ``g = R / stab(z)``."""

    stabilizer: float = STABILIZER
    multiplies_by_input = True
    name = "zplus"
    summary = "positive contributions only (alpha=1, beta=0)"

    def relevance(self, b, layer, r):
        w, bias = layer.weight, layer.bias
        xp, xn = split_sign(b, layer.x, layer.x_nonneg)
        z = layer.forward(b, xp, pos(w), stabilized_bias(layer, None if bias is None else pos(bias),
                                                          self.stabilizer), "Wpos")
        if xn is not None:
            z = add(b, z, layer.forward(b, xn, neg(w), None, "Wneg"))
        # z = W+ x+ + W- x- + b+ + eps >= eps (the stabilizer rides in the bias); z - (W x + b) = -W- x+ - W+ x- + b+
        # - b + eps > 0, so a ReLU output of this layer is below z
        own = own_output(b, layer, r)
        g = cofactor_quotient(b, *own, z) if own else quotient(b, r, z, self.stabilizer)
        out = product(b, xp, layer.transpose(b, g, pos(w), "Wpos"))
        return out if xn is None else add(b, out, product(b, xn, layer.transpose(b, g, neg(w), "Wneg"), False))


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta: activating part ``za = W+ x+ + b+ + W- x-`` weighted by alpha, inhibiting part
    ``zb = W- x+ + b- + W+ x-`` weighted by beta: ``R_in = alpha * Ra - beta * Rb`` (alpha - beta = 1)."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = STABILIZER
    multiplies_by_input = True
    name = "alpha-beta"
    summary = "alpha * positive - beta * negative parts; default 2, 1"

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-9:
            raise OnnxlrpError(f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1 (got {self.alpha}, "
                               f"{self.beta})")

    def relevance(self, b, layer, r):
        if layer.x_nonneg and layer.kind == "conv" and layer.group == 1 and self.alpha > 0 and self.beta > 0:
            return self.stacked(b, layer, r)
        w, bias = layer.weight, layer.bias
        xp, xn = split_sign(b, layer.x, layer.x_nonneg)
        parts, parts_n = [], []
        for coef, w_x_pos, w_x_neg, b_mod, tag in (
            (self.alpha, pos(w), neg(w), None if bias is None else pos(bias), ("Wpos", "Wneg")),
            (-self.beta, neg(w), pos(w), None if bias is None else neg(bias), ("Wneg", "Wpos")),
        ):
            if coef == 0:
                continue
            # activating part >= 0, inhibiting part <= 0: the stabilizer +-eps rides in the bias
            eps = self.stabilizer if coef > 0 else -self.stabilizer
            z = layer.forward(b, xp, w_x_pos, stabilized_bias(layer, b_mod, eps),
                              tag[0] + ("_ba" if coef > 0 else "_bb"))
            if xn is not None:
                z = add(b, z, layer.forward(b, xn, w_x_neg, None, tag[1]))
            g = quotient(b, r, z, self.stabilizer)
            # coef * x * W^T g = x * (coef W)^T g: the coefficient goes into the transposed weights at compile time,
            # and each of x+, x- multiplies the sum of its two parts once
            part = "_alpha" if coef > 0 else "_beta"
            parts.append(layer.transpose(b, g, coef * w_x_pos, tag[0] + part))
            if xn is not None:
                parts_n.append(layer.transpose(b, g, coef * w_x_neg, tag[1] + part))
        out = product(b, xp, add(b, *parts))
        return out if xn is None else add(b, out, product(b, xn, add(b, *parts_n), False))

    def stacked(self, b, layer, r):
        """``x >= 0``: both parts in one convolution with the output channels ``[W+; W-]`` (bias ``[b+; b-]``),
        one stabilizer ``+eps`` / ``-eps`` per half, one quotient against ``R`` broadcast over the halves, and one
        transposed convolution with ``[alpha W+; -beta W-]`` that sums the two parts (the stabilizers are folded
        into the bias):
        ``R_in = x * (alpha W+^T ga - beta W-^T gb)``."""
        w, bias = layer.weight, layer.bias
        # the stabilizers +eps / -eps ride in the bias: the convolution's output is already the denominator
        stab_bias = np.concatenate([stabilized_bias(layer, None if bias is None else pos(bias), self.stabilizer),
                                    stabilized_bias(layer, None if bias is None else neg(bias), -self.stabilizer)])
        z = split_halves(b, layer, layer.forward(b, layer.x, stack(layer, pos(w), neg(w)), stab_bias, "Wpm"))
        g = quotient(b, r, z, self.stabilizer, view=lambda t: unsqueeze_halves(b, t))
        return product(b, layer.x, layer.transpose(b, merge_halves(b, layer, g),
                                                   stack(layer, self.alpha * pos(w), -self.beta * neg(w)), "Wpm_ab"))


@dataclass(frozen=True)
class Gamma(Rule):
    """Zennit's generalized LRP-gamma. ``Wp = W + gamma W+``, ``Wn = W + gamma W-`` (biases alike).
    Where ``z > 0``: ``g = R / stab(Wp x+ + bp + Wn x-)``, ``R_in = x+ * Wp^T g + x- * Wn^T g``;
    where ``z < 0``: ``g = R / stab(Wn x+ + bn + Wp x-)``, ``R_in = x+ * Wn^T g + x- * Wp^T g``."""

    gamma: float = 0.25
    stabilizer: float = STABILIZER
    multiplies_by_input = True
    name = "gamma"
    summary = "W + gamma W+ favours positive evidence; default 0.25"

    def relevance(self, b, layer, r):
        w, bias, gm, eps = layer.weight, layer.bias, self.gamma, self.stabilizer
        wp, wn = w + gm * pos(w), w + gm * neg(w)
        bp = np.zeros(outputs(layer)) if bias is None else bias + gm * pos(bias)
        bn = np.zeros(outputs(layer)) if bias is None else bias + gm * neg(bias)
        if layer.relu_out is None and layer.x_nonneg and layer.group == 1:
            return self.stacked(b, layer, r, stack(layer, wp, -wn), np.concatenate([bp + eps, eps - bn]))
        xp, xn = split_sign(b, layer.x, layer.x_nonneg)
        zero = b.const(0.0, "zero")
        parts = []
        relu = layer.relu_out is not None
        branches = ((wp, wn, bp, "Greater", 1.0, ("Wp", "Wn", "bp")), (wn, wp, bn, "Less", -1.0, ("Wn", "Wp", "bn")))
        if relu:
            branches = branches[:1]  # R is 0 wherever z <= 0: the z < 0 branch is 0, the z > 0 gate is R's own
        for w_x_pos, w_x_neg, b_mod, gate_op, sign, tags in branches:
            # z_p = z + gamma (W+ x+ + b+ + W- x-) >= z > 0 where the gate is open (z_n <= z < 0 likewise), so the
            # stabilizer's sign is the branch's; where the gate is closed, Where discards the quotient. Behind a
            # Relu, R is its own gate: the denominator is max(z_p + eps, eps), which is z_p + eps where z > 0 and
            # non-zero elsewhere, one Clip that onnxruntime fuses into the convolution.
            z = layer.forward(b, xp, w_x_pos, b_mod + eps if relu else b_mod, tags[0] + "_" + tags[2])
            if xn is not None:
                z = add(b, z, layer.forward(b, xn, w_x_neg, None, tags[1]))
            if relu:  # z_p = z + gamma (W+ x+ + b+ + W- x-) >= z: the ReLU output of z is below it
                own = own_output(b, layer, r)
                denominator = at_least(b, z, eps)
                g = cofactor_quotient(b, *own, denominator) if own else quotient(b, r, denominator, eps)
            else:
                g = b.op("Where", [b.op(gate_op, [layer.z, zero], "gate"),
                                   divide_signed(b, r, z, self.stabilizer, sign), zero], "g")
            parts.append(product(b, xp, layer.transpose(b, g, w_x_pos, tags[0])))
            if xn is not None:
                parts.append(product(b, xn, layer.transpose(b, g, w_x_neg, tags[1]), False))
        return add(b, *parts)

    def stacked(self, b, layer, r, w_stack, b_stack):
        """``x >= 0``: both branches in one product with the outputs ``[Wp; -Wn]`` and biases ``[bp + eps;
        eps - bn]``, so each half is ``+-z_branch + eps`` and ``max(., eps)`` is the stabilized magnitude where the
        branch's gate is open (``z_p > 0`` where ``z > 0``, ``-z_n > 0`` where ``z < 0``) and non-zero elsewhere.
        The gates ``[z > 0; z < 0]`` are ``Clip([z; -z] * 2^126, 0, 1)``, exactly 0 or 1 for every normal ``z``;
        the transposed product with the same stacked weights sums ``Wp^T g_p + Wn^T g_n`` (the minus signs
        cancel). No Where, one convolution and one transposed convolution instead of two each."""
        eps = self.stabilizer
        denominator = split_halves(b, layer, at_least(b, layer.forward(b, layer.x, w_stack, b_stack, "Wpn"), eps))
        rank = 2 if layer.kind == "dense" else 2 + layer.window.rank  # of z: [N, C] or [N, C, *spatial]
        signs = np.array([SATURATE / 2, -SATURATE / 2]).reshape(1, 2, *[1] * (rank - 1))
        gates = b.op("Clip", [b.op("Mul", [unsqueeze_halves(b, layer.z), b.const(signs, "gate_scale")], "gate"),
                              b.const(0.0, "zero"), b.const(1.0, "one")], "gate")
        ratio = quotient(b, r, denominator, eps, view=lambda t: unsqueeze_halves(b, t))
        g = merge_halves(b, layer, within(b, b.op("Mul", [ratio, gates], "g"), ratio))
        return product(b, layer.x, layer.transpose(b, g, w_stack, "Wpn"))


@dataclass(frozen=True)
class Flat(Rule):
    """LRP-flat: all weights 1, bias 0, input ones: ``R_in = W1^T (R / stab(W1 1))``."""

    stabilizer: float = STABILIZER
    name = "flat"
    summary = "relevance spread uniformly over the receptive field"

    def relevance(self, b, layer, r):
        ones_w = ones_like(layer.weight)
        ones_x = b.op("ConstantOfShape", [b.op("Shape", [layer.x])], "ones",
                      value=_float_tensor(1.0))
        z = layer.forward(b, ones_x, ones_w, None, "W1")
        return layer.transpose(b, safe_divide(b, r, z, self.stabilizer), ones_w, "W1")


@dataclass(frozen=True)
class WSquare(Rule):
    """LRP-w^2: ``R_in = (W*W)^T (R / stab((W*W) 1 + b*b))`` (Zennit squares the bias too)."""

    stabilizer: float = STABILIZER
    name = "wsquare"
    summary = "relevance spread by squared weights"

    def relevance(self, b, layer, r):
        w2 = layer.weight ** 2
        ones_x = b.op("ConstantOfShape", [b.op("Shape", [layer.x])], "ones", value=_float_tensor(1.0))
        z = layer.forward(b, ones_x, w2, None if layer.bias is None else layer.bias ** 2, "W2")
        return layer.transpose(b, safe_divide(b, r, z, self.stabilizer), w2, "W2")


@dataclass(frozen=True)
class ZBox(Rule):
    """LRP-z^B for inputs bounded by [low, high]: ``z = W x + b - (W+ l + b+) - (W- h + b-)``,
    ``R_in = x * W^T g - l * W+^T g - h * W-^T g`` with ``g = R / stab(z)``. The biases cancel exactly
    (``b - b+ - b- = 0``), so they are left out of ``z``."""

    low: float = 0.0
    high: float = 1.0
    stabilizer: float = STABILIZER
    name = "zbox"
    summary = "bounded-input rule for the first layer (--low/--high, default 0/1)"

    def relevance(self, b, layer, r):
        w = layer.weight
        shape = b.op("Shape", [layer.x])
        low = b.op("ConstantOfShape", [shape], "low", value=_float_tensor(self.low))
        high = b.op("ConstantOfShape", [shape], "high", value=_float_tensor(self.high))
        z = layer.forward(b, layer.x, w, None, "W")
        z = b.op("Sub", [z, layer.forward(b, low, pos(w), None, "Wpos")], "z")
        z = b.op("Sub", [z, layer.forward(b, high, neg(w), None, "Wneg")], "z")
        g = safe_divide(b, r, z, self.stabilizer)
        out = b.op("Sub", [product(b, layer.x, layer.transpose(b, g, w, "W"), False),
                           product(b, low, layer.transpose(b, g, pos(w), "Wpos"), False)])
        return b.op("Sub", [out, product(b, high, layer.transpose(b, g, neg(w), "Wneg"), False)], "R")


@dataclass(frozen=True)
class RLRP(Rule):
    """R-LRP (Nyiri & Gibaru), Eq. 8 (dense) and Eq. 12 (convolution):
    ``z_i = Card(J_i) / N^(l+1) * 1 / M * x_i * (W^T z)_i`` where ``M`` is the fan-in ``N^(l)`` of a dense
    layer (Eq. 8, where Card(J) = N^(l+1)) or the kernel size ``P1*P2`` of a convolution (Eq. 10-12). The
    factor map is a compile-time constant; the bias is not an input neuron and takes no part."""

    multiplies_by_input = True
    name = "rlrp"
    summary = "relative LRP (Nyiri & Gibaru): no hyper-parameters, no division except at joins"

    def relevance(self, b, layer, r, scale: str | None = None):
        """``scale``: a per-sample factor ``[batch]`` (R-LRP's range keeping), applied where it costs least (see
        :func:`scaled_product`)."""
        x_shape = None if layer.x_shape is None else layer.x_shape[1:]  # a dense layer behind a computed Reshape
        out_shape = [layer.weight.shape[0], *layer.window.out_spatial] if layer.kind == "conv" else \
            None if x_shape is None else [*x_shape[:-1], layer.weight.shape[1]]
        return scaled_product(b, layer.x, r, lambda g: layer.transpose(b, g, layer.weight, "W"), rlrp_factor(layer),
                              scale, out_shape, x_shape)


def scaled_product(b: GraphBuilder, x: str, r: str, transpose, factor: np.ndarray | None, scale: str | None,
                   r_shape: list, x_shape: list) -> str:
    """``x * (W^T r) * factor / max(factor) * scale``: R-LRP's step for a linear layer or pool. The per-sample
    ``scale`` (``[batch]``, or None) joins the factor map when that is not uniform (one small ``[batch, 1, *spatial]``
    multiplier instead of a pass over a tensor); otherwise it multiplies the smaller of ``r`` (before the transposed
    product) and ``W^T r`` (after it). Either way the product with ``x`` comes last, so what the scale bounds stays
    bounded (``r_shape``, ``x_shape``: per-sample shapes, None where unknown)."""
    relative = None if factor is None else np.asarray(factor, dtype=np.float64) / np.max(factor)
    if relative is not None and np.all(relative == 1):
        relative = None
    if scale is not None and relative is None and not smaller(x_shape, r_shape):
        r, scale = times_per_sample(b, r, scale, r_shape), None
    c = transpose(r)
    if relative is not None:
        card = b.const(relative, "card_J")
        multiplier = card if scale is None else b.op("Mul", [card, per_sample(b, scale, len(x_shape) + 1)], "card_J")
        c = mul(b, c, multiplier)
    elif scale is not None:
        c = times_per_sample(b, c, scale, x_shape)
    return mul(b, x, c)


def smaller(a: list | None, b: list | None) -> bool:
    """Whether a tensor of per-sample shape ``a`` has fewer elements than one of shape ``b`` (False if unknown)."""
    if a is None or b is None or any(not isinstance(d, int) for d in a + b):
        return False
    return int(np.prod(a)) < int(np.prod(b))


def times_per_sample(b: GraphBuilder, t: str, scale: str, shape: list | None) -> str:
    """``t`` times the ``[batch]`` factor ``scale``, sample by sample; ``shape``: ``t``'s per-sample shape (None when
    its rank is unknown: through a flattened view)."""
    if shape is not None:
        return mul(b, t, per_sample(b, scale, len(shape) + 1))
    flat = b.op("Flatten", [t], "flat", axis=1)
    column = b.op("Unsqueeze", [scale, b.const([1], "axes", np.int64)], "scale")
    return b.op("Reshape", [mul(b, flat, column), b.op("Shape", [t])], "R")


def per_sample(b: GraphBuilder, scale: str, rank: int) -> str:
    """A ``[batch]`` factor as ``[batch, 1, ..., 1]`` of ``rank`` axes."""
    return b.op("Reshape", [scale, b.const([-1] + [1] * (rank - 1), "per_sample", np.int64)], "scale")


def rlrp_factor(layer: Linear) -> np.ndarray:
    """The constant ``Card(J_i) / (N^(l+1) * M)`` of Eq. 8 / Eq. 12, broadcastable against ``x``."""
    if layer.kind == "dense":
        return np.asarray(1.0 / layer.fan_in)  # Eq. 8: Card(J)/N^(l+1) = 1
    wd = layer.window
    cout = layer.weight.shape[0]
    n_out = cout * int(np.prod(wd.out_spatial))
    card = wd.cover_count() * (cout // layer.group)  # output neurons (all channels of the group) seeing i
    return (card / (n_out * layer.fan_in))[None]  # [1, *spatial], broadcast over batch and channels


def _float_tensor(value: float):
    from onnx import helper

    return helper.make_tensor("value", 1, [1], [value])


RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (LRP0, Epsilon, Gamma, ZPlus, AlphaBeta, Flat, WSquare,
                                                          ZBox, RLRP)}


NON_NEGATIVE = ("epsilon", "gamma", "stabilizer")  # a negative stabilizer or gamma can flip a denominator's sign


def make_rule(name: str, classes: dict[str, type[Rule]] | None = None, **params) -> Rule:
    """Instantiate a rule by name (from ``classes``, default the linear rules), with a one-line error listing valid
    names and parameters, or saying which value is not a finite number (or is negative where only ``>= 0`` makes
    sense)."""
    classes = RULES if classes is None else classes
    cls = classes.get(name)
    if cls is None:
        raise OnnxlrpError(f"unknown rule {name!r}; valid rules: {', '.join(classes)}")
    fields = set(cls.__dataclass_fields__)
    unknown = set(params) - fields
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise OnnxlrpError(f"rule {name!r} has no parameter {', '.join(sorted(unknown))}; valid: {valid}")
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise OnnxlrpError(f"rule {name!r}: {key} must be a finite number (got {value!r})")
        if key in NON_NEGATIVE and value < 0:
            raise OnnxlrpError(f"rule {name!r}: {key} must be >= 0 (got {value})")
    return cls(**params)
