"""Semiring LRP on explicit pairs (j, k): the annotation ``Theta(d)_jk`` of every pair and ``R_j = plus_k Theta_jk
times R_k`` (Eq. K-LRP of Groudiev's "Extending LRP using Semiring Annotations"), emitted as ONNX ops.

No gradient trick exists once ``Theta`` is applied per pair (Sec. 4.1.2), so the pairs are materialized:

- dense layers: the contributions ``c_jk = a_j w_jk`` as a ``[J, K]`` tensor per sample;
- convolutions: the unfolded receptive fields (im2col: a one-hot depthwise convolution gives the ``K`` taps of every
  output position), ``c = patch x W`` per output position, with padding, strides, dilation and groups; the taps'
  results go back to the input positions by :func:`Annotator.scatter_taps`, which adds them with the semiring's plus;
- average pooling: a convolution with equal weights ``1 / divisor`` (Eq. 4.1.2, any stride and padding);
- joins ``z = u_0 + u_1 + ...``: the LRP-0 coefficients of a join, ``d_ik = u_ik / z_k`` element-wise.

``z_k`` is the forward output (bias and folded BatchNorm included): ``d_jk = c_jk / z_k`` with ``d = 0`` where
``z_k = 0``, as LRP-0 sets its quotients there. Large layers are cut into chunks of at most :data:`CHUNK_PAIRS` pairs
per sample (by output position, then by output channel), so memory stays bounded.
"""

from __future__ import annotations

import itertools

import numpy as np

from onnxlrp.semirings import VITERBI_EPS, Semiring
from onnxlrp.weights import log_magnitude, magnitude, reshape, transpose

from .ops.pooling import first_max_taps, tap_validity, window_patches

CHUNK_PAIRS = 1 << 24  # pairs per sample in one pair tensor (64 MiB of float32)
LOG_TINY = float(np.log(VITERBI_EPS))


