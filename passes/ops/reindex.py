"""Re-indexing ops: relevance goes back to the input element each output element was read from."""

from __future__ import annotations

import numpy as np
import onnx

from .helpers import attr, path_inputs, reshape_like
from .registry import backward


@backward("Flatten", "Reshape", "Squeeze", "Unsqueeze", data_inputs=(0,), shape_only=True, nonnegative="first",
          zero_preserving=True)
def reshape(ctx, node, r_out):
    """The relevance in the input's shape: a Squeeze undoes an Unsqueeze and the reverse (constant axes, opset 13),
    anything else is a Reshape like the input (:func:`reshape_like`)."""
    axes = ctx.constants.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    inverse = {"Unsqueeze": "Squeeze", "Squeeze": "Unsqueeze"}.get(node.op_type)
    if inverse and axes is not None:
        return {0: ctx.b.op(inverse, [r_out[0], ctx.b.const(axes, "axes", np.int64)], "R")}
    return {0: reshape_like(ctx, r_out[0], node.input[0], node.output[0])}


def check_transpose(ctx, node):
    return None if attr(node, "perm") is not None or ctx.shapes.get(node.input[0]) else "needs a known rank"


@backward("Transpose", nonnegative="first", zero_preserving=True, check=check_transpose)
def transpose(ctx, node, r_out):
    perm = attr(node, "perm") or list(reversed(range(len(ctx.shapes[node.input[0]]))))
    return {0: ctx.b.op("Transpose", [r_out[0]], "R", perm=[int(p) for p in np.argsort(perm)])}


def check_concat(ctx, node):
    for name in node.input:
        if not ctx.shapes.get(name):
            return f"input {name!r} needs a known rank"
    return None


def run_time_size(ctx, name: str, axis: int) -> str:
    """``Shape(name)[axis]`` as a one-element int64 tensor."""
    b = ctx.b
    return b.op("Gather", [b.op("Shape", [name]), b.const([axis], "axis", np.int64)], "size")


@backward("Concat", join=True, nonnegative="all", zero_preserving=True, check=check_concat)
def concat(ctx, node, r_out):
    """Each input gets its slice of the relevance (for R-LRP, a join of branches normalized at the fork). The slice
    bounds are constants when every input's size along the axis is static, else read from the inputs' shapes at run
    time (TorchScript exports that compute sizes with Shape ops)."""
    b = ctx.b
    axis = attr(node, "axis")
    on_path = path_inputs(ctx, node)
    sizes = [ctx.shapes[name][axis] for name in node.input]
    static = None not in sizes
    out = {}
    start = 0 if static else b.const([0], "start", np.int64)
    for i, name in enumerate(node.input):
        if static:
            begin, end = b.const([start], "start", np.int64), b.const([start + sizes[i]], "end", np.int64)
        else:
            begin, end = start, b.op("Add", [start, run_time_size(ctx, name, axis)], "end")
        if i in on_path:
            out[i] = b.op("Slice", [r_out[0], begin, end, b.const([axis], "axis", np.int64)], "R")
            ctx.join_shares[(node.name, i)] = out[i]
        start = start + sizes[i] if static else end
    return out


@backward("Split", data_inputs=(0,), nonnegative="first", zero_preserving=True)
def split(ctx, node, r_out):
    """Concatenate the outputs' relevance (the algebra's zero for outputs that carry none)."""
    b = ctx.b
    parts = [r if r is not None else ctx.zeros_like(o) for r, o in zip(r_out, node.output, strict=True)]
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
    if shape is None:
        return "needs a known input rank"
    if params is None:
        names = list(node.input[3:5]) + ["", ""]
        axes, steps = (ctx.constants.get(n) if n else None for n in names[:2])
        if (names[0] and axes is None) or (names[1] and (steps is None or np.any(steps != 1))):
            return "needs constant axes and steps of 1 (starts and ends may be computed at run time)"
        if not names[0] and not (ctx.shapes.get(node.input[1]) or [None])[0]:
            return "needs constant axes or a starts input of known length"
        return None
    if np.any(params[3] != 1) and any(shape[int(a) % len(shape)] is None for a in params[2]):
        return "slices with steps other than 1 need static sizes along the sliced axes"
    return None


def copy_matrix(sources: np.ndarray, size: int) -> np.ndarray:
    """``[len(sources), size]``: row ``j`` is 1 at ``sources[j]``, the input index that output ``j`` copies. Its
    transpose adds up, per input index, the relevance of every output that copies it."""
    matrix = np.zeros((len(sources), size), dtype=np.float32)
    matrix[np.arange(len(sources)), sources] = 1
    return matrix


