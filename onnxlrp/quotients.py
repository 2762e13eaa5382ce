"""Stabilized quotients and relevance products: the arithmetic the rules share.

A rule divides relevance by a forward value only through :func:`quotient` (or a helper built on it: the stabilizer
``stab(z) = z + eps * sign(z)`` of :func:`stabilize`, :func:`safe_divide`, :func:`divide_relevance`, ...) and
multiplies it by a forward value only through :func:`product`, which remembers the factors (``b.products``). With
range keeping (:mod:`onnxlrp.ranges`) these decide where a relevance tensor is scaled by a power of two, so that it
stays in float32's range; where the cofactor of a product is divided by a ratio of forward values in [0, 1]
(:func:`own_output`, :func:`divide_behind_relu`, :func:`divide_relevance`), no scaling is needed.
"""

from __future__ import annotations

import math

from .builder import GraphBuilder
from .layers import Linear

SMALLEST_NORMAL = 2.0 ** -126  # float32's smallest normal number
SATURATE = 2.0 ** 127  # 2 / (smallest normal float32): |z| * SATURATE >= 2 for every normal non-zero z


def stabilize(b: GraphBuilder, z: str, eps: float) -> str:
    """``z + eps * sign(z)``, ``sign(0) = +1`` (Zennit's stabilizer).

    For ``eps <= 1`` the signed ``eps`` is ``Clip(z * eps * 2^127 + eps, -eps, eps)``: for every normal ``z != 0``
    the scaled term is at least ``2 eps`` in magnitude (or infinite), so the clip saturates to ``eps * sign(z)``
    exactly, and ``z == 0`` gives ``+eps``. Only a subnormal ``z`` (``|z| < 1.2e-38``) can get a value in between.
    Element-wise Mul/Add/Clip run about twice as fast in onnxruntime as GreaterOrEqual + Where."""
    if eps > 1:
        zero = b.const(0.0, "zero")
        signed_eps = b.op("Where", [b.op("GreaterOrEqual", [z, zero]), b.const(eps), b.const(-eps)], "eps")
    else:
        scaled = b.op("Add", [b.op("Mul", [z, b.const(eps * SATURATE, "saturate")], "eps"), b.const(eps)], "eps")
        signed_eps = b.op("Clip", [scaled, b.const(-eps), b.const(eps)], "eps")
    return b.op("Add", [z, signed_eps], "stab")


def numerator(b: GraphBuilder, r: str) -> str:
    """``r`` ready to be divided by a stabilized forward value: with range keeping (:mod:`onnxlrp.ranges`), scaled
    by a power of two to a peak below 4 unless its compile-time bound is already that small."""
    return r if b.ranges is None else b.ranges.at_most(b, r, 0.0)


def bound_quotient(b: GraphBuilder, s: str, r: str, eps: float) -> str:
    """Record that ``s = r / d`` with ``|d| >= eps``: ``log2 |s| <= log2 |r| - log2 eps``."""
    if b.ranges is not None and b.ranges.bound_of(r) is not None:
        b.ranges.set_bound(s, b.ranges.bound_of(r) - math.log2(max(eps, SMALLEST_NORMAL)))
    return s


def quotient(b: GraphBuilder, r: str, denominator: str, eps: float, view=None) -> str:
    """``view(r) / denominator`` for a forward value ``denominator`` with ``|denominator| >= eps`` (a stabilizer),
    its magnitude kept in float32's range (see :func:`numerator`); ``view``: a reshaping of the numerator (e.g. a
    broadcast against two stacked halves).

    A relevance ``r = x * c`` is divided as it is written out (``|x * c| <= 4 |x|``, :func:`product`), then
    normalized: dividing the cofactor by the forward ratio ``x / denominator`` instead would overflow where an
    activation beyond ``eps * 3.4e38`` meets a denominator near ``eps``, and scaling that ratio safely takes as many
    passes. Only where ``x`` is the layer's own ReLU output and the denominator bounds it (:func:`own_output`) is
    the ratio known to be at most 1."""
    view = view or (lambda t: t)
    r = numerator(b, r)
    return bound_quotient(b, b.op("Div", [view(r), denominator], "s"), r, eps)


def safe_divide(b: GraphBuilder, r: str, z: str, eps: float) -> str:
    """``r / stab(z)``; with ``eps == 0`` (LRP-0) the quotient is 0 where ``|z|`` is below float32's smallest normal
    number (1.2e-38: zero, or a subnormal whose reciprocal would overflow) instead of NaN or Inf."""
    if eps > 0:
        return quotient(b, r, stabilize(b, z, eps), eps)
    zero = b.const(0.0, "zero")
    is_zero = b.op("Less", [b.op("Abs", [z], "abs_z"), b.const(SMALLEST_NORMAL, "smallest_normal")])
    denom = b.op("Where", [is_zero, b.const(1.0, "one"), z])
    return b.op("Where", [is_zero, zero, quotient(b, r, denom, SMALLEST_NORMAL)], "s")


def divide_signed(b: GraphBuilder, r: str, z: str, eps: float, sign: float) -> str:
    """``r / (z + sign * eps)`` for a ``z`` whose sign is known (``z+ >= 0``, ``z- <= 0``): the stabilizer without
    the GreaterOrEqual/Where of :func:`stabilize`. Where ``z`` is 0 every term of ``z`` is 0, so the sign Zennit
    would pick there (+1) does not change the relevance."""
    return quotient(b, r, b.op("Add", [z, b.const(sign * eps)], "stab"), eps)


