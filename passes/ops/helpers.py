"""Small emit helpers shared by the backward emitters: attributes, broadcasting, reshaping, masks."""

from __future__ import annotations

import onnx

from .registry import data_input_indices


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
    """Add up relevance (in the family's algebra) over the axes along which ``to`` was broadcast to ``frm``'s
    shape."""
    b = ctx.b
    si, so = ctx.shapes.get(to), ctx.shapes.get(frm)
    if si is None or so is None or si == so:
        return r
    lead = len(so) - len(si)
    axes = list(range(lead)) + [lead + a for a, d in enumerate(si) if d == 1 and so[lead + a] != 1]
    if axes:
        r = ctx.reduce(ctx.algebra.reduce_op, r, axes, hint="unbroadcast")
    if lead:
        r = b.op("Reshape", [r, ctx.shape_of(to)], "unbroadcast")
    return r


def reshape_like(ctx, r: str, like: str) -> str:
    b = ctx.b
    return b.op("Reshape", [r, ctx.shape_of(like)], "R")


def float_mask(b, condition: str) -> str:
    return b.op("Cast", [condition], "mask", to=onnx.TensorProto.FLOAT)


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
