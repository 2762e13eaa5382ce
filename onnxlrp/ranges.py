"""Float32 range keeping for the classic rules: relevance carried as ``t * 2^e``, exact powers of two.

Every classic rule is linear in the relevance it receives (``R_in = M(x) R``, ``M`` built from forward values only:
the stabilizers are added to forward values), so the whole sweep is linear in the seed. A relevance tensor may
therefore be carried as a pair ``(t, e)`` that stands for ``t * 2^e``, where ``e`` is a scalar (one per batch) that
the graph computes at run time. Dividing ``t`` by a power of two and adding its exponent to ``e`` changes no bit of
the represented value, and the final map ``t * 2^e`` is the float32 result of the unnormalized sweep wherever that
result is finite; where it would not fit float32, the map is capped at ``+-3.4e38`` (:func:`restore`).

Where it normalizes (``t -> t * 2^-k``, ``k = floor(log2(max |t|))``, so ``max |t|`` lands in ``[1, 4)``):

- the seed;
- the numerator of a division by a stabilized forward value (``R / stab(z)``, ``|stab(z)| >= eps``) whose
  magnitude is not known at compile time (:func:`onnxlrp.quotients.quotient`): the quotient is then below
  ``4 / eps``;
- the input of a transposed product ``W^T g`` whose compile-time bound would leave :data:`LIMIT` (each product grows
  the bound by ``log2 max_i sum_j |w_ji|``, see :func:`transpose_growth`);
- the cofactor ``c`` of a relevance ``x * c`` that is written out as a tensor (:func:`onnxlrp.quotients.product`), so
  that ``|x * c| <= 4 |x|``: no product of a forward value and relevance can overflow while the forward value fits.

In a chain of layers that divide a relevance ``y * c`` by their own output ``y`` (LRP-epsilon behind a ReLU, Zennit's
Norm rule at joins) the quotient is ``c * y / (y + eps) <= c``: only the weights grow it, and the compile-time bound
decides; ResNet50 and VGG16 under LRP-epsilon normalize at run time only at their seed, their dense head and a few
points where the weights' bounds add up.

Exponents meet where relevance is added (a fork, a Sum, a Concat): :meth:`Ranges.before` aligns the operands to the
larger exponent (multiplying the others by an exact ``2^(e_i - e_max)``). The :class:`onnxlrp.builder.GraphBuilder`
calls :meth:`Ranges.before` and :meth:`Ranges.after` for every op it emits, so emitters need not know about ranges:
an op with a relevance input has a relevance output with the same exponent.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

LIMIT = 120.0  # log2 bound a transposed product may reach (float32 holds up to 2^128)
NORMALIZED = 2.0  # log2 bound of a normalized tensor: peak / 2^floor(log2 peak) < 2, and Log may round k down by 1
SMALLEST_NORMAL = 2.0 ** -126
FLOAT_MAX = float(np.finfo(np.float32).max)
EXPONENT_SPAN = 126  # one factor 2^k with |k| <= 126 is a normal float32

# ops whose output carries no relevance even when an input does (shapes, indices, masks)
NOT_RELEVANCE = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "Less", "GreaterOrEqual",
                           "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "NonZero", "ConstantOfShape"})
# ops that add or select their relevance operands: the operands must share one exponent
ADDITIVE = frozenset({"Sum", "Add", "Sub", "Concat", "Where", "Max", "Min", "Mean"})
# ops that do not enlarge the largest magnitude of their relevance operands
KEEPS_BOUND = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Pad", "Identity",
                         "Neg", "Concat", "Where", "Split", "Expand", "Tile", "Gather", "Max", "Min", "Mean", "Cast"})


def transpose_growth(weight: np.ndarray, kind: str, group: int = 1) -> float:
    """``log2 max_i sum_j |w_ji|``: the factor by which ``W^T g`` can exceed ``max |g|`` (dense ``weight`` [in, out];
    a convolution's [Cout, Cin/group, *k], where input channel ``i`` of group ``g`` meets every output channel of its
    group at every tap: an upper bound whatever the strides and padding)."""
    w = np.abs(np.asarray(weight, dtype=np.float64))
    if kind == "dense":
        column = w.reshape(w.shape[0], -1).sum(axis=1)
    else:
        cout, cin_g = w.shape[:2]
        column = w.reshape(group, cout // group, cin_g, -1).sum(axis=(1, 3))
    peak = float(column.max()) if column.size else 0.0
    return math.log2(peak) if peak > 0 else -math.inf


class Ranges:
    """The exponent and compile-time bound of every relevance tensor of a sweep.

    ``exponent[t]``: the scalar tensor ``e`` such that ``t`` stands for ``t * 2^e`` (None: ``e = 0``); a tensor is a
    relevance tensor exactly when it has an entry. ``bound[t]``: a compile-time upper bound of ``log2 max |t|``
    (absent: unknown, e.g. a product with a forward value)."""

    def __init__(self):
        self.exponent: dict[str, str | None] = {}
        self.bound: dict[str, float] = {}
        self._normalized: dict[str, str] = {}
        self._internal = 0

    @contextlib.contextmanager
    def internal(self):
        """Ops emitted inside compute peaks and exponents, not relevance."""
        self._internal += 1
        try:
            yield
        finally:
            self._internal -= 1

    def register(self, tensor: str, exponent: str | None = None, bound: float | None = None) -> str:
        self.exponent[tensor] = exponent
        if bound is not None:
            self.bound[tensor] = bound
        return tensor

    def bound_of(self, tensor: str) -> float | None:
        return self.bound.get(tensor)

    def set_bound(self, tensor: str, bound: float | None) -> None:
        if bound is not None and tensor in self.exponent:
            self.bound[tensor] = bound

    # ------------------------------------------------------------ builder hooks

    def before(self, b, op_type: str, inputs: list[str]) -> list[str]:
        """Align the relevance operands of an additive op to one exponent."""
        if self._internal or op_type in NOT_RELEVANCE:
            return inputs
        carrying = [i for i, name in enumerate(inputs) if name in self.exponent]
        if len(carrying) < 2 or len({self.exponent[inputs[i]] for i in carrying}) == 1:
            return inputs
        if op_type in ("Mul", "Div"):
            return inputs
        if op_type not in ADDITIVE:
            raise AssertionError(f"{op_type} of relevance tensors with different exponents")
        aligned = self.align(b, [inputs[i] for i in carrying])
        out = list(inputs)
        for i, name in zip(carrying, aligned, strict=True):
            out[i] = name
        return out

    def after(self, op_type: str, inputs: list[str], outputs: list[str]) -> None:
        """An op with a relevance input has relevance outputs: their exponent, and a bound where the op keeps or
        adds magnitudes."""
        if self._internal or op_type in NOT_RELEVANCE:
            return
        carrying = [name for name in inputs if name in self.exponent]
        if not carrying:
            return
        exponent = self.exponent[carrying[0]]
        if op_type in ("Mul", "Div") and len(carrying) == 2:
            raise AssertionError("a product or quotient of two relevance tensors is not linear in the seed")
        bounds = [self.bound.get(name) for name in carrying]
        bound = None
        if all(v is not None for v in bounds):
            if op_type in KEEPS_BOUND:
                bound = max(bounds)
            elif op_type in ("Sum", "Add", "Sub"):
                bound = max(bounds) + math.log2(len(carrying))
        for out in outputs:
            self.register(out, exponent, bound)

    # ------------------------------------------------------------ run-time normalization

    def normalize(self, b, tensor: str) -> str:
        """``tensor * 2^-k`` with ``k = floor(log2 max |tensor|)`` clipped to [-126, 126] (exact: a power of two), its
        exponent raised by ``k``; an all-zero tensor stays zero. Once per tensor."""
        if tensor in self._normalized:
            return self._normalized[tensor]
        with self.internal():
            high = b.op("ReduceMax", [tensor], "high", keepdims=0)
            low = b.op("ReduceMin", [tensor], "low", keepdims=0)
            peak = b.op("Max", [high, b.op("Neg", [low], "low"), b.const(SMALLEST_NORMAL, "smallest_normal")], "peak")
            log2 = b.op("Mul", [b.op("Log", [peak], "log_peak"), b.const(1.0 / math.log(2.0), "inv_ln2")], "log2")
            k = b.op("Clip", [b.op("Floor", [log2], "k"), b.const(-EXPONENT_SPAN), b.const(EXPONENT_SPAN)], "k")
            scale = b.op("Pow", [b.const(2.0, "two"), b.op("Neg", [k], "minus_k")], "scale")
            scaled = b.op("Mul", [tensor, scale], "normalized")
            previous = self.exponent.get(tensor)
            exponent = k if previous is None else b.op("Add", [previous, k], "exponent")
        self.register(scaled, exponent, NORMALIZED)
        self._normalized[tensor] = scaled
        return scaled

    def at_most(self, b, tensor: str, limit: float) -> str:
        """``tensor`` when its bound is known and at most ``limit`` (or :data:`NORMALIZED`), else normalized."""
        if tensor not in self.exponent:
            return tensor
        bound = self.bound.get(tensor)
        if bound is not None and bound <= max(limit, NORMALIZED):
            return tensor
        return self.normalize(b, tensor)

    def align(self, b, tensors: list[str]) -> list[str]:
        """The tensors rescaled to their largest exponent (``t * 2^(e_t - e_max)``, exact unless it underflows)."""
        with self.internal():
            exponents = [self.exponent[t] or b.const(0.0, "zero") for t in tensors]
            largest = b.op("Max", exponents, "exponent") if len(set(exponents)) > 1 else exponents[0]
            out = []
            for t, e in zip(tensors, exponents, strict=True):
                if e == largest:
                    out.append(t)
                    continue
                scale = b.op("Pow", [b.const(2.0, "two"), b.op("Sub", [e, largest], "shift")], "scale")
                out.append(b.op("Mul", [t, scale], "aligned"))
        for t, new in zip(tensors, out, strict=True):
            if new != t:
                self.register(new, largest, self.bound.get(t))
        return out

    def restore(self, b, tensor: str) -> str:
        """``tensor * 2^e`` as plain float32, capped at ``+-3.4e38`` where it does not fit: three factors ``2^e_i``
        of at most 126 binary orders each (a value that needs more overflows whatever its mantissa)."""
        exponent = self.exponent.get(tensor)
        if exponent is None:
            return tensor
        with self.internal():
            value = tensor
            rest = exponent
            for part in range(3):
                step = rest if part == 2 else \
                    b.op("Clip", [b.op("Floor", [b.op("Div", [rest, b.const(float(3 - part))], "share")], "step"),
                                  b.const(-EXPONENT_SPAN), b.const(EXPONENT_SPAN)], "step")
                if part == 2:
                    step = b.op("Clip", [step, b.const(-EXPONENT_SPAN), b.const(EXPONENT_SPAN)], "step")
                else:
                    rest = b.op("Sub", [rest, step], "rest")
                value = b.op("Mul", [value, b.op("Pow", [b.const(2.0, "two"), step], "scale")], "restored")
            return b.op("Clip", [value, b.const(-FLOAT_MAX, "minus_float_max"), b.const(FLOAT_MAX, "float_max")],
                        "capped")