class Annotator:
    """The ONNX form of one node's semiring step: annotations (Sec. 2.2), the semiring's times and plus, in the
    algebra's element type. ``threshold`` is the node's ``theta`` (None for annotations without one)."""

    def __init__(self, ctx, semiring: Semiring, threshold: float | None):
        self.ctx, self.b, self.s, self.threshold = ctx, ctx.b, semiring, threshold
        self.dtype = ctx.algebra.dtype

    # ------------------------------------------------------------ constants and element-wise helpers

    def f32(self, value, hint: str = "const") -> str:
        return self.b.const(value, hint)

    def relevance_const(self, value, hint: str = "const") -> str:
        return self.ctx.relevance_const(value, hint)

    def inverse(self, z: str) -> str:
        """``1 / z``, and 0 where ``z = 0`` (so ``d = c / z`` is 0 there, like LRP-0's quotients)."""
        b = self.b
        zero = self.f32(0.0, "zero")
        return b.op("Where", [b.op("Equal", [z, zero]), zero, b.op("Reciprocal", [z], "inv_z")], "inv_z")

    def log_abs(self, t: str) -> str:
        """``log |t|``, and the semiring's zero where ``t = 0`` (``log 0``)."""
        b = self.b
        return b.op("Where", [b.op("Equal", [t, self.f32(0.0, "zero")]), self.f32(self.s.zero, "log_zero"),
                              b.op("Log", [b.op("Abs", [t])], "log_abs")], "log_abs")

    def log_weights(self, w: np.ndarray) -> np.ndarray:
        """``log |w|`` at compile time, the semiring's zero where ``w = 0``."""
        with np.errstate(divide="ignore"):
            return np.where(w == 0, self.s.zero, np.log(np.abs(w))).astype(np.float32)

    def clamp(self, t: str) -> str:
        """Keep ``t`` in K: at least ``zero`` for max semirings (``zero`` is their least element), at most
        ``zero`` for min-plus; this also keeps ``zero`` absorbing where ``times`` is ``add``."""
        if self.s.plus in ("max", "or") and self.s.times != "and":
            return self.b.op("Max", [t, self.f32(self.s.zero, "zero")], "clamp")
        if self.s.plus == "min":
            return self.b.op("Min", [t, self.f32(self.s.zero, "zero")], "clamp")
        return t

    def select(self, mask: str) -> str:
        """``one`` where ``mask``, else ``zero``, in the algebra's type."""
        b = self.b
        if (self.s.zero, self.s.one) == (0, 1):
            return b.op("Cast", [mask], "theta", to=self.dtype)
        return b.op("Where", [mask, self.relevance_const(self.s.one, "one"), self.relevance_const(self.s.zero, "zero")],
                    "theta")

    # ------------------------------------------------------------ Theta

    def needs_max(self) -> bool:
        return self.s.base_annotation == "abs-normalized"

    def needs_log(self) -> bool:
        return self.s.annotation in ("log-identity", "log-abs-normalized")

    def scale(self, m: str) -> str:
        """Eq. 2.2.3's ``1 / (max_j' |c_j'k| + 1e-9)`` from the max ``m``."""
        b = self.b
        return b.op("Reciprocal", [b.op("Add", [m, self.f32(VITERBI_EPS, "viterbi_eps")])], "inv_max")

    def log_scale(self, lm: str) -> str:
        """``log(max_j' |c_j'k| + 1e-9)`` from ``lm = log max_j' |c_j'k|``: ``logaddexp(lm, log 1e-9)`` =
        ``max(lm, l) + softplus(-|lm - l|)``, finite for every ``lm`` (no underflow)."""
        b = self.b
        tiny = self.f32(LOG_TINY, "log_eps")
        gap = b.op("Neg", [b.op("Abs", [b.op("Sub", [lm, tiny])])], "gap")
        return b.op("Add", [b.op("Max", [lm, tiny]), b.op("Softplus", [gap])], "log_max")

    def annotate(self, c: str, *, inv_z: str | None = None, log_c: str | None = None, log_z: str | None = None,
                 inv_m: str | None = None, log_m: str | None = None) -> str:
        """``Theta(d)`` of the pairs whose contributions are ``c`` (see :mod:`onnxlrp.semirings`): ``inv_z`` for
        ``d = c / z``, ``inv_m`` / ``log_m`` for Eq. 2.2.3's normalization, ``log_c = log |c|`` and ``log_z``
        for the log annotations (sums of logs: no product underflows)."""
        b, annotation = self.b, self.s.annotation
        if annotation in ("threshold", "log-threshold"):  # Eq. 2.2.1 / 2.2.2; in log space log 1 = one, log 0 = zero
            d = b.op("Mul", [c, inv_z], "d")
            return self.select(b.op("GreaterOrEqual", [d, self.f32(self.threshold, "theta")], "relevant"))
        if annotation == "identity":
            return self.clamp(b.op("Mul", [c, inv_z], "d"))
        if annotation == "abs-normalized":  # Eq. 2.2.3
            return b.op("Mul", [b.op("Abs", [c]), inv_m], "theta")
        if annotation == "log-identity":
            positive = b.op("Greater", [b.op("Mul", [c, inv_z], "d"), self.f32(0.0, "zero")], "positive")
            log_d = self.clamp(b.op("Sub", [log_c, log_z], "log_d"))
            return b.op("Where", [positive, log_d, self.f32(self.s.zero, "log_zero")], "theta")
        return self.clamp(b.op("Sub", [log_c, log_m], "theta"))  # log-abs-normalized

    # ------------------------------------------------------------ times and plus

    def times(self, theta: str, r: str) -> str:
        if self.s.times == "add":
            return self.clamp(self.b.op("Add", [theta, r], "prod"))
        return self.b.op("Mul", [theta, r], "prod")

    def reduce(self, t: str, axes: list[int], keepdims: int = 0) -> str:
        """``plus`` over ``axes``."""
        op = {"sum": "ReduceSum", "max": "ReduceMax", "or": "ReduceMax", "min": "ReduceMin"}[self.s.plus]
        return self.ctx.reduce(op, t, axes, keepdims=keepdims, hint="plus")

    def plus(self, terms: list[str]) -> str:
        return self.ctx.add_relevance(terms)

    def contract(self, theta: str, r_row: str) -> str:
        """``plus_k Theta_jk times R_k`` over the last axis of ``theta`` (``[..., J, Kg]``) with ``r_row``
        ``[..., 1, Kg]``: a MatMul for (sum, mul) (integers below 2**24 stay exact in float32, counts use float64),
        otherwise times and a reduction. Returns ``[..., J]``."""
        b = self.b
        if self.s.plus == "sum" and self.s.times == "mul":
            column = b.op("Unsqueeze", [b.op("Squeeze", [r_row, b.const([-2], "axes", np.int64)], "R"),
                                        b.const([-1], "axes", np.int64)], "R")
            product = b.op("MatMul", [theta, column], "plus_times")
            return b.op("Squeeze", [product, b.const([-1], "axes", np.int64)], "R")
        return self.reduce(self.times(theta, r_row), [-1])

    # ------------------------------------------------------------ taps back to input positions

    def scatter_taps(self, col: str, window) -> str:
        """``col`` ``[N, C, K, *out]`` (one value per window tap and output position) added back at the input
        positions the taps read, with the semiring's plus (overlapping windows meet there); padded taps are
        dropped. Each tap's values are spread by the strides (the semiring's zero in between) and shifted into
        place by a Pad with the zero."""
        b, wd = self.b, window
        r = wd.rank
        if list(wd.strides) == list(wd.kernel) and all(d == 1 for d in wd.dilations):
            return self.untile(col, wd)
        parts = []
        for t, tap in enumerate(itertools.product(*[range(k) for k in wd.kernel])):
            begin = [tap[a] * wd.dilations[a] - wd.pads[a] for a in range(r)]
            span = [wd.out_spatial[a] * wd.strides[a] for a in range(r)]
            lo = [max(0, -begin[a]) for a in range(r)]
            hi = [min(span[a], wd.in_spatial[a] - begin[a]) for a in range(r)]
            if any(hi[a] <= lo[a] for a in range(r)):
                continue  # this tap reads only padding
            v = b.op("Gather", [col, b.const(t, "tap", np.int64)], "tap", axis=2)
            if any(s > 1 for s in wd.strides):
                v = self.spread(v, wd)
            if lo != [0] * r or hi != span:
                v = b.op("Slice", [v, b.const(lo, "start", np.int64), b.const(hi, "end", np.int64),
                                   b.const(list(range(2, 2 + r)), "axes", np.int64)], "tap")
            pads = [0, 0] + [begin[a] + lo[a] for a in range(r)] + \
                [0, 0] + [wd.in_spatial[a] - begin[a] - hi[a] for a in range(r)]
            if any(pads):
                v = self.ctx.pad_with_zero(v, pads)
            parts.append(v)
        assert parts, "a window geometry whose every tap reads padding"
        return self.plus(parts)

    def untile(self, col: str, wd) -> str:
        """:meth:`scatter_taps` for windows that tile the input (stride = kernel, no dilation): each input position
        is read by one tap of one window, so the taps go back by a re-indexing (depth to space), padding cropped
        and uncovered positions filled with the semiring's zero."""
        b, r = self.b, wd.rank
        col = b.op("Reshape", [col, b.const([0, -1, *wd.kernel, *wd.out_spatial], "shape", np.int64)], "col")
        perm = [0, 1] + [p for a in range(r) for p in (2 + r + a, 2 + a)]  # [N, C, o0, k0, o1, k1, ...]
        v = b.op("Transpose", [col], "untiled", perm=perm)
        span = [wd.out_spatial[a] * wd.kernel[a] for a in range(r)]
        v = b.op("Reshape", [v, b.const([0, -1, *span], "shape", np.int64)], "untiled")
        lo = [wd.pads[a] for a in range(r)]
        hi = [min(span[a], wd.pads[a] + wd.in_spatial[a]) for a in range(r)]
        if lo != [0] * r or hi != span:
            v = b.op("Slice", [v, b.const(lo, "start", np.int64), b.const(hi, "end", np.int64),
                               b.const(list(range(2, 2 + r)), "axes", np.int64)], "untiled")
        pads = [0, 0] + [0] * r + [0, 0] + [wd.in_spatial[a] - (hi[a] - lo[a]) for a in range(r)]
        return self.ctx.pad_with_zero(v, pads) if any(pads) else v

    def spread(self, v: str, wd) -> str:
        """``v`` ``[N, C, *out]`` with ``stride - 1`` zeros of the semiring after each element along each axis."""
        b, r = self.b, wd.rank
        axes = [3 + 2 * a for a in range(r)]
        v = b.op("Unsqueeze", [v, b.const(axes, "axes", np.int64)], "spread")
        pads = [0] * (2 + 2 * r) + [0, 0] + [x for a in range(r) for x in (0, wd.strides[a] - 1)]
        v = self.ctx.pad_with_zero(v, pads)
        shape = [0, -1] + [wd.out_spatial[a] * wd.strides[a] for a in range(r)]
        return b.op("Reshape", [v, b.const(shape, "shape", np.int64)], "spread")


