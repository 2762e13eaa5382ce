"""Which names a subgraph (the body of an If, Loop or Scan) reads from the scopes around it.

ONNX lets a subgraph use any tensor of an enclosing graph by name, without listing it as an input. A name is *local*
to a graph when the graph defines it: a graph input, an initializer (dense or sparse) or a node output. A graph reads
from outer scope every name that it, or a subgraph nested in it, uses without defining it -- as a node input or as
one of its own outputs (a branch may return an outer tensor as it is).

These outer reads are what the structure check treats as dependencies, what the relevance analysis treats as data
edges of the node that owns the subgraph, and what must be kept when a graph is pruned.
"""

from __future__ import annotations

from collections.abc import Iterator

from onnx import GraphProto, NodeProto

__all__ = ["defined_names", "implicit_inputs", "outer_names", "subgraphs"]


def subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    """The graphs held by ``node``'s attributes (``g`` and ``graphs``), in attribute order."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def defined_names(graph: GraphProto) -> set[str]:
    """The names local to ``graph``: its inputs, initializers, sparse initializers and node outputs."""
    names = {vi.name for vi in graph.input}
    names.update(t.name for t in graph.initializer)
    names.update(sp.values.name for sp in graph.sparse_initializer)
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def outer_names(graph: GraphProto) -> set[str]:
    """The names ``graph`` (and every subgraph nested in it) reads without defining: references to outer scope."""
    used = {o.name for o in graph.output if o.name}
    for node in graph.node:
        used.update(i for i in node.input if i)
        used |= implicit_inputs(node)
    return used - defined_names(graph)


def implicit_inputs(node: NodeProto) -> set[str]:
    """The outer-scope names that the subgraphs of ``node`` read: what ``node`` depends on besides its inputs."""
    names: set[str] = set()
    for g in subgraphs(node):
        names |= outer_names(g)
    return names
