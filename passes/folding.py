"""Constant folding for canonicalization (:mod:`onnxlrp.passes.canonicalize`), and its undoing in the compiled model.

:func:`fold_constants` evaluates the nodes whose inputs are all constant (weight subgraphs) with onnx's reference
evaluator and stores their outputs as initializers, refusing any fold that would allocate more than
:data:`MAX_FOLD_ELEMENTS`; an If with a constant condition becomes the branch it takes. :func:`fold_static_shapes`
replaces ``Shape`` (and ``Gather`` of a ``Shape``) by constants where the dims are static. The folded values serve
the compile-time analysis; :func:`restore_folded` puts the subgraphs back where they are smaller than their values
(:class:`FoldedConstants`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxlrp.errors import OnnxlrpError
from onnxlrp.graph import implicit_inputs

from .control_flow import every_name, inline_if
from .ops import spec

MAX_FOLD_ELEMENTS = 1 << 28


def _fold_size(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> int | None:
    """Element count a shape-creating node would allocate, computed without allocating."""
    if node.op_type == "ConstantOfShape":
        return int(np.prod(values[node.input[0]].astype(object)))
    if node.op_type == "Expand":
        shape = np.broadcast_shapes(values[node.input[0]].shape, tuple(int(d) for d in values[node.input[1]]))
        return int(np.prod(np.asarray(shape, dtype=object)))
    if node.op_type == "Tile":
        reps = values[node.input[1]].astype(object)
        return int(values[node.input[0]].size * np.prod(reps))
    if node.op_type == "Range":
        start, limit, delta = (values[n].item() for n in node.input)
        return int(max(np.ceil((limit - start) / delta), 0)) if delta else 0
    return None


@dataclass
class FoldedConstants:
    """What :func:`fold_constants` evaluated: the folded nodes in graph order, and the constants they read that no
    folded node produces (the model's own initializers, kept here when the folding left them unused)."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    leaves: dict[str, onnx.TensorProto] = field(default_factory=dict)


def fold_constants(graph: onnx.GraphProto, opset_imports) -> FoldedConstants:
    """Evaluate nodes whose inputs are all constant and store their outputs as initializers; replace an If whose
    condition is constant by the nodes of the branch it takes (:mod:`onnxlrp.passes.control_flow`), which are
    folded in turn. Returns the folded nodes and what they read, so that :func:`restore_folded` can put them
    back."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors = {t.name: t for t in graph.initializer}
    elem_types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
    folded = FoldedConstants()
    produced: set[str] = set()
    kept = []
    pending = list(reversed(graph.node))
    taken: set[str] | None = None
    while pending:
        node = pending.pop()
        if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[0] in values \
                and values[node.input[0]].size == 1:
            taken = every_name(graph) if taken is None else taken
            inlined = inline_if(node, bool(values[node.input[0]].item()), taken)
            if inlined is not None:
                nodes, initializers = inlined
                graph.initializer.extend(initializers)
                values.update({t.name: numpy_helper.to_array(t) for t in initializers})
                tensors.update({t.name: t for t in initializers})
                pending.extend(reversed(nodes))
                continue
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and node.input[0] in values \
                and elem_types.get(node.input[1]):
            # CastLike(constant, x) reads only x's element type: a constant once that type is declared (the dynamo
            # exporter's zero bias of a bias-free Conv is ``Expand(CastLike(0, input), ...)``); it stays folded
            value = values[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(elem_types[node.input[1]]))
            values[node.output[0]] = value
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            tensors[node.output[0]] = folded.leaves[node.output[0]] = graph.initializer[-1]
            continue
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.input
            and all(not n or n in values for n in node.input)
            and spec(node).foldable  # not random, not control flow (the op registry's fact)
        )
        if not foldable:
            kept.append(node)
            continue
        size = _fold_size(node, values)
        if size is not None and size > MAX_FOLD_ELEMENTS:
            raise OnnxlrpError(f"node {node.name or node.output[0]!r} ({node.op_type}) would create a tensor of "
                               f"{size} elements; refusing to allocate it")
        try:
            outputs = _evaluate(node, values, opset_imports)
        except Exception:
            kept.append(node)  # leave it to onnxruntime at run time
            continue
        for name in node.input:
            if name and name not in produced:
                folded.leaves[name] = tensors[name]
        for name, value in zip(node.output, outputs, strict=False):
            if name:
                values[name] = value
                graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
                tensors[name] = graph.initializer[-1]
                produced.add(name)
        folded.nodes.append(node)
    if folded.nodes or folded.leaves or taken is not None:
        for name, tensor in folded.leaves.items():  # a copy: the list below drops the unused ones
            folded.leaves[name] = onnx.TensorProto()
            folded.leaves[name].CopyFrom(tensor)
        del graph.node[:]
        graph.node.extend(drop_dead_nodes(graph, kept) if taken is not None else kept)
        _drop_unused_initializers(graph)
    return folded


def restore_folded(graph: onnx.GraphProto, folded: FoldedConstants) -> None:
    """Replace the folded values that ``graph`` still reads by the nodes that computed them, wherever that makes the
    file smaller: per connected group of folded nodes, when the constants they read (and ``graph`` lacks) take
    fewer bytes than the values they produce. onnxruntime folds them again when it creates the session, as it does
    for the source model. The nodes go first in the graph (they read only constants). A folded node's constant input
    that the graph reads itself (a QDQ model's integer weight, which the rules dequantize with ops of their own) is
    put back whatever is restored."""
    initializers = {t.name: t for t in graph.initializer}
    read = _used_names(graph)
    written = {o for n in graph.node for o in n.output} | {v.name for v in graph.input}
    for name in sorted(read - set(initializers) - written):  # a leaf the relevance graph reads itself
        if name in folded.leaves:
            graph.initializer.append(folded.leaves[name])
            initializers[name] = graph.initializer[-1]
    producer = {o: i for i, n in enumerate(folded.nodes) for o in n.output if o}
    wanted = [name for name in read if name in producer and name in initializers]
    closure: set[int] = set()
    stack = [producer[name] for name in wanted]
    while stack:
        i = stack.pop()
        if i not in closure:
            closure.add(i)
            stack.extend(producer[n] for n in folded.nodes[i].input if n in producer)
    group = {i: i for i in closure}

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in closure:
        for name in folded.nodes[i].input:
            if name in producer and producer[name] in closure:
                group[root(i)] = root(producer[name])
    taken = {o for n in graph.node for o in n.output} | set(initializers)
    restored: set[int] = set()
    for members in _groups(closure, root).values():
        outputs = {o for i in members for o in folded.nodes[i].output if o}
        values = sum(_nbytes(initializers[o]) for o in outputs if o in initializers and o in read)
        leaves = {n for i in members for n in folded.nodes[i].input if n and n not in producer}
        added = sum(_nbytes(folded.leaves[n]) for n in leaves if n not in initializers)
        clash = any(o in taken and not (o in initializers and o in read) for o in outputs)
        if added < values and not clash:
            restored |= members
    if not restored:
        return
    outputs = {o for i in restored for o in folded.nodes[i].output if o}
    leaves = {n for i in restored for n in folded.nodes[i].input if n and n not in producer}
    kept = [t for t in graph.initializer if t.name not in outputs]
    kept += [folded.leaves[n] for n in sorted(leaves) if n not in initializers]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [folded.nodes[i] for i in sorted(restored)] + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def _groups(members: set[int], root) -> dict[int, set[int]]:
    groups: dict[int, set[int]] = {}
    for i in members:
        groups.setdefault(root(i), set()).add(i)
    return groups


def _nbytes(tensor: onnx.TensorProto) -> int:
    return tensor.ByteSize()


def drop_dead_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads (after an If was inlined: the branch not taken left the
    nodes that only it read, e.g. the batch statistics of a training-mode BatchNorm)."""
    used = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):
        if any(o in used for o in node.output):
            kept.append(node)
            used |= set(node.input) | implicit_inputs(node)
    return kept[::-1]


#: onnx's reference evaluator implements these from opset 19 on; for integer inputs the earlier versions compute the
#: same (opset 19 added float8 types, 21 blocked quantization), so the weights of a QDQ model exported at opset 13-18
#: are folded with opset 19's implementation
QUANTIZATION_OPS = ("DequantizeLinear", "QuantizeLinear")


def _evaluate(node, values, opset_imports):
    if node.op_type in QUANTIZATION_OPS and node.domain in ("", "ai.onnx"):
        opset_imports = [helper.make_opsetid(i.domain, max(i.version, 19)) if i.domain in ("", "ai.onnx") else i
                         for i in opset_imports]
    sub_inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in node.input if n]
    sub_outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in node.output if n]
    model = helper.make_model(helper.make_graph([node], "fold", sub_inputs, sub_outputs),
                              opset_imports=list(opset_imports))
    feeds = {n: values[n] for n in node.input if n}
    return ReferenceEvaluator(model).run(None, feeds)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node, a subgraph of a node (outer-scope reads), or a graph output."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used |= set(node.input) | implicit_inputs(node)
    return used


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers nothing reads, except the defaults of graph inputs (without it the input is required)."""
    used = _used_names(graph) | {v.name for v in graph.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fold_static_shapes(graph: onnx.GraphProto, shapes: dict[str, list]) -> bool:
    """Replace by constants the ``Shape`` nodes whose input has static dims (over the node's ``start:end``), and the
    ``Gather``s of constant indices from a ``Shape`` whose gathered dims are static (a dynamic batch stays open).
    torch's TorchScript exporter computes the bounds of ``chunk`` from ``Shape(x)``; as constants they fold, and the
    Slices get constant bounds. Returns whether anything was folded."""
    constants = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    folded = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Shape" and shapes.get(node.input[0]) is not None:
            dims = shapes[node.input[0]]
            start, end = (next((a.i for a in node.attribute if a.name == key), default)
                          for key, default in (("start", 0), ("end", len(dims))))
            if None not in dims[start:end]:
                folded[node.output[0]] = np.asarray(dims[start:end], dtype=np.int64)
        elif node.op_type == "Gather" and node.input[1] in constants and node.input[0] in producer:
            shape_node = producer[node.input[0]]
            dims = shapes.get(shape_node.input[0]) if shape_node.op_type == "Shape" and not shape_node.attribute \
                else None
            if dims is None:
                continue
            index = numpy_helper.to_array(next(t for t in graph.initializer if t.name == node.input[1]))
            picked = np.asarray(dims, dtype=object)[index.astype(np.int64) % len(dims)]
            if not any(d is None for d in np.atleast_1d(picked)):
                folded[node.output[0]] = np.asarray(picked, dtype=np.int64)  # a scalar index picks an int
    if not folded:
        return False
    kept = [n for n in graph.node if not (n.output and n.output[0] in folded)]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in folded.items())
    return True