def copy_back(ctx, r: str, maps: dict[int, np.ndarray], rank: int) -> str:
    """Relevance of a re-indexing ``y[.., j, ..] = x[.., src_a(j), ..]`` (separable, per axis ``a``) sent back to
    ``x``: along each axis, the transposed 0/1 copy matrix (an Einsum), so an input element copied several times (a
    reflect or edge pad) gets the sum of its copies' relevance and one never copied gets 0."""
    b = ctx.b
    letters = "abcdefghijklmnopqrstuvwxyz"[:rank]
    for axis, matrix in maps.items():
        out = letters.replace(letters[axis], "Z")
        equation = f"{letters},{letters[axis]}Z->{out}"
        r = b.op("Einsum", [r, b.const(matrix, "copy_matrix")], "R", equation=equation)
    return r


def slice_sources(start, end, step, dim: int) -> np.ndarray:
    """The input indices a Slice reads along one axis (ONNX's clamping rules, negative steps included)."""
    return np.arange(dim)[slice(*normalized_slice(int(start), int(end), int(step), dim))]


def normalized_slice(start: int, end: int, step: int, dim: int) -> tuple[int, int | None, int]:
    """Python slice bounds equivalent to ONNX Slice's (negative indices count from the end, then clamp to
    ``[0, dim]`` for positive steps and ``[-1, dim - 1]`` for negative ones)."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return int(np.clip(start, 0, dim)), int(np.clip(end, 0, dim)), step
    start, end = int(np.clip(start, -1, dim - 1)), int(np.clip(end, -1, dim - 1))
    return start, (None if end < 0 else end), step


@backward("Slice", data_inputs=(0,), nonnegative="first", zero_preserving=True, check=check_slice)
def slice_(ctx, node, r_out):
    """Step 1: pad the relevance back with the algebra's zero to the input's extent (the pads computed at run time
    when the bounds or the sliced sizes are known only then). Other steps (negative too): each input element read
    gets the relevance of its output element, the others 0 (:func:`copy_back`)."""
    shape = ctx.shapes[node.input[0]]
    rank = len(shape)
    params = slice_params(ctx, node)
    if params is None or (np.all(params[3] == 1) and any(shape[int(a) % rank] is None for a in params[2])):
        return {0: slice_at_run_time(ctx, node, r_out[0])}
    starts, ends, axes, steps = params
    if np.any(steps != 1):
        maps = {int(a) % rank: copy_matrix(slice_sources(s, e, t, shape[int(a) % rank]), shape[int(a) % rank])
                for s, e, a, t in zip(starts, ends, axes, steps, strict=True)}
        return {0: copy_back(ctx, r_out[0], maps, rank)}
    pads = [0] * (2 * rank)
    for s, e, a in zip(starts, ends, axes, strict=True):
        a = int(a) % rank
        dim = shape[a]
        s = int(np.clip(s + dim if s < 0 else s, 0, dim))
        e = int(np.clip(e + dim if e < 0 else e, 0, dim))
        pads[a], pads[a + rank] = s, dim - max(e, s)
    return {0: ctx.pad_with_zero(r_out[0], pads)}


def slice_at_run_time(ctx, node, r: str) -> str:
    """Pad by ``[start, dim - end]`` along each sliced axis, with ``start`` and ``end`` clamped to ``[0, dim]`` as
    Slice clamps them (negative bounds count from the end), all computed from the run-time shape and bounds."""
    b = ctx.b
    x = node.input[0]
    rank = len(ctx.shapes[x])
    axes = ctx.constants.get(node.input[3]) if len(node.input) > 3 and node.input[3] else \
        np.arange(ctx.shapes[node.input[1]][0])
    shape = b.op("Shape", [x])
    zero = b.const([0], "zero_i", np.int64)
    starts, ends = (b.op("Cast", [node.input[k]], "bound", to=onnx.TensorProto.INT64) for k in (1, 2))
    before, after = [zero] * rank, [zero] * rank

    def clamp(bound, dim):
        wrapped = b.op("Where", [b.op("Less", [bound, zero]), b.op("Add", [bound, dim]), bound], "bound")
        return b.op("Min", [b.op("Max", [wrapped, zero]), dim], "bound")

    for k, a in enumerate(int(a) % rank for a in axes):
        index = b.const([k], "k", np.int64)
        dim = b.op("Gather", [shape, b.const([a], "axis", np.int64)], "dim")
        start = clamp(b.op("Gather", [starts, index], "start"), dim)
        end = b.op("Max", [clamp(b.op("Gather", [ends, index], "end"), dim), start], "end")
        before[a], after[a] = start, b.op("Sub", [dim, end], "pad_end")
    inputs = [r, b.op("Concat", before + after, "pads", axis=0)]
    if ctx.algebra.zero != 0:
        inputs.append(b.const(ctx.algebra.zero, "zero"))
    return b.op("Pad", inputs, "R")


def pad_amounts(ctx, node) -> list[int] | None:
    """Begin and end pads per axis of the input (``[b_0, .., b_{r-1}, e_0, .., e_{r-1}]``), with opset 18's axes."""
    pads = ctx.constants.get(node.input[1])
    shape = ctx.shapes.get(node.input[0])
    if pads is None or shape is None:
        return None
    pads = [int(p) for p in pads]
    rank = len(shape)
    if len(node.input) > 3 and node.input[3]:
        axes = ctx.constants.get(node.input[3])
        if axes is None:
            return None
        full = [0] * (2 * rank)
        k = len(axes)
        for i, a in enumerate(int(a) % rank for a in axes):
            full[a], full[a + rank] = pads[i], pads[i + k]
        return full
    return pads


