"""The relevance pass: append to a canonical forward graph the ONNX ops of an LRP backward sweep.

Load -> canonicalize (:mod:`onnxlrp.passes.canonicalize`) -> plan -> family sweep -> save. The sweep visits the nodes
on the relevance path (data paths from the float inputs to the explained tensor) in reverse topological order; each
node's backward emitter comes from the op registry (:mod:`onnxlrp.passes.ops`), the rule of each rule-bearing node
and everything else in which LRP variants differ from the propagation family (:mod:`onnxlrp.passes.families`). A
tensor's relevance is what the family combines from its readers (classic: their sum; R-LRP: Eq. 13 at forks).
The explained tensor is chosen in :mod:`onnxlrp.passes.explained`; the seed and the declared outputs are emitted by
:class:`onnxlrp.passes.outputs.SeedAndOutputs`, the pass's base class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlrp.builder import GraphBuilder
from onnxlrp.errors import OnnxlrpError, UnsupportedOpError
from onnxlrp.graph import GraphView
from onnxlrp.messages import quote
from onnxlrp.rules import Rule

from . import attention_patterns, signal_patterns  # noqa: F401  (register their recognizers)
from .diagnostics import batch_axis, input_dims, unsupported_summary
from .explained import FLOAT_TYPES, data_inputs, explained_tensor
from .families import Family, PlanNode
from .forward_reads import ForwardReads
from .linear import linear_layer
from .ops import data_input_indices, spec
from .ops.gates import describe_gate
from .ops.helpers import path_inputs
from .outputs import SeedAndOutputs
from .patterns import find_matches, fused_node_list
from .quantized import standard_form
from .tokens import token_inputs


@dataclass
class RelevancePass(SeedAndOutputs):
    """Emits the backward sweep of ``family`` into ``model`` (modified in place)."""

    model: onnx.ModelProto
    shapes: dict[str, list]
    family: Family
    output: str | None = None
    node_output: str | None = None
    node_inputs: list[str] | None = None  # intermediate tensors explained instead of the float graph inputs
    relevance_at: tuple[str, ...] = ()  # inner tensors whose relevance is output too (``relevance@TENSOR``)
    folded: object = None  # the constant subgraphs canonicalization folded (FoldedConstants), for QDQ weights
    position: int | None = None  # the explained position of a [batch, tokens, classes] output
    predicted_from: str | None = None  # the tensor whose arg-max a target of -1 means (default: the explained one)
    labels: dict[str, str] | None = None  # source -> the name its relevance output and value info go by
    graph: onnx.GraphProto = field(init=False)
    view: GraphView = field(init=False)
    b: GraphBuilder = field(init=False)
    constants: dict = field(init=False)
    tensors: set = field(init=False)
    layers: dict = field(init=False)
    plan: dict = field(init=False, default_factory=dict)
    opset: int = field(init=False)

    def __post_init__(self):
        self.graph = self.model.graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.matches = find_matches(self.graph, self.constants, self.shapes) if self.family.fuses_patterns else []
        for found in self.matches:
            self.constants.update(found.constants)
        self.quantized = standard_form(fused_node_list(self.graph, self.matches), self.constants)
        self.constants.update(self.quantized.constants)
        self.view = GraphView.of(self.graph, self.quantized.nodes)
        self.b = GraphBuilder(self.graph)
        self.forward = ForwardReads(self, self.quantized)
        self.algebra = self.family.algebra
        self.opset = next(i.version for i in self.model.opset_import if i.domain in ("", "ai.onnx"))
        self.token_inputs = [] if self.node_inputs else token_inputs(self.graph, self.view.consumers,
                                                                     self.constants)
        self.sources = self.start_tensors() if self.node_inputs else [v.name for v in data_inputs(self.graph)] + \
            [lookup for token in self.token_inputs for lookup in token.lookups]
        if not self.sources:
            raise OnnxlrpError("the model has no float data input and no token input (integer ids looked up in an "
                               "embedding table) to explain (--node-input names a float tensor to explain instead, "
                               "e.g. an embedding)")
        self.target, self.explained_why = explained_tensor(self.graph, self.view, self.output, self.node_output,
                                                           self.shapes)
        self.tensors = self.view.relevance_tensors(self.sources, self.target)
        if not self.tensors:
            origin = "--node-input " + ", ".join(self.sources) if self.node_inputs else "the inputs"
            raise OnnxlrpError(f"no data path leads from {origin} to {self.target!r}")
        self.nodes = self.view.relevance_nodes(self.tensors)
        for name in self.relevance_at:
            if name not in self.tensors:
                known = name in self.view.producer or name in self.sources
                raise OnnxlrpError(f"--relevance-at {name!r}: " + (
                    "not on the relevance path (no data path from an input through it to the explained tensor "
                    f"{self.target!r})" if known else "no tensor of that name in the (canonicalized) model"))
        self.float32: dict[str, str] = {}
        self.layer_output: dict[str, str] = {}  # linear node -> its forward output (with the bias Add)
        self.layers = {}
        self._nonneg: dict[str, bool] = {}
        self._vanishes: dict[str, bool] = {self.target: True}
        for node in self.nodes:
            layer = linear_layer(self, node)
            if layer is not None:
                self.layer_output[node.name] = layer.z
                layer.x_nonneg = self.nonnegative(layer.x)
                layer.x, layer.z = self.value(layer.x), self.value(layer.z)
                if layer.transpose_x:
                    layer.x = self.b.op("Transpose", [layer.x], "x_T", perm=[1, 0])
                self.layers[node.name] = layer
        self.join_shares: dict[tuple[str, int], str] = {}  # (join, input index) -> the relevance it routed there

    @property
    def explained_inputs(self) -> list[str]:
        """The tensors that get relevance outputs: the ``node_inputs``, or the float data inputs and the token
        inputs."""
        if self.node_inputs:
            return list(self.sources)
        return [v.name for v in data_inputs(self.graph)] + [t.name for t in self.token_inputs]

    # ------------------------------------------------------------ analysis

    def unsupported_nodes(self) -> list[tuple[onnx.NodeProto, str]]:
        """Every node on the relevance path that cannot carry relevance, with the reason."""
        return [(node, reason) for node in self.nodes if (reason := self.family.unsupported_reason(self, node))]

    def start_tensors(self) -> list[str]:
        """The ``node_inputs``, checked: float tensors that a node writes (or graph inputs), outside the subgraphs
        that patterns fuse into one node, none computed from another. They replace the float graph inputs as the
        sources of the relevance path: the nodes before them need no rule."""
        names = list(dict.fromkeys(self.node_inputs))
        graph_inputs = {v.name for v in self.graph.input} - {t.name for t in self.graph.initializer}
        written = {o for n in self.graph.node for o in n.output}
        for name in names:
            if name not in written and name not in graph_inputs:
                raise OnnxlrpError(f"--node-input {name!r} is not written by any node" +
                                   (" (it is a constant)" if name in self.constants else ""))
            if name not in self.view.flow and name not in graph_inputs:
                raise OnnxlrpError(f"--node-input {name!r} lies inside a subgraph fused into one node (an activation "
                                   "pattern); name its input or output instead")
            if self.elem_type(name) not in FLOAT_TYPES:
                raise OnnxlrpError(f"--node-input {name!r} is not a float tensor")
        for a in names:
            for b in names:
                if a != b and a in self.view.flow and b in self.view.flow and nx.has_path(self.view.flow, a, b):
                    raise OnnxlrpError(f"--node-input {b!r} is computed from --node-input {a!r}; name one of them")
        return names

    def source_value_info(self, name: str) -> onnx.ValueInfoProto | None:
        """The declared or inferred type and shape of a relevance source."""
        return next((vi for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output)
                     if vi.name == name), None)

    def unsupported(self) -> list[str]:
        """Every node on the relevance path that cannot carry relevance, one line each (``inspect`` prints them)."""
        problems = []
        for node, reason in self.unsupported_nodes():
            domain = node.domain or "ai.onnx"
            problems.append(f"{node.name or node.output[0]} ({node.op_type}, domain {domain}, "
                            f"opset {self.opset_of(domain)}): {reason}")
        return problems

    def pattern_lines(self) -> list[str]:
        """One line per recognized pattern (:mod:`onnxlrp.passes.patterns`) and per gate on the relevance path."""
        on_path = {n.name for n in self.nodes}
        lines = [m.describe() for m in self.matches if m.node.name in on_path]
        return lines + [describe_gate(self, n) for n in self.nodes
                        if spec(n).kind == "gate" and len(path_inputs(self, n)) > 1]

    def request_input_shapes(self, needs_static: onnx.NodeProto) -> None:
        """``needs_static`` (a convolution, pooling, padding or slicing node) needs static sizes: ask for the open
        dims of the first data input that has open dims besides its batch axis (:func:`batch_axis`), keeping the
        batch where it is and dynamic; when only batch axes are open, ask for a batch size."""
        inputs = []
        for vi in data_inputs(self.graph):
            dims = input_dims(vi)
            axis, how = batch_axis(dims)
            open_axes = [i for i, d in enumerate(dims) if not isinstance(d, int)]
            if open_axes:
                inputs.append((vi.name, dims, axis, how, [i for i in open_axes if i != axis]))
        if not inputs:
            return
        name, dims, axis, how, others = next((entry for entry in inputs if entry[4]), inputs[0])
        node = f"node {quote(needs_static.name)} ({needs_static.op_type}) needs static sizes"
        if others:
            hint = ",".join("-1" if i == axis else "N" if i in others else str(d) for i, d in enumerate(dims))
            batch = (f"-1 keeps axis {axis}, the batch ({how}), dynamic" if axis is not None else
                     f"no axis is taken as the batch ({how})")
            raise OnnxlrpError(f"input {quote(name)} has open dims {dims} and {node}: give them with --input-shape "
                               f"{name}={hint} (N = your size; {batch})")
        hint = ",".join("B" if i == axis else str(d) for i, d in enumerate(dims))
        raise OnnxlrpError(f"input {quote(name)} has open dims {dims} and {node}; its only open axis is the batch "
                           f"(axis {axis}, {how}): give a batch size with --input-shape {name}={hint} (B = your batch "
                           f"size; -1 there would keep it open)")

    def opset_of(self, domain: str) -> int | str:
        for imp in self.model.opset_import:
            if imp.domain == domain or (domain == "ai.onnx" and imp.domain == ""):
                return imp.version
        return "?"

    def plan_nodes(self) -> list[PlanNode]:
        """The rule-bearing nodes in topological order: linear layers, pools, resizes, joins (Add/Sum/Sub,
        element-wise Max/Min) with several relevance inputs, offsets (an Add/Sub whose other operand carries no
        relevance and is not a linear layer's bias), softmax, matrix products of two activations, gates with two
        relevance-carrying factors, normalizations. An op with several kinds (a fused ``Attention``: ``softmax`` and
        ``matmul``) has one entry per kind, named ``<node>/<kind>``.
        ``depth`` counts the linear layers on the longest path from an input up to and including the node (the first
        layer has depth 1); ``index`` is the position among the nodes of the same kind."""
        linear_out = set(self.layer_output.values())
        sub = self.view.flow.subgraph(self.tensors)
        depth_at: dict[str, int] = {}
        for t in nx.topological_sort(sub):
            depth_at[t] = max((depth_at[p] for p in sub.predecessors(t)), default=0) + (t in linear_out)
        counts: dict[str, int] = {}
        planned = []
        for node in self.nodes:
            kind = spec(node).kind
            if kind == "join" and len(path_inputs(self, node)) < 2:
                kind = "offset" if node.op_type in ("Add", "Sub") and node.output[0] not in linear_out else None
            if kind is None or (kind == "linear" and node.name not in self.layers) or \
                    (kind != "offset" and (spec(node).join or kind == "gate") and len(path_inputs(self, node)) < 2):
                continue
            out = self.layer_output[node.name] if kind == "linear" else \
                next(o for o in node.output if o in self.tensors)
            kinds = kind if isinstance(kind, tuple) else (kind,)
            for k in kinds:
                name = node.name if len(kinds) == 1 else f"{node.name}/{k}"
                planned.append(PlanNode(name, node.op_type, k, counts.get(k, 0), depth_at[out]))
                counts[k] = counts.get(k, 0) + 1
        return planned

    def label(self, name: str) -> str:
        """The name ``name`` goes by for the user (the Taylor family's root copies go by their originals)."""
        return (self.labels or {}).get(name, name)

    def rule(self, node: onnx.NodeProto, kind: str | None = None) -> Rule:
        """The rule the family planned for ``node`` (for one of its ``kind`` when it has several)."""
        return self.plan[node.name if kind is None else f"{node.name}/{kind}"]

    def nonnegative(self, tensor: str) -> bool:
        """Whether ``tensor`` is >= 0 for every input: by the facts of its producer (:attr:`OpSpec.nonnegative`), or
        a non-negative constant."""
        if tensor in self._nonneg:
            return self._nonneg[tensor]
        self._nonneg[tensor] = False
        node = self.view.producer.get(tensor)
        if node is None:
            value = self.constants.get(tensor)
            result = value is not None and value.size > 0 and bool(np.all(value >= 0))
        else:
            fact = spec(node).nonnegative
            if fact == "always":
                result = True
            elif fact == "first":
                result = self.nonnegative(node.input[0])
            elif fact == "all":
                result = all(self.nonnegative(i) for i in node.input if i)
            else:
                result = bool(fact) and fact(self.nonnegative, node, tensor)
        self._nonneg[tensor] = result
        return result

    def vanishes_at_zero(self, tensor: str) -> bool:
        """Whether the relevance every reader sends back to ``tensor`` is 0 wherever ``tensor`` is 0. True when each
        reader on the relevance path has a rule that multiplies by its input (epsilon, gamma, z+, alpha-beta, the
        Norm rule of joins and average pools), or maps 0 to 0 (Relu, max pooling, re-indexing, a product with a
        constant: :attr:`OpSpec.zero_preserving`) and its outputs have the same property. The explained tensor
        qualifies (one-hot times its value); flat, w^2 and z^B readers do not."""
        if tensor in self._vanishes:
            return self._vanishes[tensor]
        self._vanishes[tensor] = False
        on_path = {n.name for n in self.nodes}
        result = True
        for node, idx in self.view.consumers.get(tensor, []):
            if node.name not in on_path or idx not in data_input_indices(node):
                continue
            if not self._reader_vanishes(node, idx):
                result = False
                break
        self._vanishes[tensor] = result
        return result

    def _reader_vanishes(self, node: onnx.NodeProto, idx: int) -> bool:
        rule = self.plan.get(node.name)
        if rule is not None:
            if rule.multiplies_by_input:
                return idx == 0 or "linear" not in rule.kinds
            preserves = rule.preserves_zero
        else:
            fact = spec(node).zero_preserving
            preserves = fact if isinstance(fact, bool) else fact(self, node, idx)
        return preserves and all(self.vanishes_at_zero(o) for o in node.output if o in self.tensors)

    def relu_behind(self, z: str) -> str | None:
        """``Relu(z)`` (as float32) when the relevance of ``z`` is 0 wherever ``z <= 0``: the only reader of ``z`` is
        a Relu, or a Clip with lower bound 0 (ReLU6), and the relevance of that reader's output vanishes where the
        output is 0. The rules may then divide by ``Relu(z) + eps`` instead of ``stab(z)`` (see
        :func:`onnxlrp.quotients.divide_behind_relu`): the Relu's own output, which leaves the forward Conv + Relu
        fusable, or one Relu on ``z`` behind a Clip (where ``z > hi`` the Clip's output is not ``z``)."""
        if not self.family.divides_by_outputs:
            return None
        readers = self.view.consumers.get(z, [])
        if len(readers) != 1 or z in {o.name for o in self.graph.output}:
            return None
        gate = readers[0][0]
        y = gate.output[0]
        if gate.op_type not in ("Relu", "Clip") or y not in self.tensors or not self.vanishes_at_zero(y):
            return None
        if gate.op_type == "Relu":
            return self.value(y)
        if not self.clips_at_zero(gate):
            return None
        self.b.scope = gate.name or y
        return self.b.op("Relu", [self.value(z)], "z_pos")

    def join_stand_in(self, node: onnx.NodeProto, y: str) -> dict[int, str]:
        """``{k: y - (the other operands)}`` for one operand ``u_k`` of a join ``a = u_0 + u_1 + ...`` behind a Relu
        (``y = Relu(a)``) that a Conv or BatchNormalization produces for this join alone.

        The join's relevance is 0 wherever ``y = 0``, and elsewhere ``a = y``, so ``y - sum_{j != k} u_j`` equals
        ``u_k`` up to half an ulp of ``a`` wherever the relevance is non-zero: the rules may read it instead of
        ``u_k`` (:attr:`GraphBuilder.stand_ins`). onnxruntime can then keep the convolution, the Add and the Relu in
        one kernel, as in the source model (ResNet's bottleneck); reading ``u_k`` itself would split them into three
        passes over the block's widest tensor. Not for float16 joins, where half an ulp of ``a`` is 5e-4 of it."""
        if (node.op_type not in ("Add", "Sum") or len(set(node.input)) != len(node.input) or
                self.elem_type(node.output[0]) in (TensorProto.FLOAT16, TensorProto.BFLOAT16)):
            return {}
        shape = self.shapes.get(node.output[0])
        if shape is None or any(self.shapes.get(u) != shape or u not in self.tensors for u in node.input):
            return {}
        outputs = {o.name for o in self.graph.output}
        for k, u in enumerate(node.input):
            producer = self.view.producer.get(u)
            if (producer is None or not spec(producer).fusable_producer or u in outputs or
                    len(self.view.consumers.get(u, [])) != 1):
                continue
            others = [self.value(v) for j, v in enumerate(node.input) if j != k]
            rest = others[0] if len(others) == 1 else self.b.op("Sum", others, "others")
            stand_in = self.b.op("Sub", [y, rest], "z_stand_in")
            self.b.stand_ins[stand_in] = self.value(u)
            return {k: stand_in}
        return {}

    def clips_at_zero(self, clip: onnx.NodeProto) -> bool:
        """A Clip whose lower bound is the constant 0 and whose upper bound, if any, is a positive constant."""
        low, high = (list(clip.input[1:3]) + ["", ""])[:2]
        low_value = self.constants.get(low) if low else None
        high_value = self.constants.get(high) if high else None
        return (low_value is not None and low_value.size == 1 and low_value.item() == 0 and
                (not high or (high_value is not None and high_value.size == 1 and high_value.item() > 0)))

    # ------------------------------------------------------------ helpers used by emitters and families

    def elem_type(self, name: str) -> int:
        if not hasattr(self, "_types"):
            self._types = {vi.name: vi.type.tensor_type.elem_type for vi in
                           list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output)}
            self._types |= {t.name: t.data_type for t in self.graph.initializer}
        return self._types.get(name, TensorProto.FLOAT)


    def value(self, name: str) -> str:
        """A forward tensor as float32: relevance is always computed in float32 (float16 models keep their float16
        forward pass; each forward value the rules read is cast once). In a quantized model, a tensor that
        onnxruntime computes inside a fused integer kernel is recomputed (:class:`ForwardReads`)."""
        if name not in self.float32:
            scope, value = self.b.scope, self.forward.read(name)
            if self.elem_type(name) != TensorProto.FLOAT and name not in self.forward.float_valued:
                self.b.scope = "float32"
                value = self.b.op("Cast", [value], "f32", to=TensorProto.FLOAT)
            self.b.scope = scope
            self.float32[name] = value
        return self.float32[name]

    def shape_of(self, name: str) -> str:
        """``Shape`` of a forward tensor (its static shape where reading it would change the forward pass)."""
        return self.forward.shape(name)

    def reduce(self, op: str, x: str, axes: list[int], keepdims: int = 1, hint: str | None = None) -> str:
        """A Reduce* op in the attribute (opset < 18) or input (opset >= 18) form (ReduceSum: input from 13)."""
        b = self.b
        if op == "ReduceSum" or self.opset >= 18:
            return b.op(op, [x, b.const(axes, "axes", np.int64)], hint or op, keepdims=keepdims)
        return b.op(op, [x], hint or op, axes=axes, keepdims=keepdims)

    def add_relevance(self, terms: list[str]) -> str:
        """The algebra's ``plus`` of relevance terms."""
        return terms[0] if len(terms) == 1 else self.b.op(self.algebra.plus_op, terms, "R")

    def zeros_like(self, tensor: str) -> str:
        """The algebra's zero, in its type, in ``tensor``'s shape (relevance of an output nothing reads)."""
        b = self.b
        zero, dtype = self.algebra.zero, self.algebra.dtype
        value = None if zero == 0 and dtype == TensorProto.FLOAT else helper.make_tensor("value", dtype, [1], [zero])
        return b.op("ConstantOfShape", [self.shape_of(tensor)], "zeros", value=value)

    def relevance_const(self, value, hint: str = "const") -> str:
        """A constant in the algebra's type."""
        return self.b.const(value, hint, helper.tensor_dtype_to_np_dtype(self.algebra.dtype))

    def pad_with_zero(self, r: str, pads: list[int]) -> str:
        """``r`` padded with the algebra's zero."""
        b = self.b
        inputs = [r, b.const(pads, "pads", np.int64)]
        if self.algebra.zero != 0 or self.algebra.dtype != TensorProto.FLOAT:
            inputs.append(self.relevance_const(self.algebra.zero, "zero"))
        return b.op("Pad", inputs, "R")

    # ------------------------------------------------------------ the sweep

    def run(self) -> dict[str, str]:
        """Emit everything; returns the relevance tensor of every data input."""
        problems = self.unsupported_nodes()
        static = [node for node, reason in problems if "static" in reason]
        if static:
            self.request_input_shapes(static[0])
        if problems:
            raise UnsupportedOpError(f"{len(problems)} node(s) on the relevance path have no rule: "
                                     f"{unsupported_summary(problems)}")
        self.plan = self.family.plan(self.plan_nodes())
        if self.family.divides_by_outputs:
            for name, layer in self.layers.items():
                layer.relu_out = self.relu_behind(self.layer_output[name])
        self.family.prepare(self)
        r0, self.explained_value = self.initial_relevance()
        received: dict[str, list[tuple[str, int, str]]] = {self.target: [("\0target", 0, r0)]}
        relevance: dict[str, str] = {}
        for node in reversed(self.nodes):
            r_out = []
            for out in node.output:
                parts = received.get(out)
                if parts and out not in relevance:
                    self.b.scope = f"{node.name}/combine"
                    relevance[out] = self.family.combine(self, out, parts)
                r_out.append(relevance.get(out))
            if all(r is None for r in r_out):
                continue
            self.b.scope = node.name or node.output[0]
            emitted = self.family.emitter(self, node)(self, node, r_out)
            self.family.propagated(self, r_out, list(emitted.values()))
            for idx, r in emitted.items():
                received.setdefault(node.input[idx], []).append((node.name, idx, r))
        self.b.scope = "inputs"
        result = {}
        for name in self.sources:
            parts = received.get(name)
            result[name] = self.family.combine(self, name, parts) if parts else None
        self.inner_relevance = {name: relevance.get(name, result.get(name)) for name in self.relevance_at}
        return result


def rule_table(plan: dict[str, Rule]) -> dict[str, str]:
    return {name: rule.describe() for name, rule in plan.items()}
