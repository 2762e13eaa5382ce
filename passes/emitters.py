"""Backward emitters: one per op type, registered like JAX transpose rules.

An emitter receives the relevance of its node's output(s) and returns the relevance of each data input
(``{input index: tensor name}``). ``ctx.rlrp`` selects R-LRP's treatment where it differs from the classic rules
(pooling by Prop. 13, joins by Prop. 14). An optional check explains, before anything is emitted, why a node
cannot be handled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxlrp.errors import UnsupportedOpError
from onnxlrp.graph import data_input_indices
from onnxlrp.layers import Window
from onnxlrp.rules import (
    STABILIZER,
    divide_behind_relu,
    divide_relevance,
    factors_of,
    mul,
    product,
    times_relative,
)


@dataclass
class Backward:
    emit: Callable
    check: Callable | None = None


BACKWARD: dict[str, Backward] = {}


def backward(*op_types: str, check: Callable | None = None):
    """Register an emitter ``fn(ctx, node, r_out) -> {input index: relevance}`` for ``op_types``."""
    def register(fn):
        for op in op_types:
            BACKWARD[op] = Backward(fn, check)
        return fn
    return register


def unsupported_reason(ctx, node: onnx.NodeProto) -> str | None:
    """Why ``node`` cannot carry relevance, or None when it can."""
    entry = BACKWARD.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if entry is None:
        return "no relevance rule for this op"
    return entry.check(ctx, node) if entry.check else None


def lookup(ctx, node: onnx.NodeProto) -> Backward:
    """The emitter for ``node``; raises with the node's name and op when there is none."""
    reason = unsupported_reason(ctx, node)
    if reason:
        raise UnsupportedOpError(f"node {node.name!r} ({node.op_type}): {reason}")
    return BACKWARD[node.op_type]


# ---------------------------------------------------------------- helpers

def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def path_inputs(ctx, node) -> list[int]:
    """Indices of the node's inputs that carry relevance."""
    return [i for i in data_input_indices(node) if node.input[i] in ctx.tensors]


def unbroadcast(ctx, r: str, to: str, frm: str) -> str:
    """Sum relevance over the axes along which ``to`` was broadcast to ``frm``'s shape."""
    b = ctx.b
    si, so = ctx.shapes.get(to), ctx.shapes.get(frm)
    if si is None or so is None or si == so:
        return r
    lead = len(so) - len(si)
    axes = list(range(lead)) + [lead + a for a, d in enumerate(si) if d == 1 and so[lead + a] != 1]
    if axes:
        r = b.op("ReduceSum", [r, b.const(axes, "axes", np.int64)], "unbroadcast", keepdims=1)
    if lead:
        r = b.op("Reshape", [r, b.op("Shape", [to])], "unbroadcast")
    return r


def reshape_like(ctx, r: str, like: str) -> str:
    b = ctx.b
    return b.op("Reshape", [r, b.op("Shape", [like])], "R")


def float_mask(b, condition: str) -> str:
    return b.op("Cast", [condition], "mask", to=onnx.TensorProto.FLOAT)


# ---------------------------------------------------------------- pass-through ops

PASS_THROUGH = ("BatchNormalization", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Elu", "Selu", "Celu",
                "Gelu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "LRN", "Dropout",
                "Identity", "Neg", "Erf", "Cast")


@backward(*PASS_THROUGH)
def pass_through(ctx, node, r_out):
    """Activations and element-wise maps: relevance passes unchanged (Zennit's Pass rule). A BatchNormalization
    after a linear layer is folded into that layer's rule; any other is a per-channel affine map and passes."""
    return {0: r_out[0]}


# ---------------------------------------------------------------- linear layers

def check_linear(ctx, node):
    if node.name not in ctx.layers:
        return "only supported with a constant weight (after constant folding)"
    layer = ctx.layers[node.name]
    if layer.kind == "conv" and layer.window is None:
        return "needs static spatial input dims (give --input-shape)"
    return None