def divide_behind_relu(b: GraphBuilder, r: str, y: str, eps: float) -> str:
    """``r / stab(z)`` where ``y = Relu(z)`` and ``r`` is 0 wherever ``z <= 0``: there the quotient is 0 whatever
    the (non-zero) denominator, and where ``z > 0``, ``stab(z) = y + eps``. Reading ``y`` instead of ``z`` also
    leaves the forward Conv + Relu fusable. When ``r = y * c`` (the next layer multiplied by its input ``y``,
    see :func:`product`), this is ``c * y / (y + eps)``: the ratio reads forward values only, and the relevance
    path keeps one Mul instead of a Mul and a Div (the product ``y * c`` is then dropped unread)."""
    factors = factors_of(b, r, y)
    if factors is None:
        return divide_signed(b, r, y, eps, 1.0)
    return within(b, b.op("Mul", [factors[1], shrink(b, y, eps)], "s"), factors[1])


def within(b: GraphBuilder, s: str, c: str) -> str:
    """Record that ``|s| <= |c|`` (``s = c * ratio`` with a ratio in [0, 1])."""
    if b.ranges is not None:
        b.ranges.set_bound(s, b.ranges.bound_of(c))
    return s


def own_output(b: GraphBuilder, layer: Linear, r: str) -> tuple[str, str] | None:
    """``(y, c)`` when ``r = y * c`` with ``y = Relu(z)`` the layer's own output behind a ReLU: a rule whose
    denominator ``d`` is at least ``y`` wherever ``y > 0`` (z+, the activating part of alpha-beta, gamma's ``z_p``)
    divides the cofactor by a ratio in [0, 1], ``r / d = c * (y / d)``, which no activation can push out of range
    (:func:`cofactor_quotient`)."""
    if layer.relu_out is None:
        return None
    factors = factors_of(b, r, layer.relu_out)
    return None if factors is None else (layer.relu_out, factors[1])


def cofactor_quotient(b: GraphBuilder, y: str, c: str, denominator: str) -> str:
    """``c * (y / denominator)`` where ``|y / denominator| <= 1`` (:func:`own_output`)."""
    return within(b, b.op("Mul", [c, b.op("Div", [y, denominator], "ratio")], "s"), c)


def shrink(b: GraphBuilder, v: str, eps: float) -> str:
    """``v / (v + eps)`` for ``v >= 0``: a ratio of forward values that replaces a division by ``stab``.

    Emitted as ``Softsign(v / eps)`` (``u / (1 + |u|)``, the same ratio), which onnxruntime runs 1.6-2.3x faster
    than an Add and a Div. ``v / eps`` overflows only for ``v > 3.4e38 * eps``; below ``eps = 1e-12`` (where that
    bound could matter) the ratio stays an Add and a Div."""
    if eps < 1e-12:
        return divide_signed(b, v, v, eps, 1.0)
    return b.op("Softsign", [b.op("Mul", [v, b.const(1.0 / eps, "inv_eps")], "v_over_eps")], "ratio")


def mul(b: GraphBuilder, a: str, c: str) -> str:
    return b.op("Mul", [a, c], "prod")


def product(b: GraphBuilder, x: str, c: str, remember: bool = True) -> str:
    """The relevance ``x * c`` of a forward value ``x``, remembered as such (``b.products``): a fork whose readers
    all send such products sums the cofactors first (one product instead of one per reader), and a reader that
    divides it by ``stab(x)`` uses the cofactor (:func:`divide_relevance`). With range keeping the product is
    written with ``c`` scaled to a peak below 4 when its bound is larger or unknown, so that ``|x * c| <= 4 |x|``
    (a reader that uses the cofactor reads ``c`` itself, and the scaling is dropped if no one reads the product)."""
    r = mul(b, x, c if b.ranges is None else b.ranges.at_most(b, c, 0.0))
    if remember:
        b.products[r] = (x, c)
    return r


def factors_of(b: GraphBuilder, r: str, z: str) -> tuple[str, str] | None:
    """``(x, c)`` when ``r = x * c`` (see :func:`product`) with ``x`` equal to ``z`` wherever ``c`` is non-zero:
    ``z`` itself, or a stand-in for it (``b.stand_ins``); otherwise None."""
    factors = b.products.get(r)
    return factors if factors is not None and b.stand_ins.get(factors[0], factors[0]) == z else None


def divide_relevance(b: GraphBuilder, r: str, z: str, eps: float) -> str:
    """``r / stab(z)``. When ``r = z * c`` (a join's share of its input ``z``, or of a stand-in that equals ``z``
    wherever ``c`` is non-zero, see ``RelevancePass.join_stand_in``), this is ``c * |z| / (|z| + eps)``:
    ``z / stab(z) = |z| / (|z| + eps)`` exactly (the signs cancel, and ``z = 0`` gives 0), a ratio of forward values
    that takes three passes instead of the product, the stabilizer's four and the quotient."""
    factors = factors_of(b, r, z)
    if eps <= 0 or factors is None:
        return safe_divide(b, r, z, eps)
    magnitude = b.op("Abs", [factors[0]], "abs_z")  # z, or its stand-in where c is non-zero (b.stand_ins)
    return within(b, b.op("Mul", [factors[1], shrink(b, magnitude, eps)], "s"), factors[1])
