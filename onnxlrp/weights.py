"""Weights as expressions over the model's own initializers.

A rule's modified weights (``W+ = max(W, 0)``, ``W- = min(W, 0)``, ``W + gamma W+``, the stacked ``[W+; W-]``,
``alpha W+``, ``W * W``, a kernel flipped with its channel axes swapped, a dense weight transposed, ``s W`` after a
folded BatchNormalization) are not written into the compiled model as new initializers. Each is a few ONNX ops
(Mul, Relu, Min, LeakyRelu, Concat, Transpose, Reshape, Slice with step -1, ConstantOfShape) over the initializer
the model already holds. Their inputs are all constants, so onnxruntime's constant folding (on at every
optimization level but ``ORT_DISABLE_ALL``) evaluates them once when the session is created: the session holds the
same tensors as if they had been stored, and the file holds each weight once.

Folding costs session-creation time in proportion to the bytes each op writes, so the constructors below keep the
ops few: factors are merged into one Mul (``a (b W) = (a b) W``) and moved outside layout ops and Concat, so that a
flipped kernel or a stacked weight that is already computed is reused (``[alpha W+; -beta W-]`` is ``[W+; W-]``
times per-channel factors); ``W + gamma W+`` is one LeakyRelu; layout ops of a weight of ones are ones.

A :class:`Weight` knows its shape, computes its float64 value when first asked (compile-time analysis), and emits
its ops once per graph: equal expressions share one tensor (:meth:`GraphBuilder.shared`).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from .builder import GraphBuilder

FLOAT32 = np.dtype(np.float32)


class Weight:
    """An expression ``op(inputs, params)`` whose leaves are the model's initializers.

    ``key`` identifies the expression by structure (two equal keys compute equal tensors); ``shape`` is known
    without evaluating anything."""

    __slots__ = ("op", "inputs", "params", "shape", "key", "_value")
    __array_ufunc__ = None  # ``numpy scalar * Weight`` and the like fall back to Weight's own operators

    def __init__(self, op: str, inputs: tuple[Weight, ...], params: tuple, shape, value: np.ndarray | None = None):
        self.op, self.inputs, self.params, self.shape = op, inputs, params, tuple(int(d) for d in shape)
        self.key = (op, params, tuple(w.key for w in inputs))
        self._value = value

    @classmethod
    def initializer(cls, name: str, value: np.ndarray, readable: bool) -> Weight:
        """The model's initializer ``name`` holding ``value``. ``readable``: the relevance graph may read it (it is a
        constant, not a graph input a caller could override); otherwise the graph gets one float32 copy of it."""
        return cls("initializer", (), (name, bool(readable), np.dtype(value.dtype).str), value.shape, value)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def value(self) -> np.ndarray:
        """The float64 value (computed on first use and kept)."""
        if self._value is None or self._value.dtype != np.float64:
            self._value = _EVALUATE[self.op](self, *(w.value for w in self.inputs))
        return self._value

    @property
    def is_initializer(self) -> bool:
        """Whether the expression is a float32 initializer read as it is (no op, no copy)."""
        return self.op == "initializer" and self.params[1] and np.dtype(self.params[2]) == FLOAT32

    def emit(self, b: GraphBuilder, hint: str) -> str:
        """The name of a float32 tensor holding this value in ``b``'s graph (ops emitted once per expression)."""
        if self.is_initializer:
            return self.params[0]
        return b.shared(self.key, lambda: _EMIT[self.op](self, b, hint, *(w.emit(b, f"W_{w.op}") for w in self.inputs)))

    # numpy-like arithmetic, so that rules read as their equations
    def __mul__(self, factor) -> Weight:
        return scale(self, factor)

    __rmul__ = __mul__

    def __neg__(self) -> Weight:
        return scale(self, -1.0)

    def __add__(self, other: Weight) -> Weight:
        if not isinstance(other, Weight):
            return NotImplemented
        return add(self, other)

    def __pow__(self, exponent) -> Weight:
        if exponent != 2:
            raise ValueError("only a weight's square is supported")
        return Weight("square", (self,), (), self.shape)

    @property
    def T(self) -> Weight:  # noqa: N802 (numpy's name)
        return transpose(self, tuple(reversed(range(self.ndim))))


# ------------------------------------------------------------------ constructors

def _factor(w: Weight) -> tuple[Weight, np.ndarray]:
    """``w`` as ``(base, factor)`` with ``w = base * factor`` (factor 1 when ``w`` is not a scale)."""
    if w.op == "scale":
        return w.inputs[0], _factor_array(w)
    return w, np.ones([1] * w.ndim)


