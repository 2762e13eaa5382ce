"""Every attribute written out: the compiled graph states each value that a backend could otherwise default on its
own.

ONNX lets a node leave out an attribute that has a default (``Conv``'s ``strides`` are 1 along every spatial axis,
``ArgMax``'s ``keepdims`` is 1, ...). Not every backend applies those defaults: onnxruntime-web's WebGPU kernels
(JSEP, ``ort.min.js`` 1.30) fail on a Conv without ``strides`` ("strides should be 2D"). So the compiler writes
every such attribute explicitly, once, over the finished graph (the forward nodes included: the values are the
defaults, so the outputs do not change).

- Attributes whose default the operator schema states (``keepdims``, ``axis``, ``auto_pad``, ``group``, ...) get
  that default.
- The window attributes of convolutions and pools, whose defaults depend on the kernel's rank (the schema states
  none), get ``strides`` and ``dilations`` of 1 and ``pads`` of 0 per spatial axis, ``kernel_shape`` from the
  weight's shape (Conv, ConvTranspose) and ``output_padding`` of 0 (ConvTranspose). ``pads`` stay out where
  ``auto_pad`` or ``output_shape`` decides them.
"""

from __future__ import annotations

import functools

import onnx
from onnx import AttributeProto, defs

WINDOW_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool")
WEIGHTED = ("Conv", "ConvTranspose")  # the second input is a weight [C_out, C_in/group, *kernel]
LIST_TYPES = (AttributeProto.INTS, AttributeProto.FLOATS, AttributeProto.STRINGS)


@functools.cache
def schema_defaults(op_type: str, opset: int) -> tuple[tuple[str, AttributeProto], ...]:
    """The attributes of ``op_type`` at ``opset`` with a stated, non-empty default value."""
    try:
        schema = defs.get_schema(op_type, opset, "")
    except defs.SchemaError:
        return ()
    found = []
    for name, attribute in schema.attributes.items():
        default = attribute.default_value
        if default.type == AttributeProto.UNDEFINED:
            continue
        if default.type in LIST_TYPES and not (default.ints or default.floats or default.strings):
            continue
        found.append((name, default))
    return tuple(found)


@functools.cache
def schema_attributes(op_type: str, opset: int) -> frozenset[str]:
    try:
        return frozenset(defs.get_schema(op_type, opset, "").attributes)
    except defs.SchemaError:
        return frozenset()


def make_explicit(graph: onnx.GraphProto, opset: int) -> None:
    """Write every defaulted attribute of the default-domain nodes of ``graph`` (and of its subgraphs) explicitly."""
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") else None for d in dims])
    _explicit(graph, opset, shapes)


def _explicit(graph: onnx.GraphProto, opset: int, shapes: dict[str, list]) -> None:
    for node in graph.node:
        for attribute in node.attribute:
            for inner in [attribute.g] if attribute.type == AttributeProto.GRAPH else attribute.graphs:
                _explicit(inner, opset, shapes | {t.name: list(t.dims) for t in inner.initializer})
        if node.domain not in ("", "ai.onnx"):
            continue
        given = {a.name for a in node.attribute}
        for name, default in schema_defaults(node.op_type, opset):
            if name not in given:
                explicit = node.attribute.add()
                explicit.CopyFrom(default)
                explicit.name = name
        if node.op_type in WINDOW_OPS:
            window_attributes(node, opset, shapes)


def kernel_rank(node: onnx.NodeProto, shapes: dict[str, list]) -> int | None:
    """The number of spatial axes: from the attributes given, the weight's shape, or the data input's rank."""
    values = {a.name: list(a.ints) for a in node.attribute if a.type == AttributeProto.INTS}
    for name, per_axis in (("kernel_shape", 1), ("strides", 1), ("dilations", 1), ("pads", 2),
                           ("output_padding", 1)):
        if values.get(name):
            return len(values[name]) // per_axis
    for index in (1, 0) if node.op_type in WEIGHTED else (0,):
        shape = shapes.get(node.input[index]) if len(node.input) > index else None
        if shape:
            return len(shape) - 2
    return None


def window_attributes(node: onnx.NodeProto, opset: int, shapes: dict[str, list]) -> None:
    """``strides``, ``dilations``, ``pads``, ``kernel_shape`` and ``output_padding`` of a convolution or pool."""
    rank = kernel_rank(node, shapes)
    if rank is None:
        return
    given = {a.name: a for a in node.attribute}
    known = schema_attributes(node.op_type, opset)
    decided = given.get("auto_pad") is not None and given["auto_pad"].s not in (b"", b"NOTSET")
    wanted = {"strides": [1] * rank, "dilations": [1] * rank}
    if not decided and "output_shape" not in given:
        wanted["pads"] = [0] * (2 * rank)
    if node.op_type == "ConvTranspose" and "output_shape" not in given:
        wanted["output_padding"] = [0] * rank
    weight = shapes.get(node.input[1]) if node.op_type in WEIGHTED and len(node.input) > 1 else None
    if weight and len(weight) == rank + 2 and all(isinstance(d, int) and d > 0 for d in weight[2:]):
        wanted["kernel_shape"] = list(weight[2:])
    for name, value in wanted.items():
        if name in known and name not in given:
            node.attribute.append(onnx.helper.make_attribute(name, value))
