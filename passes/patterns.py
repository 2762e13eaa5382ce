"""Patterns: subgraphs that exporters write for one conceptual layer, seen by the sweep as one fused node.

Converters decompose layers into primitive ops: SiLU as ``x * Sigmoid(x)``, GELU as ``0.5 x (1 + erf(x / sqrt 2))``,
HardSwish as ``x * Clip(x + 3, 0, 6) / 6``, LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div. A rule belongs to the layer,
not to its primitives (LXT gives an element-wise activation the identity rule, whatever ops compute it), so a
recognizer finds each such subgraph and returns a *virtual* node in the domain :data:`FUSED_DOMAIN` that reads the
subgraph's inputs (the data input first, then any forward values its rule needs) and writes its output.

The virtual nodes exist only in the analysis view the sweep works on (:meth:`onnxlrp.graph.GraphView.of`): the
forward graph keeps the exported nodes, so the original outputs stay bit for bit. A recognizer matches only when
no tensor inside the subgraph is read from outside it (or is a graph output); otherwise the primitives keep their
own rules.

Recognizers register with :func:`recognizer` and run in registration order; a node covered by one match is not
matched again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
from onnx import helper

from .ops.registry import FUSED_DOMAIN


@dataclass
class Match:
    """A virtual node and the names of the exported nodes it stands for."""

    node: onnx.NodeProto
    covered: list[str]


RECOGNIZERS: list[Callable] = []


def recognizer(fn: Callable) -> Callable:
    """Register ``fn(scope, node) -> Match | None``, tried on every node (last node of a candidate subgraph)."""
    RECOGNIZERS.append(fn)
    return fn


class Scope:
    """What recognizers see of the canonical graph: producers, readers, constants, shapes and graph outputs."""

    def __init__(self, graph: onnx.GraphProto, constants: dict, shapes: dict):
        self.graph, self.constants, self.shapes = graph, constants, shapes
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                if i:
                    self.readers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def private(self, interior: list[onnx.NodeProto], top: onnx.NodeProto) -> bool:
        """Whether every output of the ``interior`` nodes is read only by ``interior`` nodes or ``top`` (the node
        whose output the match keeps) and is no graph output."""
        inside = {id(n) for n in interior} | {id(top)}
        for n in interior:
            for o in n.output:
                if o in self.outputs or any(id(r) not in inside for r in self.readers.get(o, [])):
                    return False
        return True


def virtual_node(op_type: str, inputs: list[str], output: str, name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, [output], name=name, domain=FUSED_DOMAIN, **attrs)


def find_matches(graph: onnx.GraphProto, constants: dict, shapes: dict) -> list[Match]:
    scope = Scope(graph, constants, shapes)
    covered: set[str] = set()
    matches = []
    for node in graph.node:
        if node.name in covered:
            continue
        for recognize in RECOGNIZERS:
            match = recognize(scope, node)
            if match is not None and not covered & set(match.covered):
                matches.append(match)
                covered |= set(match.covered)
                break
    return matches


def fused_node_list(graph: onnx.GraphProto, matches: list[Match]) -> list[onnx.NodeProto]:
    """The graph's nodes with each match's covered nodes replaced by its virtual node, placed where the last covered
    node was (its inputs are produced before, its output read after: the order stays topological)."""
    last = {}
    for match in matches:
        positions = [i for i, n in enumerate(graph.node) if n.name in set(match.covered)]
        last[max(positions)] = match
    hidden = {name for m in matches for name in m.covered}
    nodes = []
    for i, node in enumerate(graph.node):
        if i in last:
            nodes.append(last[i].node)
        elif node.name not in hidden:
            nodes.append(node)
    return nodes


# ---------------------------------------------------------------- element-wise activations x * f(x)

# unary element-wise ops, and binary ones when the other operand is a constant
UNARY = {"Sigmoid", "Tanh", "Erf", "Softplus", "HardSigmoid", "Relu", "Neg", "Exp", "Abs", "Softsign", "Identity",
         "Cast", "Clip", "Gelu", "Mish", "HardSwish", "Elu", "Selu", "Celu", "LeakyRelu", "Reciprocal", "Sqrt"}
WITH_CONSTANT = {"Add", "Sub", "Mul", "Div", "Pow"}


def elementwise_chain(scope: Scope, tensor: str) -> list[tuple[str, onnx.NodeProto | None]]:
    """``tensor`` and the tensors it is an element-wise function of, walking back through :data:`UNARY` ops and
    arithmetic with a constant operand: [(tensor, its producer), ...], nearest first."""
    chain = []
    while True:
        node = scope.producer.get(tensor)
        chain.append((tensor, node))
        if node is None or node.domain not in ("", "ai.onnx"):
            return chain
        data = [i for i in node.input if i and not scope.is_constant(i)]
        if node.op_type in UNARY and len(data) == 1 and data[0] == node.input[0]:
            tensor = data[0]
        elif node.op_type in WITH_CONSTANT and len(data) == 1 and len(node.input) == 2:
            tensor = data[0]
        else:
            return chain


@recognizer
def activation_product(scope: Scope, node: onnx.NodeProto):
    """``x * f(x)`` where both factors are element-wise functions of one tensor ``x`` of the product's shape
    (SiLU/Swish ``x * Sigmoid(x)``, HardSwish ``x * HardSigmoid(x)`` or ``x * Clip(x + 3, 0, 6) / 6``, GELU
    ``0.5 x (1 + erf(x / sqrt 2))`` and its tanh form, Mish ``x * tanh(softplus(x))``): one element-wise activation
    ``ElementwiseActivation(x)``, which gets the identity rule (a Mul/Div by a constant after it, HardSwish's ``/ 6``,
    passes relevance anyway). The reciprocal forms are the same activations: ``x / (1 + exp(-x))``,
    ``x * Reciprocal(1 + exp(-x))``, ``x * (1 / (1 + exp(-x)))`` (a Div by, or of, a constant is arithmetic with a
    constant in the chain)."""
    if node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    a, b = node.input
    if scope.is_constant(a) or scope.is_constant(b) or a == b:
        return None
    chain_a, chain_b = elementwise_chain(scope, a), elementwise_chain(scope, b)
    tensors_b = [t for t, _ in chain_b]
    source = next((t for t, _ in chain_a if t in tensors_b), None)
    shape = scope.shapes.get(node.output[0])
    if source is None or shape is None or None in shape or scope.shapes.get(source) != shape:
        return None
    interior = [n for chain in (chain_a, chain_b) for t, n in chain[:[u for u, _ in chain].index(source)]]
    if not scope.private(interior, node):
        return None
    return Match(virtual_node("ElementwiseActivation", [source], node.output[0], f"{node.name}/activation"),
                 [n.name for n in interior] + [node.name])
