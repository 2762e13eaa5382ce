"""Resource bombs: ops whose constant inputs ask for a huge tensor, refused before anything runs or allocates."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import node_label, prefix
from onnxlrp.scopes import subgraphs

from .tensors import field_for, is_external

__all__ = ["MAX_BOMB_ELEMENTS", "check_resource_bombs"]

#: Largest tensor (in elements) a shape-making op (ConstantOfShape, Expand, Tile, Range...) may create.
MAX_BOMB_ELEMENTS = 2**31


def _small_values(t: TensorProto, limit: int = 4096) -> list[float] | None:
    """Values of a small numeric, non-external tensor (without onnx.numpy_helper); None if unsure."""
    if is_external(t):
        return None
    n = 1
    for d in t.dims:
        if d < 0:
            return None
        n *= d
    if n > limit:
        return None
    dtype_map = {
        TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.FLOAT: np.float32,
        TensorProto.DOUBLE: np.float64, TensorProto.INT16: np.int16, TensorProto.INT8: np.int8,
        TensorProto.UINT8: np.uint8, TensorProto.UINT16: np.uint16, TensorProto.UINT32: np.uint32,
        TensorProto.UINT64: np.uint64,
    }  # fmt: skip
    np_type = dtype_map.get(t.data_type)
    if np_type is None:
        return None
    if t.HasField("raw_data") and t.raw_data:
        raw = t.raw_data
        if len(raw) != n * np.dtype(np_type).itemsize:
            return None
        return [v.item() for v in np.frombuffer(raw, dtype=np.dtype(np_type).newbyteorder("<"))]
    field, _ = field_for(t.data_type)
    values = list(getattr(t, field)) if field else []
    if len(values) != n:
        return None
    return values


def _constants(graph: GraphProto) -> dict[str, list[float]]:
    """Name -> values for the small constants of a graph (initializers and Constant nodes)."""
    out: dict[str, list[float]] = {}
    for t in graph.initializer:
        vals = _small_values(t)
        if vals is not None:
            out[t.name] = vals
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        for attr in node.attribute:
            vals = None
            if attr.name == "value" and attr.HasField("t"):
                vals = _small_values(attr.t)
            elif attr.name == "value_int":
                vals = [attr.i]
            elif attr.name == "value_ints" and len(attr.ints) <= 4096:
                vals = list(attr.ints)
            elif attr.name == "value_float":
                vals = [attr.f]
            elif attr.name == "value_floats" and len(attr.floats) <= 4096:
                vals = list(attr.floats)
            if vals is not None:
                out[node.output[0]] = vals
    return out


def _prod(values: Iterable[float]) -> int:
    p = 1
    for v in values:
        p *= max(int(v), 0)
    return p


def check_resource_bombs(
    model: ModelProto, *, max_elements: int = MAX_BOMB_ELEMENTS, source: str | os.PathLike[str] | None = None
) -> None:
    """Refuse ops whose constant inputs ask for a huge tensor, before anything runs or allocates.

    Looked at (constants = initializers and ``Constant`` nodes; computed shapes are not followed):
    ``ConstantOfShape`` (product of the shape), ``Expand`` (product of the target shape, a lower bound
    of the output), ``Tile`` (product of the repeats), ``Range`` (``ceil((limit - start) / delta)``;
    ``delta == 0`` is refused), ``Resize``/``Upsample`` with constant ``sizes``, and ``Pad`` (largest
    padding of one axis).  More than ``max_elements`` elements is refused, also in subgraphs.
    """
    where = prefix(source)

    def visit(graph: GraphProto, outer: dict[str, list[float]]) -> None:
        consts = dict(outer)
        consts.update(_constants(graph))
        for node in graph.node:
            _check_bomb_node(node, consts, max_elements, where)
            for g in subgraphs(node):
                visit(g, consts)

    visit(model.graph, {})


def _check_bomb_node(node: NodeProto, consts: dict[str, list[float]], max_elements: int, where: str) -> None:
    if node.domain not in ("", "ai.onnx"):
        return

    def const(i: int) -> list[float] | None:
        if len(node.input) > i and node.input[i]:
            return consts.get(node.input[i])
        return None

    def int_const(i: int) -> list[int] | None:
        values = const(i)
        if values is None or not all(isinstance(v, int) for v in values):
            return None  # shapes are int64; anything else is for onnx's checker to refuse
        return [int(v) for v in values]

    def refuse(what: str, count: int) -> None:
        raise OnnxlrpError(
            f"{where}{node_label(node)} would create {what} of {count} elements (limit {max_elements}); "
            "refusing the model"
        )

    def negative(values: list[float]) -> None:
        if any(v < 0 for v in values):
            raise OnnxlrpError(f"{where}{node_label(node)} has a negative size in its constant shape")

    op = node.op_type
    if op in ("ConstantOfShape", "Expand"):
        shape = int_const(0 if op == "ConstantOfShape" else 1)
        if shape is not None:
            negative(shape)
            count = _prod(shape)
            if count > max_elements:
                refuse("a tensor", count)
    elif op == "Tile":
        repeats = int_const(1)
        if repeats is not None:
            negative(repeats)
            data = const(0)
            count = _prod(repeats) * (len(data) if data is not None else 1)
            if count > max_elements:
                refuse("a tensor", count)
    elif op == "Range":
        start, limit, delta = const(0), const(1), const(2)
        if start and limit and delta and len(start) == len(limit) == len(delta) == 1:
            s, lim, d = float(start[0]), float(limit[0]), float(delta[0])
            steps = (lim - s) / d if d != 0 else math.inf
            if not all(math.isfinite(v) for v in (s, lim, d, steps)):
                raise OnnxlrpError(
                    f"{where}{node_label(node)} has a zero or non-finite start, limit or step; refusing the model"
                )
            count = max(math.ceil(steps), 0)
            if count > max_elements:
                refuse("a range", count)
    elif op in ("Resize", "Upsample"):
        sizes = int_const(3) if op == "Resize" else None
        if sizes is not None:
            negative(sizes)
            count = _prod(sizes)
            if count > max_elements:
                refuse("a tensor", count)
        scales = const(2) if op == "Resize" else const(1)
        if scales is not None and any(not math.isfinite(v) or v > max_elements for v in scales):
            raise OnnxlrpError(
                f"{where}{node_label(node)} scales by a non-finite or huge factor (limit {max_elements}); "
                "refusing the model"
            )
    elif op == "Pad":
        pads = int_const(1)
        if pads is not None and len(pads) % 2 == 0:
            half = len(pads) // 2
            widest = max((max(pads[i], 0) + max(pads[i + half], 0) for i in range(half)), default=0)
            if widest > max_elements:
                refuse("an axis", int(widest))
