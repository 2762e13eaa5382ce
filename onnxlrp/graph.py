"""Read-only analysis views of an ONNX graph (networkx): the ONNX proto stays the one source of truth.

The data-flow view has one vertex per tensor name. An edge ``a -> b`` means a node reads ``a`` through a
*data* input and writes ``b``. Shape and index inputs (a Reshape's shape, a Slice's starts, ...) and ops whose
output is shape arithmetic (Shape, Size) carry no relevance, so they have no data edges: which inputs carry data is
a fact of each op type in the op registry (:mod:`onnxlrp.passes.ops`).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import onnx

from onnxlrp.passes.ops import data_input_indices
from onnxlrp.scopes import implicit_inputs, subgraphs  # noqa: F401 - subgraphs: re-exported


@dataclass
class GraphView:
    """Producers, consumers and the tensor-level data-flow DiGraph of one ONNX graph."""

    graph: onnx.GraphProto
    nodes: list[onnx.NodeProto]  # the graph's nodes, or an analysis list with virtual nodes (passes/patterns.py)
    flow: nx.DiGraph
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]]

    @classmethod
    def of(cls, graph: onnx.GraphProto, nodes: list[onnx.NodeProto] | None = None) -> GraphView:
        """The view of ``graph``, or of ``nodes`` (topologically sorted) standing for its nodes."""
        nodes = list(graph.node) if nodes is None else nodes
        flow = nx.DiGraph()
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in nodes:
            for out in node.output:
                if out:
                    producer[out] = node
                    flow.add_node(out)
            for i, name in enumerate(node.input):
                if name:
                    consumers.setdefault(name, []).append((node, i))
            sources = [node.input[i] for i in data_input_indices(node)] + sorted(implicit_inputs(node))
            for name in sources:
                for out in node.output:
                    if out:
                        flow.add_edge(name, out)
        return cls(graph, nodes, flow, producer, consumers)

    def relevance_tensors(self, sources: list[str], target: str) -> set[str]:
        """Tensors on some data path from a source to ``target`` (both included)."""
        if target not in self.flow:
            return set()
        upstream = nx.ancestors(self.flow, target) | {target}
        downstream: set[str] = set()
        for s in sources:
            if s in self.flow:
                downstream |= nx.descendants(self.flow, s) | {s}
        return upstream & downstream

    def relevance_nodes(self, tensors: set[str]) -> list[onnx.NodeProto]:
        """Nodes (topological order) that read a relevance tensor through a data input and write one."""
        nodes = []
        for node in self.nodes:
            reads = {node.input[i] for i in data_input_indices(node)} | implicit_inputs(node)
            if any(o in tensors for o in node.output) and reads & tensors:
                nodes.append(node)
        return nodes

    def forks_of_joins(self, tensors: set[str], sources: list[str], joins: list[onnx.NodeProto]) -> dict[str, str]:
        """Map each join node's name to its fork: the immediate dominator of the join's output tensor.

        Dominators are computed on the relevance sub-DAG with a virtual root feeding every source.
        """
        sub = self.flow.subgraph(tensors).copy()
        root = "\0root"
        sub.add_edges_from((root, s) for s in sources if s in tensors)
        idom = nx.immediate_dominators(sub, root)
        return {node.name: idom[node.output[0]] for node in joins if node.output[0] in idom}