@backward("Conv", "Gemm", "MatMul", check=check_linear)
def linear(ctx, node, r_out):
    """Conv, Gemm, MatMul with a constant weight: the planned rule (R-LRP: Eq. 8 / Eq. 12)."""
    b = ctx.b
    layer = ctx.layers[node.name]
    r_in = ctx.keep_in_range(ctx.plan[node.name].relevance(b, layer, r_out[0]), r_out[0])
    if layer.transpose_x:  # Gemm transA=1 reads x^T: the layer sees x^T (batch first), R goes back to x's layout
        r_in = b.op("Transpose", [r_in], "R", perm=[1, 0])
    return {0: r_in}


# ---------------------------------------------------------------- element-wise arithmetic and joins

def check_arith(ctx, node):
    on_path = path_inputs(ctx, node)
    if node.op_type in ("Mul", "Div") and len(on_path) > 1:
        return "a product of two relevance-carrying tensors has no LRP rule"
    if node.op_type == "Div" and on_path == [1]:
        return "division by a relevance-carrying tensor has no LRP rule"
    return None


@backward("Add", "Sub", "Mul", "Div", "Sum", check=check_arith)
def arithmetic(ctx, node, r_out):
    """With one relevance input (the others constant) relevance maps back unchanged. Add/Sum/Sub joining several
    relevance inputs: classic rules split ``R`` by contribution (Zennit's Norm rule, ``x_k * R / stab(z)``);
    R-LRP gives each branch the full relevance of the join (Prop. 14), normalized later at the fork."""
    b = ctx.b
    r = r_out[0]
    on_path = path_inputs(ctx, node)
    if len(on_path) == 1:
        i = on_path[0]
        return {i: unbroadcast(ctx, r, node.input[i], node.output[0])}
    negated = {i for i in on_path if node.op_type == "Sub" and i == 1}
    if ctx.rlrp:
        shares = {i: b.op("Neg", [r], "R") if i in negated else r for i in on_path}
    else:
        y = ctx.relu_behind(node.output[0])
        s = divide_behind_relu(b, r, y, STABILIZER) if y else \
            divide_relevance(b, r, ctx.value(node.output[0]), STABILIZER)
        operands = {i: ctx.value(node.input[i]) for i in on_path}
        if y:
            operands.update(ctx.join_stand_in(node, y))
        shares = {i: product(b, operands[i], s) for i in on_path}
        shares = {i: b.op("Neg", [v], "R") if i in negated else v for i, v in shares.items()}
    out = {i: unbroadcast(ctx, v, node.input[i], node.output[0]) for i, v in shares.items()}
    for i, v in out.items():
        ctx.record_join_share(node, i, v)
    return out


# ---------------------------------------------------------------- re-indexing ops

