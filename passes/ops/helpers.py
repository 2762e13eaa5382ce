"""Small emit helpers shared by the backward emitters: attributes, broadcasting, reshaping, masks."""

from __future__ import annotations

import numpy as np
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
    shape (the leading axes that ``to`` lacks are summed keeping their dims, then squeezed)."""
    b = ctx.b
    si, so = ctx.shapes.get(to), ctx.shapes.get(frm)
    if si is None or so is None or si == so:
        return r
    lead = len(so) - len(si)
    axes = list(range(lead)) + [lead + a for a, d in enumerate(si) if d == 1 and so[lead + a] != 1]
    if axes:
        r = ctx.reduce(ctx.algebra.reduce_op, r, axes, hint="unbroadcast")
    if lead:
        r = b.op("Squeeze", [r, b.const(list(range(lead)), "axes", np.int64)], "unbroadcast")
    return r


def symbolic_dims(ctx, name: str) -> list | None:
    """``name``'s dims as shape inference left them: a number, a symbolic name (the same name is the same size
    everywhere in the graph), or None."""
    dims = getattr(ctx, "_symbolic_dims", None)
    if dims is None:
        dims = {}
        for vi in list(ctx.graph.value_info) + list(ctx.graph.input) + list(ctx.graph.output):
            if vi.type.tensor_type.HasField("shape"):
                dims[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in vi.type.tensor_type.shape.dim]
        ctx._symbolic_dims = dims
    return dims.get(name)


def reshape_like(ctx, r: str, like: str, frm: str | None = None) -> str:
    """``r`` (shaped like ``frm``, when given) reshaped like ``like``. The target shape is a constant where it can
    be: ``like``'s static dims, and 0 (Reshape's "copy this dim") for a symbolic dim that ``frm`` has at the same
    position. Reading ``Shape(like)`` instead would keep the forward tensor ``like`` alive until the backward pass
    reaches this node (onnxruntime runs a Shape just before its reader)."""
    b = ctx.b
    target, source = symbolic_dims(ctx, like), symbolic_dims(ctx, frm) if frm else None
    if target is not None and source is not None:
        dims = []
        for i, d in enumerate(target):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif isinstance(d, str) and i < len(source) and source[i] == d:
                dims.append(0)
            else:
                break
        else:
            return b.op("Reshape", [r, b.const(dims, "shape", np.int64)], "R")
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
