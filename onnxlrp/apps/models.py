"""The model side of the apps: compile (unless compiled already) and find the names the apps need, and run the
forward pass alone (the compiled graph without its relevance sweep)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxlrp.contract import CLASS_OUTPUT, TARGET_INPUT, is_relevance_output
from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import read_model
from onnxlrp.messages import show
from onnxlrp.naming import escape_terminal
from onnxlrp.passes.explained import SCORE_HEADS
from onnxlrp.scopes import implicit_inputs

from .files import PATH_TYPES

#: Ops that keep the values of a score head's output on its way to a graph output.
RESHAPING = ("Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze")

__all__ = ["Forward", "Prepared", "forward_model", "input_shape", "metadata", "prepare"]


@dataclass
class Prepared:
    """A compiled model ready for an :class:`~onnxlrp.runtime.Explainer`, with the names the apps need."""

    model: onnx.ModelProto  # compiled; the explained tensor is among its outputs
    rule: str  # the rule or composite it was compiled with
    input_name: str
    chw: tuple[int, ...]  # the data input's shape without the batch axis
    explained: str  # the tensor whose target entry is explained (e.g. the logits before a Softmax)
    score: str  # the output printed as the score (e.g. the Softmax probabilities), or ``explained``
    was_compiled: bool  # the file given was compiled already
    explained_why: str = ""  # what the explained tensor is and why it was chosen (compile's metadata)
    shown: str = "the model"  # how messages name the model (its path, for a file)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's metadata properties as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def _value_info(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        if vi.name == name:
            out = onnx.ValueInfoProto()
            out.CopyFrom(vi)
            return out
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def input_shape(model: onnx.ModelProto, shown_as=None, input_shapes=None) -> tuple[str, tuple[int, ...]]:
    """The name of the one data input and its shape without the batch axis (every such axis must be fixed)."""
    graph = model.graph
    shown = show(shown_as) if isinstance(shown_as, PATH_TYPES) else "the model"
    inits = {t.name for t in graph.initializer}
    data_inputs = [i for i in graph.input if i.name != TARGET_INPUT and i.name not in inits]
    if len(data_inputs) != 1:
        raise OnnxlrpError(f"{shown}: has {len(data_inputs)} data inputs; explain and evaluate need exactly one")
    data_input = data_inputs[0]
    name = escape_terminal(data_input.name)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in data_input.type.tensor_type.shape.dim]
    fixed = (input_shapes or {}).get(data_input.name) or (input_shapes or {}).get("")
    if fixed and len(fixed) == len(dims):
        dims = [d if d is not None else (f if f > 0 else None) for d, f in zip(dims, fixed, strict=True)]
    if len(dims) < 2 or any(d is None for d in dims[1:]):
        shape = ", ".join("?" if d is None else str(d) for d in dims)
        hint = ",".join(["-1"] + ["N" if d is None else str(d) for d in dims[1:]])
        raise OnnxlrpError(f"{shown}: input {name!r} has shape [{shape}]; every axis but the batch (axis 0) must be "
                           f"fixed: give them with --input-shape {name}={hint} (N = your size; -1 keeps the batch "
                           "dynamic)")
    return data_input.name, tuple(dims[1:])


def prepare(model, *, shown_as=None, rule: str = "rlrp", composite=None, flat_layers: int = 1, opset=None,
            output=None, node_output=None, node_input=None, input_shapes=None, **params) -> Prepared:
    """Load ``model`` (a file or ModelProto) and compile it with the rule unless it was compiled by onnxlrp."""
    from onnxlrp.compiler import compile as compile_model
    from onnxlrp.compiler import is_compiled

    source, _ = read_model(model)
    was_compiled = is_compiled(source)
    if was_compiled:
        compiled = onnx.ModelProto()
        compiled.CopyFrom(source)  # outputs are added below; the caller's model stays as it is
    else:
        # from the file when there is one: its errors name it, and the metadata records its sha256
        given = shown_as if isinstance(shown_as, PATH_TYPES) else source
        compiled = compile_model(given, rule, composite=composite, flat_layers=flat_layers, opset=opset,
                                 output=output, node_output=node_output, node_input=node_input,
                                 input_shapes=input_shapes, **params)
    meta = metadata(compiled)
    graph = compiled.graph
    explained = meta.get("onnxlrp.explained", "")
    if not explained:
        raise OnnxlrpError(f"{show(shown_as or model) if isinstance(shown_as or model, PATH_TYPES) else 'the model'}: "
                           "compiled without the onnxlrp.explained metadata; compile it again with this onnxlrp")
    input_name, chw = input_shape(compiled, shown_as if shown_as is not None else model, input_shapes)
    outputs = [o.name for o in graph.output]
    if explained not in outputs:
        graph.output.append(_value_info(graph, explained))
    originals = [n for n in outputs if not is_relevance_output(n) and n != CLASS_OUTPUT]
    score = explained if explained in originals else _score_output(graph, explained, originals)
    return Prepared(compiled, meta.get("onnxlrp.rule", rule), input_name, chw, explained, score, was_compiled,
                    meta.get("onnxlrp.explained_why", ""),
                    show(shown_as) if isinstance(shown_as, PATH_TYPES) else "the model")


def _score_output(graph: onnx.GraphProto, logits: str, originals: list[str]) -> str:
    """The original output that a Softmax/LogSoftmax/Sigmoid of ``logits`` makes, possibly through shape-only ops
    (the score printed beside the class), or ``logits`` itself."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for head in readers.get(logits, []):
        if head.op_type not in SCORE_HEADS:
            continue
        t = head.output[0]
        while t not in originals:
            nexts = [n for n in readers.get(t, []) if n.op_type in RESHAPING and n.input[0] == t]
            if len(nexts) != 1:
                break
            t = nexts[0].output[0]
        if t in originals:
            return t
    return logits


def forward_model(compiled: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """The part of ``compiled`` that computes ``outputs`` (the forward pass without the relevance sweep)."""
    graph = compiled.graph
    needed = set(outputs)
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed |= implicit_inputs(node)
    keep.reverse()
    fwd = onnx.ModelProto()
    fwd.ir_version = compiled.ir_version
    fwd.opset_import.extend(compiled.opset_import)
    fwd.functions.extend(compiled.functions)
    fwd.graph.name = graph.name
    fwd.graph.node.extend(keep)
    fwd.graph.initializer.extend(t for t in graph.initializer if t.name in needed)
    inits = {t.name for t in graph.initializer}
    fwd.graph.input.extend(i for i in graph.input if i.name in needed and i.name not in inits)
    fwd.graph.output.extend(_value_info(graph, name) for name in outputs)
    fwd.graph.value_info.extend(v for v in graph.value_info if v.name in needed and v.name not in outputs)
    return fwd


class Forward:
    """The model's forward pass (from the compiled graph): ``logits(x)`` is the explained tensor, ``[b, K]``."""

    def __init__(self, prepared: Prepared, batch_size: int):
        from onnxlrp.runtime import make_session

        self.input = prepared.input_name
        self.explained = prepared.explained
        self.session = make_session(forward_model(prepared.model, [prepared.explained]))
        self.batch_size = max(int(batch_size), 1)

    def logits(self, x: np.ndarray) -> np.ndarray:
        parts = []
        for i in range(0, len(x), self.batch_size):
            chunk = np.ascontiguousarray(x[i : i + self.batch_size], dtype=np.float32)
            out = self.session.run([self.explained], {self.input: chunk})[0]
            parts.append(np.asarray(out, dtype=np.float64).reshape(len(chunk), -1))
        return np.concatenate(parts) if parts else np.zeros((0, 0))