def _factor_array(w: Weight) -> np.ndarray:
    return np.frombuffer(w.params[1], dtype=np.float64).reshape(w.params[0])


def scale(w: Weight, factor) -> Weight:
    """``w * factor`` for a scalar or an array broadcastable against ``w`` (per-channel factors); a scale of a scale
    is one."""
    factor = np.asarray(factor, dtype=np.float64)
    base, inner = _factor(w)
    factor = (inner * factor.reshape((1,) * (w.ndim - factor.ndim) + factor.shape)) if factor.ndim <= w.ndim \
        else inner * factor
    if np.all(factor == 1.0):
        return base
    if np.all(factor == factor.flat[0]):
        factor = np.full([1] * base.ndim, factor.flat[0])
    return Weight("scale", (base,), (factor.shape, factor.tobytes()), np.broadcast_shapes(base.shape, factor.shape))


def positive_part(w: Weight) -> Weight:
    """``W+ = max(W, 0)``."""
    return Weight("relu", (w,), (), w.shape)


def negative_part(w: Weight) -> Weight:
    """``W- = min(W, 0)``."""
    return Weight("min0", (w,), (), w.shape)


def add(a: Weight, c: Weight) -> Weight:
    """``a + c``. ``W + gamma W+`` is ``max((1 + gamma) W, W)``, one LeakyRelu of ``(1 + gamma) W`` with slope
    ``1 / (1 + gamma)``; ``W + gamma W-`` is ``-(V + gamma V+)`` with ``V = -W``."""
    base, gamma = _factor(c)
    if base.op in ("relu", "min0") and base.inputs[0].key == a.key and gamma.size == 1 and gamma.item() >= 0:
        g = gamma.item()
        if base.op == "relu":
            return _gamma_plus(a, g)
        return scale(_gamma_plus(scale(a, -1.0), g), -1.0)
    return Weight("add", (a, c), (), np.broadcast_shapes(a.shape, c.shape))


def _gamma_plus(w: Weight, gamma: float) -> Weight:
    """``w + gamma max(w, 0)`` as ``LeakyRelu((1 + gamma) w, 1 / (1 + gamma))``."""
    if gamma == 0:
        return w
    return Weight("leaky", (scale(w, 1.0 + gamma),), (1.0 / (1.0 + gamma),), w.shape)


def ones_like(w: Weight) -> Weight:
    """A weight of ones shaped like ``w`` (the flat rule)."""
    return Weight("ones", (), (w.shape,), w.shape)


def concat(weights: list[Weight], axis: int) -> Weight:
    """The weights joined along ``axis``; when some are scaled, the scaled join of their bases (so that a join of
    the same bases, computed for another use, is reused)."""
    shape = list(weights[0].shape)
    shape[axis] = sum(w.shape[axis] for w in weights)
    split = [_factor(w) for w in weights]
    if any(w.op == "scale" for w in weights):
        others = [max(f.shape[a] if f.ndim == len(shape) else 1 for _, f in split) for a in range(len(shape))]
        pieces = []
        for w, (_, f) in zip(weights, split, strict=True):
            target = list(others)
            target[axis] = w.shape[axis]
            pieces.append(np.broadcast_to(f.reshape((1,) * (len(shape) - f.ndim) + f.shape), target))
        return scale(concat([base for base, _ in split], axis), np.concatenate(pieces, axis=axis))
    return Weight("concat", tuple(weights), (axis,), shape)


def transpose(w: Weight, perm: tuple[int, ...]) -> Weight:
    """``w`` with its axes permuted: a transpose of a transpose is one (or none), a factor moves outside."""
    perm = tuple(perm)
    if w.op == "scale":
        return scale(transpose(w.inputs[0], perm), np.transpose(_full_rank(w), perm))
    if w.op == "ones":
        shape = tuple(w.shape[p] for p in perm)
        return Weight("ones", (), (shape,), shape)
    if w.op == "transpose":
        perm = tuple(w.params[0][p] for p in perm)
        w = w.inputs[0]
    if perm == tuple(range(w.ndim)):
        return w
    return Weight("transpose", (w,), (perm,), [w.shape[p] for p in perm])