# ---------------------------------------------------------------- linear layers

class PairLayout:
    """The pairs of a linear layer, laid out to broadcast: ``x5`` ``[N, positions, G, J, 1]`` (a dense layer has
    one position; a convolution's J are the taps of its receptive field: im2col by a one-hot depthwise
    convolution, 0 at padded taps), ``z5``, ``r5`` ``[N, positions, G, 1, Kg]``, the weights ``w3`` ``[G, J, Kg]``
    and bias ``bias3`` ``[G, 1, Kg]``. :meth:`chunks` cuts them into pieces of at most :data:`CHUNK_PAIRS` pairs
    per sample; :meth:`to_input` takes the per-pair results ``[N, positions, G, J]`` back to the layer input."""

    def __init__(self, ann: Annotator, layer, r: str):
        b = ann.b
        self.ann, self.layer = ann, layer
        if layer.kind == "dense":
            j, k = layer.weight.shape
            self.groups, self.jg, self.kg, self.positions = 1, j, k, 1
            self.x5 = b.op("Reshape", [layer.x, b.const([-1, 1, 1, j, 1], "shape", np.int64)], "x_pairs")
            to5 = b.const([-1, 1, 1, 1, k], "shape", np.int64)
            self.z5, self.r5 = b.op("Reshape", [layer.z, to5], "z_pairs"), b.op("Reshape", [r, to5], "R_pairs")
            self.w3 = reshape(layer.weight, (1, j, k))
        else:
            wd, g = layer.window, layer.group
            cout, cin_g = layer.weight.shape[:2]
            self.groups, self.kg, self.positions = g, cout // g, int(np.prod(wd.out_spatial))
            self.jg = cin_g * int(np.prod(wd.kernel))
            patches, _ = window_patches(b, layer.x, wd, cin_g * g)  # [N, Cin, K, *out]
            last, second_last = b.const([-1], "axes", np.int64), b.const([-2], "axes", np.int64)
            self.x5 = b.op("Unsqueeze", [to_positions(b, patches, g, self.jg, self.positions), last], "x_pairs")
            self.z5 = b.op("Unsqueeze", [to_positions(b, layer.z, g, self.kg, self.positions), second_last],
                           "z_pairs")
            self.r5 = b.op("Unsqueeze", [to_positions(b, r, g, self.kg, self.positions), second_last], "R_pairs")
            self.w3 = transpose(reshape(layer.weight, (g, self.kg, self.jg)), (0, 2, 1))
        self.bias3 = None if layer.bias is None else layer.bias.reshape(self.groups, 1, self.kg)
        self.tensors: dict = {}

    def weight(self, kind: str, k: tuple[int, int]) -> str:
        """The weights ``w3`` of output channels ``k`` as ``kind``: ``"W"``, ``"abs"`` (``|w|``) or ``"log"``
        (``log |w|``, the semiring's zero where ``w = 0``): ops over the model's initializer (onnxruntime folds
        them), made once and shared by every chunk of positions."""
        key = (kind, k)
        if key not in self.tensors:
            b = self.ann.b
            w = {"W": self.w3, "abs": magnitude(self.w3), "log": log_magnitude(self.w3, self.ann.s.zero)}[kind]
            t = w.emit(b, f"W_{kind}")
            if k != (0, self.kg):
                t = b.op("Slice", [t, b.const([k[0]], "start", np.int64), b.const([k[1]], "end", np.int64),
                                   b.const([-1], "axes", np.int64)], f"W_{kind}")
            self.tensors[key] = t
        return self.tensors[key]

    def bias(self, bias: np.ndarray | None, log: bool) -> str | None:
        """``|b_k|`` (or ``log |b_k|``) of a chunk, for the max of Eq. 2.2.3 (a small constant)."""
        if bias is None:
            return None
        key = ("bias", log, bias.tobytes())
        if key not in self.tensors:
            self.tensors[key] = self.ann.b.const(self.ann.log_weights(bias) if log else
                                                 np.abs(bias).astype(np.float32), "bias_size")
        return self.tensors[key]

    def chunks(self):
        """Per chunk of output positions, its chunks of output channels: ``(cut, k, bias)`` with ``cut(t,
        per_output)`` the slicer of a pair-layout tensor, ``k`` the chunk's output channels and ``bias`` their
        bias."""
        b = self.ann.b
        per_position = self.groups * self.jg * self.kg
        step_a = max(1, CHUNK_PAIRS // per_position)
        step_k = self.kg if per_position <= CHUNK_PAIRS else max(1, CHUNK_PAIRS // (self.groups * self.jg))
        for a0 in range(0, self.positions, step_a):
            a = (a0, min(a0 + step_a, self.positions))
            row = []
            for k0 in range(0, self.kg, step_k):
                k = (k0, min(k0 + step_k, self.kg))
                bias = None if self.bias3 is None else self.bias3[..., k[0]:k[1]]
                row.append((chunk_of(b, a, k, self.positions, self.kg), k, bias))
            yield row

    def to_input(self, rows: list[str]) -> str:
        b, layer = self.ann.b, self.layer
        col = rows[0] if len(rows) == 1 else b.op("Concat", rows, "col", axis=1)  # [N, positions, G, J]
        if layer.kind == "dense":
            return b.op("Reshape", [col, b.op("Shape", [layer.x])], "R")
        col = b.op("Transpose", [col], "col", perm=[0, 2, 3, 1])  # [N, G, J, positions]
        cin, wd = self.groups * layer.weight.shape[1], layer.window
        col = b.op("Reshape", [col, b.const([0, cin, int(np.prod(wd.kernel)), *wd.out_spatial], "shape", np.int64)],
                   "col")
        return self.ann.scatter_taps(col, wd)


def general_linear(ann: Annotator, layer, r: str) -> str:
    """Eq. K-LRP over the explicit pairs of a dense layer or the unfolded receptive fields of a convolution."""
    b = ann.b
    pairs = PairLayout(ann, layer, r)
    inv_z5 = ann.inverse(pairs.z5) if not ann.needs_max() else None
    log_x5 = ann.log_abs(pairs.x5) if ann.needs_log() else None
    log_z5 = ann.log_abs(pairs.z5) if ann.s.annotation == "log-identity" else None
    rows = []
    for row in pairs.chunks():
        parts = []
        for cut, k, bias in row:
            c = b.op("Mul", [cut(pairs.x5, False), pairs.weight("W", k)], "c")
            pieces = {}
            if inv_z5 is not None:
                pieces["inv_z"] = cut(inv_z5, True)
            if log_x5 is not None:
                pieces["log_c"] = b.op("Add", [cut(log_x5, False), pairs.weight("log", k)], "log_c")
            if log_z5 is not None:
                pieces["log_z"] = cut(log_z5, True)
            if ann.needs_max():
                pieces.update(column_max(ann, c, pieces.get("log_c"), pairs.bias(bias, "log_c" in pieces),
                                         axis=-2))
            parts.append(ann.contract(ann.annotate(c, **pieces), cut(pairs.r5, True)))
        rows.append(ann.plus(parts))
    return pairs.to_input(rows)


def factorizes(ann: Annotator) -> bool:
    """Eq. 2.2.3's annotation with times = mul and plus in {max, sum}, or its log with max-plus."""
    s = ann.s
    return (s.annotation == "abs-normalized" and s.times == "mul" and s.plus in ("max", "sum")) or \
        (s.annotation == "log-abs-normalized" and (s.plus, s.times) == ("max", "add"))


def abs_normalized_linear(ann: Annotator, layer, r: str) -> str:
    """Eq. 2.2.3 with ``|a_j|`` taken out of the plus: ``R_j = |a_j| plus_k |w_jk| g_k`` with ``g_k = R_k /
    (m_k + 1e-9)`` and ``m_k = max(max_j |a_j w_jk|, |b_k|)`` (in log space ``R_j = log|a_j| + max_k (log|w_jk| +
    R_k - log(m_k + 1e-9))``): two passes over the pairs (a max-times product and its transpose) instead of the
    annotation's five. With plus = sum the transpose is a plain ``|W|^T g``."""
    b = ann.b
    log = ann.s.annotation.startswith("log-")
    combine = "Add" if log else "Mul"
    pairs = PairLayout(ann, layer, r)
    size = ann.log_abs(pairs.x5) if log else b.op("Abs", [pairs.x5], "abs_x")  # |a_j| or log |a_j|
    last = b.const([-1], "axes", np.int64)
    rows, scaled = [], []
    for row in pairs.chunks():
        parts, gs = [], []
        for cut, k, bias in row:
            w_size = pairs.weight("log" if log else "abs", k)
            m = ann.ctx.reduce("ReduceMax", b.op(combine, [cut(size, False), w_size], "c_size"), [-2], keepdims=1,
                               hint="max_c")
            if bias is not None:
                m = b.op("Max", [m, pairs.bias(bias, log)], "max_c")
            r_cut = cut(pairs.r5, True)
            g = b.op("Sub", [r_cut, ann.log_scale(m)], "g") if log else b.op("Mul", [r_cut, ann.scale(m)], "g")
            if ann.s.plus == "sum":
                gs.append(g)
            else:
                parts.append(ann.ctx.reduce("ReduceMax", b.op(combine, [w_size, g], "spread"), [-1], keepdims=0,
                                            hint="max_k"))
        if gs:
            scaled.append(gs[0] if len(gs) == 1 else b.op("Concat", gs, "g", axis=4))
            continue
        own = b.op("Squeeze", [row[0][0](size, False), last], "size")  # [N, chunk, G, J]
        rows.append(ann.clamp(b.op(combine, [own, ann.plus(parts)], "R")))
    if not scaled:
        return pairs.to_input(rows)
    # plus = sum: |a| * |W|^T g, with g back in the layer output's layout
    g = scaled[0] if len(scaled) == 1 else b.op("Concat", scaled, "g", axis=1)  # [N, positions, G, 1, Kg]
    g = b.op("Reshape", [b.op("Transpose", [g], "g", perm=[0, 2, 3, 4, 1]), b.op("Shape", [layer.z])], "g")
    return b.op("Mul", [b.op("Abs", [layer.x]), layer.transpose(b, g, magnitude(layer.weight), "W_abs")], "R")


def to_positions(b, t: str, groups: int, per_group: int, positions: int) -> str:
    """``[N, G * per_group, *spatial]`` (or ``[N, G * per_group * taps, *out]``) as ``[N, positions, G,
    per_group]``."""
    t = b.op("Reshape", [t, b.const([0, groups, per_group, positions], "shape", np.int64)], "grouped")
    return b.op("Transpose", [t], "by_position", perm=[0, 3, 1, 2])


def chunk_of(b, a: tuple[int, int], k: tuple[int, int], positions: int, kg: int):
    """Slicer for one chunk: output positions ``a`` (axis 1) and, for per-output tensors, channels ``k`` (axis
    4)."""
    def cut(t: str, per_output: bool) -> str:
        starts, ends, axes = [], [], []
        if a != (0, positions):
            starts, ends, axes = [a[0]], [a[1]], [1]
        if per_output and k != (0, kg):
            starts, ends, axes = starts + [k[0]], ends + [k[1]], axes + [4]
        if not axes:
            return t
        return b.op("Slice", [t, b.const(starts, "start", np.int64), b.const(ends, "end", np.int64),
                              b.const(axes, "axes", np.int64)], "chunk")
    return cut


def column_max(ann: Annotator, c: str, log_c: str | None, bias_size: str | None, axis) -> dict:
    """Eq. 2.2.3's normalization over ``j`` (``axis``; ``bias_size``: the constant ``|b_k|``, or ``log |b_k|``, that
    joins the max): ``inv_m`` or, for the log annotation, ``log_m``."""
    b = ann.b
    axes = axis if isinstance(axis, list) else [axis]
    if log_c is None:
        m = ann.ctx.reduce("ReduceMax", b.op("Abs", [c]), axes, keepdims=1, hint="max_c")
        if bias_size is not None:
            m = b.op("Max", [m, bias_size], "max_c")
        return {"inv_m": ann.scale(m)}
    lm = ann.ctx.reduce("ReduceMax", log_c, axes, keepdims=1, hint="log_max_c")
    if bias_size is not None:
        lm = b.op("Max", [lm, bias_size], "log_max_c")
    return {"log_m": ann.log_scale(lm)}


# ---------------------------------------------------------------- joins and pools

def join(ann: Annotator, node, r: str, on_path: list[int]) -> dict[int, str]:
    """A join ``z = u_0 + u_1 + ...`` (a Sub's second operand negated) with the LRP-0 coefficients of a join,
    ``d_ik = u_ik / z_k``: ``R_i = Theta(d_i) times R`` element-wise (broadcast operands are reduced with plus by
    the emitter)."""
    b, ctx = ann.b, ann.ctx
    operands = [ctx.value(name) for name in node.input]
    if node.op_type == "Sub":
        operands[1] = b.op("Neg", [operands[1]], "c")
    pieces: dict[str, str] = {}
    z = ctx.value(node.output[0])
    logs = [ann.log_abs(u) for u in operands] if ann.needs_log() else None
    if ann.s.base_annotation in ("threshold", "identity"):
        pieces["inv_z"] = ann.inverse(z)
    if ann.s.annotation == "log-identity":
        pieces["log_z"] = ann.log_abs(z)
    if ann.s.annotation == "abs-normalized":
        pieces["inv_m"] = ann.scale(b.op("Max", [b.op("Abs", [u]) for u in operands], "max_c"))
    if ann.s.annotation == "log-abs-normalized":
        pieces["log_m"] = ann.log_scale(b.op("Max", logs, "log_max_c"))
    shares = {}
    for i in on_path:
        log_c = {"log_c": logs[i]} if logs else {}
        shares[i] = ann.times(ann.annotate(operands[i], **pieces, **log_c), r)
    return shares


def window_average(ann: Annotator, view, r: str) -> str:
    """AveragePool as a convolution with equal weights ``1 / divisor`` (Eq. 4.1.2, generalized to any stride,
    overlap and padding): pairs (tap, output position), then the taps back with plus."""
    b = ann.b
    wd, channels = view.window, view.channels
    patches, _ = window_patches(b, view.x, wd, channels)  # [N, C, K, *out]
    weight = (1.0 / view.divisor)[None, None, None].astype(np.float32)
    c = b.op("Mul", [patches, b.const(weight, "inv_divisor")], "c")
    z = b.op("Unsqueeze", [view.y, b.const([2], "axes", np.int64)], "z")
    pieces = pool_pieces(ann, c, patches, weight, z, [2])
    col = ann.times(ann.annotate(c, **pieces), b.op("Unsqueeze", [r, b.const([2], "axes", np.int64)], "R"))
    return ann.scatter_taps(col, wd)


def axes_average(ann: Annotator, view, r: str) -> str:
    """GlobalAveragePool / ReduceMean: every input neuron has one output, ``c = x / count``, no plus needed."""
    b = ann.b
    weight = np.float32(1.0 / view.count)
    c = b.op("Mul", [view.x, b.const(weight, "inv_count")], "c")
    z, r_full = view.y, r
    if not view.keepdims:
        axes = b.const(view.axes, "axes", np.int64)
        z, r_full = b.op("Unsqueeze", [z, axes], "z"), b.op("Unsqueeze", [r, axes], "R")
    pieces = pool_pieces(ann, c, view.x, weight, z, view.axes)
    return ann.times(ann.annotate(c, **pieces), r_full)


def pool_pieces(ann: Annotator, c: str, x: str, weight, z: str, axes: list[int]) -> dict:
    pieces = {}
    if ann.s.base_annotation in ("threshold", "identity"):
        pieces["inv_z"] = ann.inverse(z)
    if ann.needs_log():
        pieces["log_c"] = ann.b.op("Add", [ann.log_abs(x), ann.b.const(np.log(weight).astype(np.float32))],
                                   "log_c")
    if ann.s.annotation == "log-identity":
        pieces["log_z"] = ann.log_abs(z)
    if ann.needs_max():
        pieces.update(column_max(ann, c, pieces.get("log_c"), None, axes))
    return pieces


def window_max(ann: Annotator, view, r: str) -> str:
    """MaxPool, winner-take-all: each window's relevance to its first arg-max (``Theta = one`` there, ``zero`` at
    the other taps), overlapping windows added with plus."""
    b = ann.b
    wd, channels = view.window, view.channels
    patches, _ = window_patches(b, view.x, wd, channels)
    valid = tap_validity(wd)[None, None]
    if not valid.all():
        patches = b.op("Add", [patches, b.const(np.where(valid, 0.0, -np.inf), "padded_taps")], "patches")
    winner = first_max_taps(b, patches, 2, int(np.prod(wd.kernel)), wd.rank)
    col = b.op("Where", [winner, b.op("Unsqueeze", [r, b.const([2], "axes", np.int64)], "R"),
                         ann.relevance_const(ann.s.zero, "zero")], "routed")
    return ann.scatter_taps(col, wd)


def global_max(ann: Annotator, view, r: str) -> str:
    """GlobalMaxPool: each channel's relevance to its first arg-max."""
    b, ctx = ann.b, ann.ctx
    flat = b.op("Reshape", [view.x, b.const([0, 0, -1], "shape", np.int64)], "x")
    area = int(np.prod(ctx.shapes[view.node.input[0]][2:]))
    winner = first_max_taps(b, flat, 2, area, 0)
    r = b.op("Reshape", [r, b.const([0, 0, 1], "shape", np.int64)], "R")
    routed = b.op("Where", [winner, r, ann.relevance_const(ann.s.zero, "zero")], "routed")
    return b.op("Reshape", [routed, b.op("Shape", [view.x])], "R")
