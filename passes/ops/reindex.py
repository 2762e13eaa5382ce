"""Re-indexing ops: relevance goes back to the input element each output element was read from."""

from __future__ import annotations

import numpy as np

from .helpers import attr, path_inputs, reshape_like
from .registry import backward


@backward("Flatten", "Reshape", "Squeeze", "Unsqueeze", data_inputs=(0,), shape_only=True, nonnegative="first",
          zero_preserving=True)
def reshape(ctx, node, r_out):
    return {0: reshape_like(ctx, r_out[0], node.input[0])}


def check_transpose(ctx, node):
    return None if attr(node, "perm") is not None or ctx.shapes.get(node.input[0]) else "needs a known rank"


@backward("Transpose", nonnegative="first", zero_preserving=True, check=check_transpose)
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


@backward("Concat", join=True, nonnegative="all", zero_preserving=True, check=check_concat)
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
            ctx.join_shares[(node.name, i)] = out[i]
        start += size
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
    if shape is None or params is None:
        return "needs constant starts/ends/axes/steps and a known input shape"
    if np.any(params[3] != 1):
        return "slices with steps other than 1 are not supported"
    if any(shape[int(a)] is None for a in params[2]):
        return "needs static sizes along the sliced axes"
    return None


@backward("Slice", data_inputs=(0,), nonnegative="first", zero_preserving=True, check=check_slice)
def slice_(ctx, node, r_out):
    """Pad the relevance back with the algebra's zero to the input's extent."""
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
    return {0: ctx.pad_with_zero(r_out[0], pads)}


def check_pad(ctx, node):
    if attr(node, "mode", "constant") != "constant":
        return "only constant padding maps relevance back"
    if ctx.constants.get(node.input[1]) is None:
        return "needs constant pads"
    if len(node.input) > 3 and node.input[3]:
        return "pads with an axes input are not supported"
    return None


def pad_nonnegative(is_nonneg, node, tensor) -> bool:
    """A Pad is ``>= 0`` when its input and its pad value are."""
    value = node.input[2] if len(node.input) > 2 else ""
    return is_nonneg(node.input[0]) and (not value or is_nonneg(value))


@backward("Pad", data_inputs=(0,), nonnegative=pad_nonnegative, zero_preserving=True, check=check_pad)
def pad(ctx, node, r_out):
    """Crop the padding off the relevance."""
    b = ctx.b
    pads = ctx.constants[node.input[1]].astype(np.int64)
    rank = len(pads) // 2
    ends = [-int(p) if p > 0 else np.iinfo(np.int64).max for p in pads[rank:]]
    return {0: b.op("Slice", [r_out[0], b.const(pads[:rank], "start", np.int64), b.const(ends, "end", np.int64),
                              b.const(list(range(rank)), "axes", np.int64)], "R")}


MAX_GATHER_MATRIX = 1 << 22  # entries of the 0/1 matrix that maps a general gather back (16 MiB in float32)


def gather_geometry(ctx, node):
    """``(axis, flat indices in [0, n), n)`` of a Gather with constant indices."""
    shape = ctx.shapes[node.input[0]]
    axis = attr(node, "axis", 0) % len(shape)
    n = shape[axis]
    return axis, ctx.constants[node.input[1]].astype(np.int64).reshape(-1) % n, n


def check_gather(ctx, node):
    shape = ctx.shapes.get(node.input[0])
    if node.input[1] not in ctx.constants or not shape:
        return "needs constant indices and a known input rank"
    axis = attr(node, "axis", 0) % len(shape)
    if any(d is None for d in shape[axis:]):
        return "needs static sizes from the gathered axis on"
    _, indices, n = gather_geometry(ctx, node)
    if not is_permutation(indices, n) and n * indices.size > MAX_GATHER_MATRIX:
        return f"gathers {indices.size} of {n} elements with repeats or gaps: too large to map back"
    return None


def is_permutation(indices: np.ndarray, n: int) -> bool:
    return indices.size == n and bool(np.all(np.sort(indices) == np.arange(n)))


@backward("Gather", data_inputs=(0,), nonnegative="first", zero_preserving=True, check=check_gather)
def gather(ctx, node, r_out):
    """Constant indices: each output element's relevance goes back to the element it was read from. A permutation
    is undone by gathering with the inverse permutation; otherwise ``R_x = M^T R`` along the axis, with the 0/1
    matrix ``M[j, i] = [indices_j == i]`` (repeated indices add up, elements never read get 0)."""
    b = ctx.b
    shape = ctx.shapes[node.input[0]]
    axis, indices, n = gather_geometry(ctx, node)
    r = b.op("Reshape", [r_out[0], b.const([0] * axis + [indices.size] + shape[axis + 1:], "shape", np.int64)], "R")
    if is_permutation(indices, n):
        return {0: b.op("Gather", [r, b.const(np.argsort(indices), "inverse", np.int64)], "R", axis=axis)}
    post = int(np.prod(shape[axis + 1:]))
    flat = b.op("Reshape", [r, b.const([-1, indices.size, post], "shape", np.int64)], "R")
    matrix = np.zeros((n, indices.size), dtype=np.float32)
    matrix[indices, np.arange(indices.size)] = 1.0
    back = b.op("MatMul", [b.const(matrix, "gather_T"), flat], "R")
    return {0: b.op("Reshape", [back, b.op("Shape", [node.input[0]])], "R")}
