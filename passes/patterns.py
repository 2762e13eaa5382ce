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

Recognizers register with :func:`recognizer`. :func:`find_matches` visits the nodes from the last to the first and
tries the recognizers in registration order on each, so the largest subgraph wins (a whole LayerNorm before the
``x * x`` inside it); a node covered by one match is not matched again. The normalization recognizers live in
:mod:`onnxlrp.passes.normalization_patterns`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import onnx
from onnx import helper

from .ops.registry import FUSED_DOMAIN


@dataclass
class Match:
    """A virtual node, the names of the exported nodes it stands for, their op types (for ``inspect``), and constants
    that the virtual node reads by name and that the graph does not hold (a weight folded from several nodes)."""

    node: onnx.NodeProto
    covered: list[str]
    ops: list[str]
    constants: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.node.op_type} at {self.covered[-1]!r} ({len(self.covered)} nodes: {', '.join(self.ops)})"


RECOGNIZERS: list[Callable] = []


def recognizer(fn: Callable) -> Callable:
    """Register ``fn(scope, node) -> Match | None``, tried on every node (the last node of a candidate subgraph)."""
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
        self.position = {n.name: i for i, n in enumerate(graph.node)}

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

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        """The inputs of ``node`` that are not constants."""
        return [i for i in node.input if i and not self.is_constant(i)]


def virtual_node(op_type: str, inputs: list[str], output: str, name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, [output], name=name, domain=FUSED_DOMAIN, **attrs)


def match(node: onnx.NodeProto, covered: list[onnx.NodeProto]) -> Match:
    """A :class:`Match` of ``node`` (virtual) for the exported nodes ``covered`` (the last one is the top)."""
    return Match(node, [n.name for n in covered], [n.op_type for n in covered])


def find_matches(graph: onnx.GraphProto, constants: dict, shapes: dict) -> list[Match]:
    scope = Scope(graph, constants, shapes)
    covered: set[str] = set()
    matches = []
    for node in reversed(graph.node):
        if node.name in covered:
            continue
        for recognize in RECOGNIZERS:
            found = recognize(scope, node)
            if found is not None and not covered & set(found.covered):
                matches.append(found)
                covered |= set(found.covered)
                break
    return matches[::-1]


def fused_node_list(graph: onnx.GraphProto, matches: list[Match]) -> list[onnx.NodeProto]:
    """The graph's nodes with each match's covered nodes replaced by its virtual node, placed where the last covered
    node was (its inputs are produced before, its output read after: the order stays topological)."""
    position = {n.name: i for i, n in enumerate(graph.node)}
    last = {max(position[name] for name in m.covered): m for m in matches}
    hidden = {name for m in matches for name in m.covered}
    nodes = []
    for i, node in enumerate(graph.node):
        if i in last:
            nodes.append(last[i].node)
        elif node.name not in hidden:
            nodes.append(node)
    return nodes


# ---------------------------------------------------------------- element-wise activations x * f(x)

# element-wise ops of their first input (any other input is a constant: Clip's bounds, a Cast's type)
UNARY = {"Sigmoid", "Tanh", "Erf", "Softplus", "HardSigmoid", "Relu", "Neg", "Exp", "Abs", "Softsign", "Identity",
         "Cast", "Clip", "Gelu", "Mish", "HardSwish", "Elu", "Selu", "Celu", "LeakyRelu", "Sqrt", "Reciprocal"}
# element-wise ops of two operands, either of which may be a constant
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
MAX_REGION = 64  # tensors an activation subgraph may span (GELU's tanh form has 9)
SINK = "\0sink"


def elementwise_operands(scope: Scope, node: onnx.NodeProto | None) -> list[str] | None:
    """The non-constant operands of ``node`` when its output is an element-wise function of them; None otherwise."""
    if node is None or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    data = scope.data_inputs(node)
    if node.op_type in UNARY:
        return data if data == [node.input[0]] else None
    if node.op_type in BINARY and len(node.input) == 2 and data:
        return data
    return None


@recognizer
def activation_product(scope: Scope, node: onnx.NodeProto):
    """``y = x * f(x)`` or ``y = x / g(x)``: a Mul (or Div) of two non-constant factors that are both element-wise
    functions of one tensor ``x`` of the product's shape, through any DAG of element-wise ops and constants
    (SiLU/Swish ``x * Sigmoid(x)``, HardSwish ``x * HardSigmoid(x)`` or ``x * Clip(x + 3, 0, 6) / 6``, GELU
    ``0.5 x (1 + erf(x / sqrt 2))`` and its tanh form ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))``, Mish
    ``x * tanh(softplus(x))``, and the reciprocal forms ``x / (1 + exp(-x))``, ``x * Reciprocal(1 + exp(-x))``):
    one element-wise activation ``ElementwiseActivation(x)``, which gets the identity rule (a Mul/Div by a constant
    after it, HardSwish's ``/ 6``, passes relevance anyway).

    ``x`` is the nearest tensor through which every data path from the product back to the rest of the graph passes
    (the first dominator of the paths' end in the reversed subgraph of same-shaped element-wise ops), so a bias Add or
    a BatchNormalization before ``x`` stays outside. A Mul whose factors come from different tensors (a gate, see
    :mod:`onnxlrp.passes.ops.gates`) or of a tensor with itself (``x * x``, part of a norm) does not match."""
    if node.op_type not in ("Mul", "Div") or elementwise_operands(scope, node) is None or \
            len(scope.data_inputs(node)) != 2:
        return None
    if node.input[0] == node.input[1]:
        return None
    shape = scope.shapes.get(node.output[0])
    if shape is None:
        return None
    reversed_dag = nx.DiGraph()
    pending, seen = list(node.input), set()
    reversed_dag.add_edges_from((node.output[0], i) for i in node.input)
    while pending:
        tensor = pending.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if len(seen) > MAX_REGION:
            return None
        operands = elementwise_operands(scope, scope.producer.get(tensor))
        if operands is None or scope.shapes.get(tensor) != shape:
            reversed_dag.add_edge(tensor, SINK)  # the region ends here
            continue
        reversed_dag.add_edges_from((tensor, o) for o in operands)
        pending.extend(operands)
    dominator = nx.immediate_dominators(reversed_dag, node.output[0])
    source = SINK
    while dominator[source] != node.output[0]:
        source = dominator[source]
    if source == SINK or scope.shapes.get(source) != shape:
        return None
    inside = nx.descendants(reversed_dag.subgraph(n for n in reversed_dag if n != source), node.output[0])
    interior = sorted((scope.producer[t] for t in inside), key=lambda n: scope.position[n.name])
    if not scope.private(interior, node):
        return None
    return match(virtual_node("ElementwiseActivation", [source], node.output[0], f"{node.name}/activation"),
                 interior + [node])


from . import normalization_patterns  # noqa: E402,F401  (registers the normalization recognizers)
