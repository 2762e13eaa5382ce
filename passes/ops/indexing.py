"""Selection ops: relevance goes back to the input element each output element was taken from.

- ``Gather(data, indices)``: a token select (``hidden[:, 0]``, the CLS token), Q/K/V picked out of a fused
  projection (``proj[0]``), a row of a table. The relevance of every output element is added to the input element it
  was read from: ``R_in = R_out`` times the one-hot map of the indices, transposed.
- ``Where(cond, x, y)``: each output element comes from ``x`` or from ``y``; its relevance goes there (a masked fill,
  the NaN guard after an attention softmax).
- ``Expand``: broadcasting; the relevance is summed over the broadcast axes (the heads of grouped-query attention).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .helpers import attr, path_inputs, unbroadcast
from .registry import backward

MAX_GATHER_MATRIX = 1 << 22  # entries of the one-hot map of constant indices (16 MiB in float32)


def check_gather(ctx, node):
    shape = ctx.shapes.get(node.input[0])
    if shape is None or ctx.shapes.get(node.input[1]) is None:
        return "needs known ranks of data and indices"
    idx, n = ctx.constants.get(node.input[1]), shape[attr(node, "axis", 0) % len(shape)] if shape else None
    if idx is not None and n is not None and not is_permutation(idx, n) and n * idx.size > MAX_GATHER_MATRIX:
        return f"gathers {idx.size} of {n} elements with repeats or gaps: too large to map back"
    return None


def is_permutation(idx: np.ndarray, n: int) -> bool:
    """Whether the constant indices ``idx`` read each of the ``n`` elements once (negative ones count from the end)."""
    flat = idx.reshape(-1).astype(np.int64) % n
    return flat.size == n and bool(np.all(np.sort(flat) == np.arange(n)))


def shape_slice(b, tensor: str, start: int, end: int) -> str:
    """``Shape(tensor)[start:end]`` (opset 13: Shape has no start/end attributes yet)."""
    return b.op("Slice", [b.op("Shape", [tensor]), b.const([start], "start", np.int64),
                          b.const([end], "end", np.int64)], "dims")


@backward("Gather", data_inputs=(0,), nonnegative="first", zero_preserving=True, check=check_gather)
def gather(ctx, node, r_out):
    """``out[pre, I, post] = data[pre, idx[I], post]`` along ``axis``: with ``K`` the number of indices and ``n`` the
    data's size along the axis, ``R_data[pre, j, post] = sum_k R_out[pre, k, post] * [idx[k] = j]``, one MatMul of
    the relevance (axis moved last) with the ``[K, n]`` one-hot map (negative indices count from the end). Constant
    indices that permute the axis are undone by a Gather with the inverse permutation."""
    b = ctx.b
    data, indices = node.input[0], node.input[1]
    shape = ctx.shapes[data]
    rank = len(shape)
    axis = attr(node, "axis", 0) % rank
    n = shape[axis]
    idx = ctx.constants.get(indices)
    if idx is not None and n is not None and idx.ndim == 1 and is_permutation(idx, n):
        # a permutation is undone by gathering with the inverse permutation
        inverse = np.argsort(idx.astype(np.int64) % n)
        return {0: b.op("Gather", [r_out[0], b.const(inverse, "inverse", np.int64)], "R", axis=axis)}
    if idx is not None and n is not None:
        flat = idx.reshape(-1).astype(np.int64)
        one_hot = b.const((np.where(flat < 0, flat + n, flat)[:, None] == np.arange(n)[None]).astype(np.float32),
                          "one_hot")
    else:
        flat = b.op("Reshape", [b.op("Cast", [indices], "idx", to=TensorProto.INT64),
                                b.const([-1], "flat", np.int64)], "idx")
        size = b.op("Squeeze", [shape_slice(b, data, axis, axis + 1), b.const([0], "axes", np.int64)], "n")
        wrapped = b.op("Where", [b.op("Less", [flat, b.const(0, "zero_i", np.int64)]), b.op("Add", [flat, size]),
                                 flat], "idx")
        positions = b.op("Range", [b.const(0, "zero_i", np.int64), size, b.const(1, "one_i", np.int64)], "positions")
        hit = b.op("Equal", [b.op("Unsqueeze", [wrapped, b.const([1], "axes", np.int64)]), positions], "hit")
        one_hot = b.op("Cast", [hit], "one_hot", to=TensorProto.FLOAT)
    post = shape[axis + 1:]
    index_rank = len(ctx.shapes[indices])
    if index_rank == 0:  # a scalar index dropped the axis: put it back
        k_shape = None
    elif None not in post or index_rank == 1:
        # the leading axes of the relevance are the data's (Reshape's 0 copies them), the trailing ones too when
        # the indices take one axis: no Shape of the forward tensor, which would keep it alive
        k_shape = b.const([0] * axis + [-1] + [0 if d is None else d for d in post], "shape", np.int64)
    else:
        k_shape = b.op("Concat", [shape_slice(b, data, 0, axis), b.const([-1], "k", np.int64),
                                  shape_slice(b, data, axis + 1, rank)], "shape", axis=0)
    r = b.op("Unsqueeze", [r_out[0], b.const([axis], "axes", np.int64)], "R_k") if k_shape is None else \
        b.op("Reshape", [r_out[0], k_shape], "R_k")
    to_last = [a for a in range(rank) if a != axis] + [axis]
    spread = b.op("MatMul", [b.op("Transpose", [r], "R_k", perm=to_last), one_hot], "R")
    return {0: b.op("Transpose", [spread], "R", perm=[int(p) for p in np.argsort(to_last)])}


@backward("Where", data_inputs=(1, 2), zero_preserving=True)
def where(ctx, node, r_out):
    """Each output element's relevance to the operand it was taken from."""
    b = ctx.b
    zero = b.const(0.0, "zero")
    out = {}
    for i in path_inputs(ctx, node):
        picked = [r_out[0], zero] if i == 1 else [zero, r_out[0]]
        out[i] = unbroadcast(ctx, b.op("Where", [node.input[0], *picked], "R"), node.input[i], node.output[0])
    return out


@backward("Expand", data_inputs=(0,), nonnegative="first", zero_preserving=True)
def expand(ctx, node, r_out):
    """Broadcasting copies each input element: its relevance is the sum over the copies."""
    return {0: unbroadcast(ctx, r_out[0], node.input[0], node.output[0])}
