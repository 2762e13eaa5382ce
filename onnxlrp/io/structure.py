"""Graph structure: names, producers, references to outer scope and the topological order of the nodes."""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable

from onnx import GraphProto, ModelProto, NodeProto

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import node_label, prefix, quote
from onnxlrp.scopes import implicit_inputs, subgraphs

__all__ = ["KNOWN_DOMAINS", "check_domains", "check_structure"]

#: Operator domains the compiler knows; see :func:`check_domains`.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def _check_graph_structure(graph: GraphProto, outer: set[str], start: str, where: str) -> None:
    """Check one graph (``start``: the message prefix, ``where``: which graph) and its subgraphs; sort its nodes."""
    if not len(graph.output):
        raise OnnxlrpError(f"{start}{where}has no outputs")
    seen_out: set[str] = set()
    for o in graph.output:
        if not o.name:
            raise OnnxlrpError(f"{start}{where}has an output without a name")
        if o.name in seen_out:
            raise OnnxlrpError(f"{start}{where}has two outputs named {quote(o.name)}")
        seen_out.add(o.name)
    seen_in: set[str] = set()
    for i in graph.input:
        if i.name in seen_in:
            raise OnnxlrpError(f"{start}{where}has two inputs named {quote(i.name)}")
        seen_in.add(i.name)

    available = set(outer) | seen_in
    available.update(t.name for t in graph.initializer)
    available.update(sp.values.name for sp in graph.sparse_initializer)
    producer: dict[str, int] = {}
    nodes = list(graph.node)
    for idx, node in enumerate(nodes):
        for o in node.output:
            if not o:
                continue
            if o in producer:
                raise OnnxlrpError(
                    f"{start}{where}tensor {quote(o)} is produced by two nodes "
                    f"({node_label(nodes[producer[o]])} and {node_label(node)})"
                )
            if o in seen_in or o in available - set(outer):
                raise OnnxlrpError(
                    f"{start}{where}{node_label(node)} overwrites the graph input or initializer {quote(o)}"
                )
            producer[o] = idx

    deps: list[set[int]] = []
    for node in nodes:
        needed = {i for i in node.input if i} | implicit_inputs(node)
        mine: set[int] = set()
        for name in needed:
            if name in producer:
                mine.add(producer[name])
            elif name not in available:
                raise OnnxlrpError(
                    f"{start}{where}{node_label(node)} uses {quote(name)}, which no node, input or initializer produces"
                )
        deps.append(mine)
    for o in graph.output:
        if o.name not in producer and o.name not in available:
            raise OnnxlrpError(
                f"{start}{where}output {quote(o.name)} is not produced by any node, input or initializer"
            )

    order = _topological_order(deps)
    if order is None:
        raise OnnxlrpError(f"{start}{where}has a cycle: {_describe_cycle(nodes, deps)}")
    if order != list(range(len(nodes))):
        copies = []
        for i in order:
            c = NodeProto()
            c.CopyFrom(nodes[i])
            copies.append(c)
        del graph.node[:]
        graph.node.extend(copies)

    for node in graph.node:
        for g in subgraphs(node):
            _check_graph_structure(g, available | set(producer), start, f"{where}subgraph of {node_label(node)} ")


def _topological_order(deps: list[set[int]]) -> list[int] | None:
    """Kahn's algorithm, keeping the original order wherever the dependencies allow."""
    users: list[list[int]] = [[] for _ in deps]
    missing = [0] * len(deps)
    for i, mine in enumerate(deps):
        for d in mine:
            users[d].append(i)
            missing[i] += 1
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    return order if len(order) == len(deps) else None


def _describe_cycle(nodes: list[NodeProto], deps: list[set[int]]) -> str:
    # Follow dependencies from a node left over by Kahn's algorithm until one repeats.
    order = _topological_order(deps) or []
    done = set(order)
    start = next(i for i in range(len(nodes)) if i not in done)
    path: list[int] = []
    pos: dict[int, int] = {}
    cur = start
    while cur not in pos:
        pos[cur] = len(path)
        path.append(cur)
        cur = next(d for d in sorted(deps[cur]) if d not in done)
    cycle = path[pos[cur] :] + [cur]
    cycle.reverse()
    shown = [node_label(nodes[i]) for i in cycle[:8]]
    return " -> ".join(shown) + (" -> ..." if len(cycle) > 8 else "")


def check_structure(model: ModelProto, *, source: str | os.PathLike[str] | None = None) -> ModelProto:
    """Check the graph's structure; sort its nodes topologically.  Returns ``model`` itself.

    Raises OnnxlrpError for: no graph outputs, an output without a name, two outputs (or inputs) with
    the same name, a tensor produced by two nodes or a node overwriting an input/initializer, a node
    input (or subgraph reference to the enclosing scope) that nothing produces, an output nothing
    produces, and a cycle (the message lists the nodes on it).

    Nodes that are not in topological order are accepted: they are reordered *in place* (stable:
    nodes keep their original order wherever the dependencies allow), in subgraphs too, and the same
    model object is returned.  A sorted model is left untouched.
    """
    _check_graph_structure(model.graph, set(), prefix(source), "graph ")
    return model


def check_domains(
    model: ModelProto,
    nodes: Iterable[NodeProto] | None = None,
    *,
    source: str | os.PathLike[str] | None = None,
    known: Iterable[str] = KNOWN_DOMAINS,
) -> None:
    """Refuse nodes from operator domains onnxlrp does not know (see :data:`KNOWN_DOMAINS`).

    ``nodes`` defaults to every node of the main graph; the compiler passes only the nodes on the
    relevance path, so a custom op elsewhere in the model does not stop compilation.
    """
    known_set = set(known)
    for node in model.graph.node if nodes is None else nodes:
        if node.domain not in known_set:
            raise OnnxlrpError(
                f"{prefix(source)}{node_label(node)} uses the unknown operator domain {quote(node.domain)} "
                f"(known: {', '.join(quote(d) for d in sorted(known_set))})"
            )