def reshape(w: Weight, shape: tuple[int, ...]) -> Weight:
    shape = tuple(int(d) for d in shape)
    factor = _factor(w)[1]
    if w.op == "scale" and factor.size == 1:
        return scale(reshape(w.inputs[0], shape), factor.item())
    if w.op == "ones":
        return Weight("ones", (), (shape,), shape)
    if w.op == "reshape":
        w = w.inputs[0]
    return w if shape == w.shape else Weight("reshape", (w,), (shape,), shape)


def flip(w: Weight, axes: tuple[int, ...]) -> Weight:
    """``w`` reversed along ``axes`` (axes of length 1 are left out: reversing them changes nothing)."""
    axes = tuple(a for a in axes if w.shape[a] > 1)
    if not axes or w.op == "ones":
        return w
    if w.op == "scale":
        factor = _full_rank(w)
        return scale(flip(w.inputs[0], axes), np.flip(factor, axis=[a for a in axes if factor.shape[a] > 1]))
    if w.op == "flip":
        axes = tuple(sorted(set(axes) ^ set(w.params[0])))
        return flip(w.inputs[0], axes) if axes else w.inputs[0]
    return Weight("flip", (w,), (axes,), w.shape)


def _full_rank(w: Weight) -> np.ndarray:
    """A scale's factor with as many axes as the weight."""
    factor = _factor_array(w)
    return factor.reshape((1,) * (w.ndim - factor.ndim) + factor.shape)


# ------------------------------------------------------------------ float64 values

def _initializer_value(w: Weight) -> np.ndarray:
    return np.asarray(w._value, dtype=np.float64)


_EVALUATE = {
    "initializer": _initializer_value,
    "scale": lambda w, a: a * _factor_array(w),
    "relu": lambda w, a: np.maximum(a, 0),
    "min0": lambda w, a: np.minimum(a, 0),
    "leaky": lambda w, a: np.where(a > 0, a, a * w.params[0]),
    "add": lambda w, a, c: a + c,
    "square": lambda w, a: a * a,
    "ones": lambda w: np.ones(w.shape),
    "concat": lambda w, *parts: np.concatenate(parts, axis=w.params[0]),
    "transpose": lambda w, a: np.ascontiguousarray(np.transpose(a, w.params[0])),
    "reshape": lambda w, a: a.reshape(w.params[0]),
    "flip": lambda w, a: np.ascontiguousarray(np.flip(a, axis=w.params[0])),
}


# ------------------------------------------------------------------ ONNX ops (float32)

def _emit_initializer(w: Weight, b: GraphBuilder, hint: str) -> str:
    name, readable, dtype = w.params
    if not readable:  # a graph input's default: a caller may override it, so onnxruntime would not fold ops on it
        return b.const(np.asarray(w._value, dtype=np.float32), hint)
    return b.op("Cast", [name], hint, to=TensorProto.FLOAT)  # float16 or float64 (float32 is read as it is)


INT64_MIN = np.iinfo(np.int64).min


def _emit_flip(w: Weight, b: GraphBuilder, hint: str, a: str) -> str:
    """Slice with step -1 from the last element (start -1) through the first (end clamped from INT64_MIN)."""
    axes = list(w.params[0])
    minus_ones = b.const([-1] * len(axes), "minus_ones", np.int64)
    return b.op("Slice", [a, minus_ones, b.const([INT64_MIN] * len(axes), "to_first", np.int64),
                          b.const(axes, "axes", np.int64), minus_ones], hint)


_EMIT = {
    "initializer": _emit_initializer,
    "scale": lambda w, b, hint, a: b.op("Mul", [a, b.const(_factor_array(w), "weight_scale")], hint),
    "relu": lambda w, b, hint, a: b.op("Relu", [a], hint),
    "min0": lambda w, b, hint, a: b.op("Min", [a, b.const(0.0, "zero")], hint),
    "leaky": lambda w, b, hint, a: b.op("LeakyRelu", [a], hint, alpha=w.params[0]),
    "add": lambda w, b, hint, a, c: b.op("Add", [a, c], hint),
    "square": lambda w, b, hint, a: b.op("Mul", [a, a], hint),
    "ones": lambda w, b, hint: b.op("ConstantOfShape", [b.const(list(w.shape), "shape", np.int64)], hint,
                                    value=helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0])),
    "concat": lambda w, b, hint, *parts: b.op("Concat", list(parts), hint, axis=w.params[0]),
    "transpose": lambda w, b, hint, a: b.op("Transpose", [a], hint, perm=list(w.params[0])),
    "reshape": lambda w, b, hint, a: b.op("Reshape", [a, b.const(list(w.params[0]), "shape", np.int64)], hint),
    "flip": _emit_flip,
}