def check_pad(ctx, node):
    pads = pad_amounts(ctx, node)
    if pads is None:
        return "needs constant pads (and axes) and a known input rank"
    mode = attr(node, "mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        return f"unknown pad mode {mode!r}"
    shape = ctx.shapes[node.input[0]]
    rank = len(shape)
    if mode != "constant" and any(shape[a] is None for a in range(rank) if pads[a] or pads[a + rank]):
        return f"{mode} padding needs static sizes along the padded axes"
    if any(p < 0 for p in pads) and mode != "constant":
        return "negative pads are only supported in constant mode"
    return None


def pad_nonnegative(is_nonneg, node, tensor) -> bool:
    """A Pad is ``>= 0`` when its input and its pad value are."""
    value = node.input[2] if len(node.input) > 2 else ""
    return is_nonneg(node.input[0]) and (not value or is_nonneg(value))


def pad_sources(mode: str, dim: int, begin: int, end: int) -> np.ndarray:
    """The input index each output position copies along one axis, for reflect (mirror without the edge), edge
    (repeat the edge) and wrap (periodic) padding."""
    positions = np.arange(-begin, dim + end)
    if mode == "edge":
        return np.clip(positions, 0, dim - 1)
    if mode == "wrap":
        return positions % dim
    period = 2 * (dim - 1)  # reflect: ..., 2, 1, [0, 1, ..., n-1], n-2, n-3, ...
    folded = np.abs(positions) % period if period else np.zeros_like(positions)
    return np.where(folded < dim, folded, period - folded)


@backward("Pad", data_inputs=(0,), nonnegative=pad_nonnegative, zero_preserving=True, check=check_pad)
def pad(ctx, node, r_out):
    """Constant mode: crop the padding off the relevance (the pad value is a constant: its share is dropped, like
    a bias's). Reflect, edge and wrap copy input elements into the border: each copy's relevance goes back to the
    element it copies (:func:`copy_back`)."""
    b = ctx.b
    pads = pad_amounts(ctx, node)
    rank = len(pads) // 2
    mode = attr(node, "mode", "constant")
    if mode != "constant":
        shape = ctx.shapes[node.input[0]]
        maps = {a: copy_matrix(pad_sources(mode, shape[a], pads[a], pads[a + rank]), shape[a])
                for a in range(rank) if pads[a] or pads[a + rank]}
        return {0: copy_back(ctx, r_out[0], maps, rank)}
    if any(p < 0 for p in pads):  # a negative pad crops: the relevance of the cropped part is 0
        grow = [max(-p, 0) for p in pads]
        r_out = [ctx.pad_with_zero(r_out[0], grow)]
        pads = [max(p, 0) for p in pads]
    ends = [-int(p) if p > 0 else np.iinfo(np.int64).max for p in pads[rank:]]
    return {0: b.op("Slice", [r_out[0], b.const(pads[:rank], "start", np.int64), b.const(ends, "end", np.int64),
                              b.const(list(range(rank)), "axes", np.int64)], "R")}
