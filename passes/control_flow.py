"""Control flow at canonicalization: an ``If`` whose condition is a constant is replaced by the branch it takes.

tf2onnx writes one ``If`` per BatchNormalization of a Keras model whose learning phase is a constant ``False``
(``tf.cond(learning_phase, training_bn, inference_bn)``): the condition is an initializer, or the default of an
input that the compiler treats as a constant like every other default (see
:func:`onnxlrp.passes.canonicalize.constants_to_initializers`). The taken branch's nodes join the main graph, with
every name local to the branch renamed under the If's name (its nodes' outputs, its initializers, and their uses in
nested subgraphs), and an Identity per If output that canonicalization then drops. Its nodes may in turn be folded
(a constant BatchNorm scale) or be rule-bearing (a Conv). Other If/Loop/Scan nodes stay as they are; on the
relevance path they are reported as unsupported (the op registry gives them no emitter).
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxlrp.graph import subgraphs


def branch_taken(node: onnx.NodeProto, condition: bool) -> onnx.GraphProto | None:
    """The ``then_branch`` or ``else_branch`` graph of an If."""
    wanted = "then_branch" if condition else "else_branch"
    return next((a.g for a in node.attribute if a.name == wanted), None)


def every_name(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in ``graph`` and its subgraphs."""
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names |= set(node.input) | set(node.output) | {node.name}
        for g in subgraphs(node):
            names |= every_name(g)
    return names


def rename_uses(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """Rename the outer-scope reads of ``renamed`` names inside a nested subgraph (its own locals shadow them)."""
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer} | \
        {o for node in graph.node for o in node.output}
    visible = {k: v for k, v in renamed.items() if k not in local}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = visible.get(name, name)
        for g in subgraphs(node):
            rename_uses(g, visible)
    for out in graph.output:
        out.name = visible.get(out.name, out.name)


def inline_if(node: onnx.NodeProto, condition: bool, taken: set[str]) -> tuple[list, list] | None:
    """``(nodes, initializers)`` that compute the If's outputs from the branch ``condition`` selects, with fresh
    names (``taken``: names in use, updated); None when the branch cannot be inlined (sparse initializers)."""
    branch = branch_taken(node, condition)
    if branch is None or len(branch.output) != len(node.output) or len(branch.sparse_initializer):
        return None
    prefix = node.name or node.output[0]

    def fresh(name: str) -> str:
        candidate, counter = f"{prefix}/{name}", 0
        while candidate in taken:
            counter += 1
            candidate = f"{prefix}/{name}_{counter}"
        taken.add(candidate)
        return candidate

    local = [t.name for t in branch.initializer] + [o for n in branch.node for o in n.output if o]
    renamed = {name: fresh(name) for name in local}
    initializers = []
    for t in branch.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = renamed[t.name]
        initializers.append(copy)
    nodes = []
    for inner in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner)
        copy.name = fresh(inner.name or inner.op_type)
        copy.input[:] = [renamed.get(n, n) for n in inner.input]
        copy.output[:] = [renamed.get(n, n) for n in inner.output]
        for g in subgraphs(copy):
            rename_uses(g, renamed)
        nodes.append(copy)
    for inner_out, out in zip(branch.output, node.output, strict=True):
        if out:
            nodes.append(helper.make_node("Identity", [renamed.get(inner_out.name, inner_out.name)], [out],
                                          name=fresh("output")))
    return nodes, initializers