@backward("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape(ctx, node, r_out):
    return {0: reshape_like(ctx, r_out[0], node.input[0])}


def check_transpose(ctx, node):
    return None if attr(node, "perm") is not None or ctx.shapes.get(node.input[0]) else "needs a known rank"


@backward("Transpose", check=check_transpose)
def transpose(ctx, node, r_out):
    perm = attr(node, "perm") or list(reversed(range(len(ctx.shapes[node.input[0]]))))
    return {0: ctx.b.op("Transpose", [r_out[0]], "R", perm=[int(p) for p in np.argsort(perm)])}


def check_concat(ctx, node):
    axis = attr(node, "axis")
    for name in node.input:
        shape = ctx.shapes.get(name)
        if not shape or shape[axis] is None:
            return f"input {name!r} needs a static size along axis {axis}"
    return None


@backward("Concat", check=check_concat)
def concat(ctx, node, r_out):
    """Each input gets its slice of the relevance (for R-LRP, a join of branches normalized at the fork)."""
    b = ctx.b
    axis = attr(node, "axis")
    on_path = path_inputs(ctx, node)
    out, start = {}, 0
    for i, name in enumerate(node.input):
        size = ctx.shapes[name][axis]
        if i in on_path:
            out[i] = b.op("Slice", [r_out[0], b.const([start], "start", np.int64),
                                    b.const([start + size], "end", np.int64), b.const([axis], "axis", np.int64)],
                          "R")
            ctx.record_join_share(node, i, out[i])
        start += size
    return out


@backward("Split")
def split(ctx, node, r_out):
    """Concatenate the outputs' relevance (zeros for outputs that carry none)."""
    b = ctx.b
    parts = [r if r is not None else b.op("ConstantOfShape", [b.op("Shape", [o])], "zeros")
             for r, o in zip(r_out, node.output, strict=True)]
    return {0: b.op("Concat", parts, "R", axis=attr(node, "axis", 0))}


def slice_params(ctx, node):
    names = list(node.input[1:5])
    values = [ctx.constants.get(n) if n else None for n in names]
    if any(n and v is None for n, v in zip(names, values, strict=True)):
        return None
    starts, ends = values[0], values[1]
    axes = values[2] if len(values) > 2 and values[2] is not None else np.arange(len(starts))
    steps = values[3] if len(values) > 3 and values[3] is not None else np.ones(len(starts), dtype=np.int64)
    return starts, ends, axes, steps


def check_slice(ctx, node):
    shape, params = ctx.shapes.get(node.input[0]), slice_params(ctx, node)
    if shape is None or params is None:
        return "needs constant starts/ends/axes/steps and a known input shape"
    if np.any(params[3] != 1):
        return "slices with steps other than 1 are not supported"
    if any(shape[int(a)] is None for a in params[2]):
        return "needs static sizes along the sliced axes"
    return None


@backward("Slice", check=check_slice)
def slice_(ctx, node, r_out):
    """Pad the relevance back with zeros to the input's extent."""
    shape = ctx.shapes[node.input[0]]
    rank = len(shape)
    starts, ends, axes, _ = slice_params(ctx, node)
    pads = [0] * (2 * rank)
    for s, e, a in zip(starts, ends, axes, strict=True):
        a = int(a) % rank
        dim = shape[a]
        s = int(np.clip(s + dim if s < 0 else s, 0, dim))
        e = int(np.clip(e + dim if e < 0 else e, 0, dim))
        pads[a], pads[a + rank] = s, dim - max(e, s)
    b = ctx.b
    return {0: b.op("Pad", [r_out[0], b.const(pads, "pads", np.int64)], "R")}


def check_pad(ctx, node):
    if attr(node, "mode", "constant") != "constant":
        return "only constant padding maps relevance back"
    if ctx.constants.get(node.input[1]) is None:
        return "needs constant pads"
    if len(node.input) > 3 and node.input[3]:
        return "pads with an axes input are not supported"
    return None


@backward("Pad", check=check_pad)
def pad(ctx, node, r_out):
    """Crop the padding off the relevance."""
    b = ctx.b
    pads = ctx.constants[node.input[1]].astype(np.int64)
    rank = len(pads) // 2
    ends = [-int(p) if p > 0 else np.iinfo(np.int64).max for p in pads[rank:]]
    return {0: b.op("Slice", [r_out[0], b.const(pads[:rank], "start", np.int64), b.const(ends, "end", np.int64),
                              b.const(list(range(rank)), "axes", np.int64)], "R")}


# ---------------------------------------------------------------- pooling

def explicit_pads(auto_pad, pads, in_sp, kernel, strides, dilations) -> list[int]:
    """Explicit begin/end pads for any ``auto_pad`` setting."""
    r = len(kernel)
    if auto_pad in ("NOTSET", ""):
        return list(pads) if pads else [0] * 2 * r
    if auto_pad == "VALID":
        return [0] * 2 * r
    begin, end = [], []
    for a in range(r):
        out = -(-in_sp[a] // strides[a])
        total = max((out - 1) * strides[a] + dilations[a] * (kernel[a] - 1) + 1 - in_sp[a], 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end


def pool_window(ctx, node, *, with_ceil: bool = True) -> Window | None:
    """Window geometry of a pooling node; ceil_mode windows become extra end padding (``with_ceil``)."""
    x_shape, y_shape = ctx.shapes.get(node.input[0]), ctx.shapes.get(node.output[0])
    if not x_shape or not y_shape or any(d is None for d in x_shape[1:] + y_shape[1:]):
        return None
    kernel = list(attr(node, "kernel_shape"))
    r = len(kernel)
    strides = list(attr(node, "strides", [1] * r))
    dilations = list(attr(node, "dilations", [1] * r))
    in_sp, out_sp = x_shape[2:], y_shape[2:]
    pads = explicit_pads(attr(node, "auto_pad", "NOTSET"), attr(node, "pads"), in_sp, kernel, strides, dilations)
    if with_ceil:
        for a in range(r):
            reach = (out_sp[a] - 1) * strides[a] + dilations[a] * (kernel[a] - 1) + 1
            pads[a + r] += max(reach - (in_sp[a] + pads[a] + pads[a + r]), 0)
    return Window(in_sp, out_sp, kernel, strides, pads, dilations)


def check_pool(ctx, node):
    if pool_window(ctx, node) is None:
        return "needs static input and output shapes (give --input-shape)"
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1] in ctx.tensors:
        return "the Indices output carries no relevance"
    return None


def rlrp_pool_factor(window: Window, channels: int) -> np.ndarray:
    """Prop. 13 with Eq. 12: ``Card(J_i) / (N^(l+1) * P1*P2)``, one output channel per input channel."""
    n_out = channels * int(np.prod(window.out_spatial))
    return (window.cover_count() / (n_out * int(np.prod(window.kernel))))[None]


@backward("AveragePool", check=check_pool)
def average_pool(ctx, node, r_out):
    """A depthwise convolution with weights ``1/divisor``. Classic: Norm rule ``x * W^T (R / stab(z))``.
    R-LRP (Prop. 13): Eq. 12 with the pool's mask, ``Card(J)/(N P1P2) * x * W^T R``."""
    b = ctx.b
    x, y = ctx.value(node.input[0]), ctx.value(node.output[0])
    wd = pool_window(ctx, node)
    channels = ctx.shapes[node.input[0]][1]
    include_pad = bool(attr(node, "count_include_pad", 0))
    divisor = pool_window(ctx, node, with_ceil=False).valid_count(include_pad=include_pad)
    ones = np.ones([channels, 1, *wd.kernel], dtype=np.float32)
    g = r_out[0] if ctx.rlrp else divide_relevance(b, r_out[0], y, STABILIZER)
    g = mul(b, g, b.const((1.0 / divisor)[None], "inv_divisor"))
    weighted = wd.conv_transpose(b, g, b.const(ones, "ones_kernel"), channels, "WTg")
    if ctx.rlrp:
        return {0: ctx.keep_in_range(times_relative(b, mul(b, x, weighted), rlrp_pool_factor(wd, channels)),
                                     r_out[0])}
    return {0: product(b, x, weighted)}


def tap_validity(wd: Window) -> np.ndarray:
    """[K, *out]: True where window tap k of output j reads a real input element, not padding."""
    r = wd.rank
    valid = None
    for a in range(r):
        j = np.arange(wd.out_spatial[a])[None]
        t = np.arange(wd.kernel[a])[:, None]
        i = j * wd.strides[a] - wd.pads[a] + t * wd.dilations[a]
        axis_valid = (i >= 0) & (i < wd.in_spatial[a])  # [k_a, out_a]
        valid = axis_valid if valid is None else np.multiply.outer(valid, axis_valid).astype(bool)
    order = [2 * a for a in range(r)] + [2 * a + 1 for a in range(r)]  # (k0, out0, k1, out1) -> taps first
    return valid.transpose(order).reshape(int(np.prod(wd.kernel)), *wd.out_spatial)


@backward("MaxPool", check=check_pool)
def max_pool(ctx, node, r_out):
    """Classic rules: winner-take-all to the first arg-max of each window (as the gradient routes it); overlapping
    windows add up (:func:`route_to_winners`). R-LRP (Prop. 13): a convolution whose mask is 1 at every arg-max
    (ties: all), times ``Card(J)/(N P1P2) * x``."""
    b = ctx.b
    x, y, r = ctx.value(node.input[0]), ctx.value(node.output[0]), r_out[0]
    wd = pool_window(ctx, node)
    channels = ctx.shapes[node.input[0]][1]
    if ctx.rlrp:
        patches, kernel = window_patches(b, x, wd, channels)
        is_max = b.op("Equal", [patches, b.op("Unsqueeze", [y, b.const([2], "axes", np.int64)], "y")])
        is_max = b.op("And", [is_max, b.const(tap_validity(wd)[None, None], "valid_taps", np.bool_)])
        routed = mul(b, float_mask(b, is_max), b.op("Unsqueeze", [r, b.const([2], "axes", np.int64)], "R"))
        r_in = scatter_windows(b, routed, wd, channels, kernel)
        return {0: ctx.keep_in_range(times_relative(b, mul(b, x, r_in), rlrp_pool_factor(wd, channels)), r)}
    route = route_to_winners(b, x, wd, channels)
    factors = factors_of(b, r, y)
    if factors is None:
        return {0: route(r)}
    # r = y * c, and the winner's input is y: the routed relevance is x * route(c) (drop_unread keeps one of the two)
    r_in = route(r)
    b.products[r_in] = (x, route(factors[1]))
    return {0: r_in}


def route_to_winners(b, x: str, wd: Window, channels: int):
    """Windows extracted by a one-hot depthwise convolution (``[N, C, K, *out]``, padded taps set to ``-inf`` so
    that they never win), a 0/1 mask of each window's first maximum, and the transposed convolution that adds each
    window's relevance at its winner (overlapping windows add up)."""
    patches, kernel = window_patches(b, x, wd, channels)
    valid = tap_validity(wd)[None, None]
    if not valid.all():
        patches = b.op("Add", [patches, b.const(np.where(valid, 0.0, -np.inf), "padded_taps")], "patches")
    is_winner = float_mask(b, first_max_taps(b, patches, 2, int(np.prod(wd.kernel)), wd.rank))
    axes = b.const([2], "axes", np.int64)

    def route(v: str) -> str:
        return scatter_windows(b, mul(b, is_winner, b.op("Unsqueeze", [v, axes], "R")), wd, channels, kernel)
    return route


def first_max_taps(b, windows: str, axis: int, k: int, after: int) -> str:
    """Boolean mask of the first maximum of each window, whose ``k`` taps (in row-major order) lie along ``axis``
    of ``windows``, followed by ``after`` axes: ArgMax keeps the first of equal maxima (the arg-max the gradient
    picks)."""
    winner = b.op("ArgMax", [windows], "winner", axis=axis, keepdims=1, select_last_index=0)
    index = np.arange(k).reshape([1] * axis + [k] + [1] * after)
    return b.op("Equal", [winner, b.const(index, "tap_index", np.int64)], "winner")


def window_patches(b, x: str, wd: Window, channels: int) -> tuple[str, str]:
    """The windows of ``x`` as ``[N, C, K, *out]`` (zero at padded taps), and the one-hot kernel that made them."""
    k = int(np.prod(wd.kernel))
    taps = np.eye(k, dtype=np.float32).reshape(k, 1, *wd.kernel)
    kernel = b.const(np.tile(taps, (channels,) + (1,) * (taps.ndim - 1)), "onehot_kernel")
    patches = b.op("Conv", [x, kernel], "patches", strides=wd.strides, pads=wd.pads, dilations=wd.dilations,
                   group=channels)
    return b.op("Reshape", [patches, b.const([0, channels, k, *wd.out_spatial], "shape", np.int64)], "patches"), kernel


def scatter_windows(b, routed: str, wd: Window, channels: int, kernel: str) -> str:
    """``[N, C, K, *out]`` window values added back at their input positions (the one-hot kernel transposed)."""
    k = int(np.prod(wd.kernel))
    routed = b.op("Reshape", [routed, b.const([0, channels * k, *wd.out_spatial], "shape", np.int64)], "R")
    return wd.conv_transpose(b, routed, kernel, channels, "R")


def check_global(ctx, node):
    shape = ctx.shapes.get(node.input[0])
    if not shape or any(d is None for d in shape[1:]):
        return "needs static channel and spatial dims"
    return None


@backward("GlobalAveragePool", check=check_global)
def global_average_pool(ctx, node, r_out):
    """Mean over space. Classic: Norm rule ``x * R / (stab(z) HW)``. R-LRP: full window, ``Card(J) = 1``,
    ``N = C``, ``P = HW``: ``x * R / (C HW HW)``."""
    b = ctx.b
    shape = ctx.shapes[node.input[0]]
    area = int(np.prod(shape[2:]))
    if ctx.rlrp:  # the constant 1 / (C HW HW) is uniform: R-LRP drops it (see times_relative)
        return {0: ctx.keep_in_range(mul(b, ctx.value(node.input[0]), r_out[0]), r_out[0])}
    g = divide_relevance(b, r_out[0], ctx.value(node.output[0]), STABILIZER)
    return {0: product(b, ctx.value(node.input[0]), mul(b, g, b.const(1.0 / area, "scale")))}


def reduce_axes(ctx, node) -> list[int] | None:
    rank = len(ctx.shapes[node.input[0]])
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.constants.get(node.input[1])
        if axes is None:
            return None
    if axes is None or len(axes) == 0:
        return list(range(rank))
    return sorted(int(a) % rank for a in axes)


def check_reduce_mean(ctx, node):
    reason = check_global(ctx, node)
    if reason:
        return reason
    axes = reduce_axes(ctx, node)
    if axes is None:
        return "needs constant axes"
    return "a mean over the batch axis mixes samples" if 0 in axes else None


@backward("ReduceMean", check=check_reduce_mean)
def reduce_mean(ctx, node, r_out):
    """A mean over axes, handled like GlobalAveragePool over those axes."""
    b = ctx.b
    shape = ctx.shapes[node.input[0]]
    axes = reduce_axes(ctx, node)
    count = int(np.prod([shape[a] for a in axes]))
    g = r_out[0] if ctx.rlrp else divide_relevance(b, r_out[0], ctx.value(node.output[0]), STABILIZER)
    if not attr(node, "keepdims", 1):
        g = b.op("Unsqueeze", [g, b.const(axes, "axes", np.int64)], "R")
    if ctx.rlrp:  # the constant 1 / (N count count) is uniform: R-LRP drops it (see times_relative)
        return {0: ctx.keep_in_range(mul(b, ctx.value(node.input[0]), g), r_out[0])}
    return {0: product(b, ctx.value(node.input[0]), mul(b, g, b.const(1.0 / count, "scale")))}


@backward("GlobalMaxPool", check=check_global)
def global_max_pool(ctx, node, r_out):
    """Classic: a channel's relevance goes to its first arg-max. R-LRP: to every arg-max, times ``x / (C HW)``."""
    b = ctx.b
    x = ctx.value(node.input[0])
    flat = b.op("Reshape", [x, b.const([0, 0, -1], "shape", np.int64)], "x")
    r = b.op("Reshape", [r_out[0], b.const([0, 0, 1], "shape", np.int64)], "R")
    if not ctx.rlrp:
        area = int(np.prod(ctx.shapes[node.input[0]][2:]))
        return {0: reshape_like(ctx, mul(b, float_mask(b, first_max_taps(b, flat, 2, area, 0)), r), x)}
    y = b.op("Reshape", [ctx.value(node.output[0]), b.const([0, 0, 1], "shape", np.int64)], "y")
    r_in = reshape_like(ctx, mul(b, float_mask(b, b.op("Equal", [flat, y])), r), x)
    # the constant 1 / (C HW) is uniform: R-LRP drops it (see times_relative)
    return {0: ctx.keep_in_range(mul(b, x, r_in), r_out[0])}
