"""Which tensor the relevance pass explains, and which inputs it explains it by.

The explained tensor is the one whose target entry seeds the backward sweep (:func:`explained_tensor`): a named
tensor, a named graph output, or the class scores among the float outputs, the logits where a Softmax, LogSoftmax or
Sigmoid makes them. The inputs it is explained by are the float graph inputs that are not weights
(:func:`data_inputs`).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from onnxlrp.errors import OnnxlrpError
from onnxlrp.graph import GraphView
from onnxlrp.messages import quote

from .ops import spec

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def data_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are float tensors and not weights (initializer-backed inputs are weights)."""
    inits = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in inits and v.type.tensor_type.elem_type in FLOAT_TYPES]


#: Ops whose output is a class score computed from logits: the explained tensor is their input (the logits).
SCORE_HEADS = ("Softmax", "LogSoftmax", "Sigmoid")


def _head_behind(view: GraphView, name: str) -> onnx.NodeProto | None:
    """The Softmax/LogSoftmax/Sigmoid that produces ``name``, possibly behind shape-only ops (Cast, Reshape, ...)."""
    t = name
    while t in view.producer and spec(view.producer[t]).shape_only:
        t = view.producer[t].input[0]
    node = view.producer.get(t)
    return node if node is not None and node.op_type in SCORE_HEADS else None


def _per_sample_size(shapes: dict[str, list], name: str) -> int | None:
    """``K`` of a ``[batch, K]`` tensor (one score vector per sample), None for any other or an unknown shape."""
    shape = shapes.get(name)
    return shape[1] if shape is not None and len(shape) == 2 and isinstance(shape[1], int) else None


def explained_tensor(graph: onnx.GraphProto, view: GraphView, output: str | None, node_output: str | None,
                     shapes: dict[str, list] | None = None) -> tuple[str, str]:
    """The tensor whose target entry is explained, and what it is and why it was chosen (one phrase).

    ``node_output`` if given; else a graph output: ``output`` if given, else the class scores among the float
    outputs (a ZipMap's input stands for the ZipMap's output): the first output that a Softmax, LogSoftmax or
    Sigmoid produces (possibly behind shape-only ops), else the largest ``[batch, K]`` output (largest ``K``), else
    the first. When a Softmax/LogSoftmax/Sigmoid produces the chosen output, its input (the logits) is explained."""
    names = [o.name for o in graph.output]
    if node_output:
        if node_output not in view.producer:
            raise OnnxlrpError(f"--node-output {node_output!r} is not produced by any node")
        return node_output, f"tensor {quote(node_output)} (--node-output)"
    if output is not None and output not in names:
        raise OnnxlrpError(f"--output {output!r} is not a graph output; outputs: {', '.join(names)}")
    candidates: dict[str, str] = {}  # graph output -> the float tensor that stands for it
    for o in graph.output:
        producer = view.producer.get(o.name)
        if producer is not None and producer.op_type == "ZipMap":
            candidates[o.name] = producer.input[0]
        elif o.type.tensor_type.elem_type in FLOAT_TYPES:
            candidates[o.name] = o.name
    if output is not None:
        if output not in candidates:
            raise OnnxlrpError(f"--output {output!r} is not a float tensor output")
        chosen, why = output, "--output"
    elif not candidates:
        raise OnnxlrpError("the model has no float tensor output to explain")
    else:
        heads = [o for o, t in candidates.items() if _head_behind(view, t) is not None]
        sizes = {o: k for o, t in candidates.items() if (k := _per_sample_size(shapes or {}, t)) is not None}
        if heads:
            chosen, why = heads[0], "class scores"
        elif len(candidates) == 1:
            chosen, why = next(iter(candidates)), "the only float output"
        elif sizes:
            chosen = max(sizes, key=lambda o: sizes[o])  # the first of the largest
            why = (f"class scores: the largest [batch, K] float output, K = {sizes[chosen]}; no output comes from "
                   "a Softmax or Sigmoid")
        else:
            chosen, why = next(iter(candidates)), "the first float output"
        others = [o for o in candidates if o != chosen]
        if others:
            why += f"; not {', '.join(quote(o) for o in others[:3])}{', ...' if len(others) > 3 else ''}, " \
                   "--output chooses another"
    tensor = candidates[chosen]
    head = _head_behind(view, tensor)
    if head is not None:
        return head.input[0], f"the input (logits) of the {head.op_type} that makes output {quote(chosen)} ({why})"
    return tensor, f"output {quote(chosen)} ({why})"
