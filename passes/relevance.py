"""The relevance pass: append to a canonical forward graph the ONNX ops of an LRP backward sweep.

The sweep visits the nodes on the relevance path (data paths from the float inputs to the explained tensor) in
reverse topological order. A tensor's relevance is the sum of what its consumers send back. Under R-LRP, the
relevance a fork receives from each branch is first rescaled so that its sum equals the relevance that branch got
at its join (Prop. 14, Eq. 13); see :meth:`RelevancePass.combine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlrp.builder import GraphBuilder
from onnxlrp.errors import OnnxlrpError, UnsupportedOpError
from onnxlrp.graph import GraphView, data_input_indices
from onnxlrp.rules import AlphaBeta, Epsilon, Gamma, Rule, ZPlus, product

from .emitters import lookup, unsupported_reason
from .linear import linear_layer

TARGET_INPUT = "target"
RELEVANCE_OUTPUT = "relevance"
CLASS_OUTPUT = "explained_class"
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
TINY = 1e-30  # far above float32's smallest normal (1.2e-38), far below any relevance worth keeping
FORK_EPS = 1e-6  # relative stabilizer of Eq. 13's denominator
RANGE_STEPS = 4  # R-LRP: layers between per-sample rescalings of the relevance (see RelevancePass.keep_in_range)


def data_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are float tensors and not weights (initializer-backed inputs are weights)."""
    inits = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in inits and v.type.tensor_type.elem_type in FLOAT_TYPES]


SHAPE_ONLY = ("Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def explained_tensor(graph: onnx.GraphProto, view: GraphView, output: str | None, node_output: str | None) -> str:
    """The tensor whose target entry is explained: ``node_output``; else the chosen graph output (default: the
    first float tensor output, or the input of a ZipMap that produces an output); and when that value is a
    Softmax/LogSoftmax, possibly behind Identity/Cast/reshaping ops, the Softmax's input (the logits)."""
    names = [o.name for o in graph.output]
    if node_output:
        if node_output not in view.producer:
            raise OnnxlrpError(f"--node-output {node_output!r} is not produced by any node")
        return node_output
    if output is not None and output not in names:
        raise OnnxlrpError(f"--output {output!r} is not a graph output; outputs: {', '.join(names)}")
    candidates = [output] if output else \
        [o.name for o in graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES] + names
    for name in candidates:
        producer = view.producer.get(name)
        if producer is not None and producer.op_type == "ZipMap":
            name = producer.input[0]
        elif name not in [o.name for o in graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]:
            continue
        t = name
        while t in view.producer and view.producer[t].op_type in SHAPE_ONLY:
            t = view.producer[t].input[0]
        if t in view.producer and view.producer[t].op_type in ("Softmax", "LogSoftmax"):
            return view.producer[t].input[0]
        return name
    raise OnnxlrpError("the model has no float tensor output to explain")


@dataclass
class RelevancePass:
    """Emits the backward sweep into ``model`` (modified in place)."""

    model: onnx.ModelProto
    shapes: dict[str, list]
    plan_rules: callable  # (list of Linear, first-layer info) -> {node name: Rule}
    rlrp: bool
    output: str | None = None
    node_output: str | None = None
    graph: onnx.GraphProto = field(init=False)
    view: GraphView = field(init=False)
    b: GraphBuilder = field(init=False)
    constants: dict = field(init=False)
    tensors: set = field(init=False)
    layers: dict = field(init=False)
    plan: dict = field(init=False)
    opset: int = field(init=False)

    def __post_init__(self):
        self.graph = self.model.graph
        self.view = GraphView.of(self.graph)
        self.b = GraphBuilder(self.graph)
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.opset = next(i.version for i in self.model.opset_import if i.domain in ("", "ai.onnx"))
        self.sources = [v.name for v in data_inputs(self.graph)]
        if not self.sources:
            raise OnnxlrpError("the model has no float data input to explain")
        self.target = explained_tensor(self.graph, self.view, self.output, self.node_output)
        self.tensors = self.view.relevance_tensors(self.sources, self.target)
        if not self.tensors:
            raise OnnxlrpError(f"no data path leads from the inputs to {self.target!r}")
        self.nodes = self.view.relevance_nodes(self.tensors)
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
        self.join_shares: dict[tuple[str, int], str] = {}
        self.range_steps: dict[str, int] = {}  # R-LRP relevance tensor -> layers since its scale was last reset
        self.sample_sums: dict[str, str] = {}

    # ------------------------------------------------------------ analysis

    def unsupported(self) -> list[str]:
        """Every node on the relevance path that cannot carry relevance, one line each."""
        problems = []
        for node in self.nodes:
            reason = unsupported_reason(self, node)
            if reason:
                domain = node.domain or "ai.onnx"
                problems.append(f"{node.name or node.output[0]} ({node.op_type}, domain {domain}, "
                                f"opset {self.opset_of(domain)}): {reason}")
        return problems

    def request_input_shapes(self) -> None:
        """Convolution and pooling need static spatial dims: ask for the open ones by name."""
        for vi in data_inputs(self.graph):
            dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                    for d in vi.type.tensor_type.shape.dim]
            if any(not isinstance(d, int) for d in dims[1:]):
                example = ",".join(["-1"] + [str(d) if isinstance(d, int) else "N" for d in dims[1:]])
                raise OnnxlrpError(f"input {vi.name!r} has open dims {dims}; convolution and pooling need static "
                                   f"sizes: give them with --input-shape {vi.name}={example} (N = your size; -1 "
                                   f"keeps the batch dynamic)")

    def opset_of(self, domain: str) -> int | str:
        for imp in self.model.opset_import:
            if imp.domain == domain or (domain == "ai.onnx" and imp.domain == ""):
                return imp.version
        return "?"

    def linear_order(self) -> list[tuple[onnx.NodeProto, int]]:
        """Linear nodes in topological order with their depth: the number of linear layers on the longest path
        from an input up to and including the node (the first layer has depth 1)."""
        linear_out = set(self.layer_output.values())
        sub = self.view.flow.subgraph(self.tensors)
        depth_at: dict[str, int] = {}
        for t in nx.topological_sort(sub):
            depth_at[t] = max((depth_at[p] for p in sub.predecessors(t)), default=0) + (t in linear_out)
        return [(node, depth_at[self.layer_output[node.name]]) for node in self.nodes if node.name in self.layers]

    def nonnegative(self, tensor: str) -> bool:
        """Whether ``tensor`` is >= 0 for every input: a Relu (Clip, Sigmoid, ...) output, or pooled, re-indexed,
        summed or multiplied non-negative tensors, or a non-negative constant."""
        if tensor in self._nonneg:
            return self._nonneg[tensor]
        self._nonneg[tensor] = False
        node = self.view.producer.get(tensor)
        if node is None:
            value = self.constants.get(tensor)
            result = value is not None and value.size > 0 and bool(np.all(value >= 0))
        elif node.domain not in ("", "ai.onnx"):
            result = False
        elif node.op_type in ("Relu", "Sigmoid", "Softmax", "Abs", "Softplus", "Exp"):
            result = True
        elif node.op_type == "Clip":
            low = node.input[1] if len(node.input) > 1 else ""
            result = bool(low) and self.nonnegative(low)
        elif node.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Flatten",
                              "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout", "Slice",
                              "Split", "ReduceMean", "ReduceMax", "ReduceMin", "Expand", "Tile", "Cast"):
            result = self.nonnegative(node.input[0]) and (node.op_type != "MaxPool" or tensor == node.output[0])
        elif node.op_type in ("Add", "Sum", "Mul", "Concat", "Max", "Min", "Div"):  # (Max needs only one: kept simple)
            result = all(self.nonnegative(i) for i in node.input if i)
        elif node.op_type == "Pad":
            value = node.input[2] if len(node.input) > 2 else ""
            result = self.nonnegative(node.input[0]) and (not value or self.nonnegative(value))
        else:
            result = False
        self._nonneg[tensor] = result
        return result

    def vanishes_at_zero(self, tensor: str) -> bool:
        """Classic rules: whether the relevance every reader sends back to ``tensor`` is 0 wherever ``tensor`` is 0.
        True when each reader on the relevance path is a rule or Norm join that multiplies by its input (epsilon,
        gamma, z+, alpha-beta, average pooling, a sum of several relevance inputs) or an op with ``f(0) = 0``
        (Relu, max pooling, re-indexing, a product with a constant) whose outputs have the same property. The
        explained tensor qualifies (one-hot times its value); flat, w^2 and z^B readers do not."""
        if self.rlrp:
            return False
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
        op = node.op_type
        if node.name in self.layers:
            return idx == 0 and isinstance(self.plan.get(node.name), (Epsilon, Gamma, ZPlus, AlphaBeta))
        downstream = [o for o in node.output if o in self.tensors]
        if op in ("Add", "Sum", "Sub"):
            return sum(node.input[i] in self.tensors for i in data_input_indices(node)) > 1
        if op in ("AveragePool", "GlobalAveragePool", "ReduceMean"):
            return True
        if op == "Clip":
            bounds = [self.constants.get(n) if n else None for n in list(node.input[1:3]) + [""] * 2][:2]
            if (bounds[0] is not None and bounds[0] > 0) or (bounds[1] is not None and bounds[1] < 0):
                return False
        elif op == "Mul" or (op == "Div" and idx == 0):
            pass  # the other operand is a constant: the output is 0 where this input is
        elif op not in ("Relu", "LeakyRelu", "PRelu", "Tanh", "Identity", "Dropout", "Neg", "Cast", "MaxPool",
                        "GlobalMaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Slice",
                        "Pad", "Split"):
            return False
        return all(self.vanishes_at_zero(o) for o in downstream)

    def relu_behind(self, z: str) -> str | None:
        """``Relu(z)`` (as float32) when the relevance of ``z`` is 0 wherever ``z <= 0``: the only reader of ``z`` is
        a Relu, or a Clip with lower bound 0 (ReLU6), and the relevance of that reader's output vanishes where the
        output is 0. The rules may then divide by ``Relu(z) + eps`` instead of ``stab(z)`` (see
        :func:`onnxlrp.rules.divide_behind_relu`): the Relu's own output, which leaves the forward Conv + Relu
        fusable, or one Relu on ``z`` behind a Clip (where ``z > hi`` the Clip's output is not ``z``)."""
        if self.rlrp:
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
            if (producer is None or producer.op_type not in ("Conv", "BatchNormalization") or u in outputs or
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

    # ------------------------------------------------------------ helpers used by emitters

    def value(self, name: str) -> str:
        """A forward tensor as float32: relevance is always computed in float32 (float16 models keep their float16
        forward pass; each forward value the rules read is cast once)."""
        if self.elem_type(name) == TensorProto.FLOAT:
            return name
        if name not in self.float32:
            self.b.scope = "float32"
            self.float32[name] = self.b.op("Cast", [name], "f32", to=TensorProto.FLOAT)
        return self.float32[name]

    def keep_in_range(self, r: str, above: str) -> str:
        """R-LRP only: ``r`` is the relevance one layer below ``above``. R-LRP is defined up to a positive factor
        per sample, and the per-layer factors would leave float32's range in deep networks: once RANGE_STEPS
        layers have passed since the last rescaling, divide each sample's map by its largest magnitude. A fork
        takes the count of its join (Eq. 13 gives the block the scale of the join's shares, see :meth:`combine`)."""
        if not self.rlrp:
            return r
        steps = self.range_steps.get(above, 0) + 1
        if steps >= RANGE_STEPS:
            b = self.b
            flat = b.op("Flatten", [r], "flat", axis=1)
            peak = self.reduce("ReduceMax", b.op("Abs", [flat], "abs"), [1])
            scaled = b.op("Div", [flat, b.op("Max", [peak, b.const(TINY, "tiny")], "peak")], "scaled")
            r, steps = b.op("Reshape", [scaled, b.op("Shape", [r])], "R"), 0
        self.range_steps[r] = steps
        return r

    def reduce(self, op: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        """A Reduce* op in the attribute (opset < 18) or input (opset >= 18) form."""
        b = self.b
        if op == "ReduceSum" or self.opset >= 18:
            return b.op(op, [x, b.const(axes, "axes", np.int64)], op, keepdims=keepdims)
        return b.op(op, [x], op, axes=axes, keepdims=keepdims)

    def sample_sum(self, r: str) -> str:
        """Per-sample sum, shape [batch, 1], emitted once per tensor (R-LRP joins share one tensor)."""
        if r not in self.sample_sums:
            self.sample_sums[r] = self.reduce("ReduceSum", self.b.op("Flatten", [r], "flat", axis=1), [1])
        return self.sample_sums[r]

    def record_join_share(self, node: onnx.NodeProto, index: int, share: str) -> None:
        """Remember the relevance a join routed to input ``index`` (the reference sum of Eq. 13)."""
        if self.rlrp:
            self.join_shares[(node.name, index)] = share

    # ------------------------------------------------------------ R-LRP forks

    def fork_assignments(self) -> dict[tuple[str, int], tuple[str, list[int]]]:
        """For every consumer edge (node, input index) of a fork: its join and the join input slots it reaches.

        A join is an Add/Sum/Sub/Concat with several relevance inputs; its fork is the immediate dominator of its
        output. Each consumer edge of a fork belongs to the first join (topological order) that has this fork and
        that the edge reaches. Also fills ``fork_joins`` (fork -> its joins, innermost first) and ``join_reach``
        ((inner join, outer join) -> the outer join's slots that the inner join's output reaches).
        """
        joins = [n for n in self.nodes if n.op_type in ("Add", "Sum", "Sub", "Concat")
                 and sum(n.input[i] in self.tensors for i in data_input_indices(n)) > 1]
        forks = self.view.forks_of_joins(self.tensors, self.sources, joins)
        sub = self.view.flow.subgraph(self.tensors)

        def slots_reached(node: onnx.NodeProto, join: onnx.NodeProto) -> list[int]:
            reach = set()
            for out in node.output:
                if out in sub:
                    reach |= nx.descendants(sub, out) | {out}
            return [k for k in data_input_indices(join) if join.input[k] in reach]

        assigned: dict[tuple[str, int], tuple[str, list[int]]] = {}
        self.fork_joins: dict[str, list[str]] = {}
        self.join_reach: dict[tuple[str, str], list[int]] = {}
        for join in joins:
            fork = forks.get(join.name)
            if fork is None or fork.startswith("\0"):
                continue
            for inner_name in self.fork_joins.get(fork, []):
                inner = next(n for n in joins if n.name == inner_name)
                if not any(key[0] == inner_name for key in self.join_reach):
                    slots = slots_reached(inner, join)
                    if slots:
                        self.join_reach[(inner_name, join.name)] = slots
            self.fork_joins.setdefault(fork, []).append(join.name)
            for consumer, idx in self.view.consumers.get(fork, []):
                if (consumer.name, idx) in assigned or consumer not in self.nodes:
                    continue
                slots = [idx] if consumer is join else slots_reached(consumer, join)
                if slots:
                    assigned[(consumer.name, idx)] = (join.name, slots)
        return assigned

    def combine(self, tensor: str, parts: list[tuple[str, int, str]], assigned) -> str:
        """Sum the relevance a tensor receives.

        Under R-LRP a fork applies Eq. 13 per join, innermost join first: each branch contribution ``c`` of join
        ``J`` becomes ``c * S / stab(sum(c))`` where ``S`` is the summed relevance that branch received at ``J``
        (``stab(s) = s + sign(s) * (1e-6 * sum|c| + 1e-30)``, ``sign(0) = +1``), except a branch that is the join's
        own share (an identity shortcut), whose factor is exactly 1 without the stabilizer; the sum of these is the
        block's contribution, which is in turn one branch of the next join around it with the same fork (nested
        blocks).
        The block has the scale of the join's shares, whatever the branches did to theirs (see
        :meth:`keep_in_range`).
        """
        b = self.b
        if not self.rlrp or tensor not in self.fork_joins:
            total = self.sum_relevance([r for _, _, r in parts])
            self.range_steps.setdefault(total, max(self.range_steps.get(r, 0) for _, _, r in parts))
            return total
        groups: dict[str, list[tuple[str, list[int]]]] = {}
        free = []
        for node_name, idx, r in parts:
            if (node_name, idx) in assigned:
                join, slots = assigned[(node_name, idx)]
                groups.setdefault(join, []).append((r, slots))
            else:
                free.append(r)
        for join in self.fork_joins[tensor]:
            members = groups.pop(join, [])
            if not members:
                continue
            # an identity shortcut brings back the join's own share: its sum is S, Eq. 13's factor is 1
            terms = [r if len(slots) == 1 and self.join_shares[(join, slots[0])] == r else
                     self.rescale_branch(r, self.join_reference(join, slots)) for r, slots in members]
            block = terms[0] if len(terms) == 1 else b.op("Sum", terms, "block")
            # the block sums to the join's shares: it has their scale, whatever happened inside the branches
            self.range_steps[block] = max(self.range_steps.get(self.join_shares[(join, k)], 0)
                                          for _, slots in members for k in slots)
            outer = next(((j, s) for (i, j), s in self.join_reach.items() if i == join), None)
            if outer is not None:
                groups.setdefault(outer[0], []).append((block, outer[1]))
            else:
                free.append(block)
        total = self.sum_relevance(free)
        self.range_steps.setdefault(total, max(self.range_steps.get(r, 0) for r in free))
        return total

    def sum_relevance(self, terms: list[str]) -> str:
        """The sum of the relevance terms a tensor receives. When every term is a product ``x * c_k`` with the same
        forward value ``x`` (a fork whose readers all multiply by their input, see :func:`product`), it is
        ``x * sum_k c_k``: one product instead of one per reader (classic rules only; R-LRP rescales each term)."""
        if len(terms) == 1:
            return terms[0]
        factors = [self.b.products.get(t) for t in terms]
        if not self.rlrp and all(factors) and len({x for x, _ in factors}) == 1:
            return product(self.b, factors[0][0], self.b.op("Sum", [c for _, c in factors], "cofactors"))
        return self.b.op("Sum", terms, "R")

    def join_reference(self, join: str, slots: list[int]) -> str:
        """``S``: the per-sample sum of the relevance the join routed to ``slots``."""
        sums = [self.sample_sum(self.join_shares[(join, k)]) for k in slots]
        return sums[0] if len(sums) == 1 else self.b.op("Sum", sums, "S")

    def rescale_branch(self, c: str, reference: str) -> str:
        b = self.b
        flat = b.op("Flatten", [c], "flat", axis=1)
        s = self.reduce("ReduceSum", flat, [1])
        magnitude = self.reduce("ReduceSum", b.op("Abs", [flat], "abs"), [1])
        sign = b.op("Where", [b.op("GreaterOrEqual", [s, b.const(0.0, "zero")]), b.const(1.0, "one"),
                              b.const(-1.0, "minus_one")], "sign")
        guard = b.op("Add", [b.op("Mul", [magnitude, b.const(FORK_EPS, "fork_eps")]), b.const(TINY, "tiny")])
        denom = b.op("Add", [s, b.op("Mul", [sign, guard])], "denom")
        factor = b.op("Div", [reference, denom], "eq13_factor")
        return b.op("Reshape", [b.op("Mul", [flat, factor]), b.op("Shape", [c])], "R")

    # ------------------------------------------------------------ the sweep

    def run(self) -> dict[str, str]:
        """Emit everything; returns the relevance tensor of every data input."""
        problems = self.unsupported()
        if any("static" in p for p in problems):
            self.request_input_shapes()
        if problems:
            raise UnsupportedOpError(f"{len(problems)} node(s) on the relevance path have no rule: "
                                     + "; ".join(problems))
        order = self.linear_order()
        self.plan = self.plan_rules(order)
        for name, layer in self.layers.items():
            layer.relu_out = self.relu_behind(self.layer_output[name])
        assigned = self.fork_assignments() if self.rlrp else {}
        r0, self.explained_value = self.initial_relevance()
        received: dict[str, list[tuple[str, int, str]]] = {self.target: [("\0target", 0, r0)]}
        relevance: dict[str, str] = {}
        for node in reversed(self.nodes):
            r_out = []
            for out in node.output:
                parts = received.get(out)
                if parts and out not in relevance:
                    self.b.scope = f"{node.name}/combine"
                    relevance[out] = self.combine(out, parts, assigned)
                r_out.append(relevance.get(out))
            if all(r is None for r in r_out):
                continue
            self.b.scope = node.name or node.output[0]
            emitted = lookup(self, node).emit(self, node, r_out)
            steps = max(self.range_steps.get(r, 0) for r in r_out if r)
            for idx, r in emitted.items():
                self.range_steps.setdefault(r, steps)  # re-indexing and element-wise ops keep the scale
                received.setdefault(node.input[idx], []).append((node.name, idx, r))
        self.b.scope = "inputs"
        result = {}
        for name in self.sources:
            parts = received.get(name)
            result[name] = self.combine(name, parts, assigned) if parts else None
        return result

    def initial_relevance(self) -> tuple[str, str]:
        """One-hot(target) * logit; the target defaults (when not fed, or -1) to the arg-max."""
        b = self.b
        b.scope = "init"
        y = self.value(self.target)
        b.scope = "init"
        flat = b.op("Flatten", [y], "logits", axis=1)
        predicted = b.op("ArgMax", [flat], "predicted", axis=1, keepdims=0)
        target = b.op("Where", [b.op("Less", [TARGET_INPUT, b.const(0, "zero_i", np.int64)]), predicted,
                                TARGET_INPUT], "target")
        b.op("Identity", [target], "class")
        self.class_tensor = b.nodes[-1].output[0]
        classes = b.op("Range", [b.const(0, "zero_i", np.int64), b.op("Gather", [b.op("Shape", [flat]),
                                                                             b.const(1, "one_i", np.int64)]),
                                 b.const(1, "one_i", np.int64)], "classes")
        hit = b.op("Cast", [b.op("Equal", [b.op("Unsqueeze", [target, b.const([1], "axes", np.int64)]), classes])],
                   "one_hot", to=TensorProto.FLOAT)
        selected = b.op("Mul", [hit, flat], "selected")
        value = self.reduce("ReduceSum", selected, [1], keepdims=0)
        return b.op("Reshape", [selected, b.op("Shape", [y])], "R0"), value

    def elem_type(self, name: str) -> int:
        if not hasattr(self, "_types"):
            self._types = {vi.name: vi.type.tensor_type.elem_type for vi in
                           list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output)}
            self._types |= {t.name: t.data_type for t in self.graph.initializer}
        return self._types.get(name, TensorProto.FLOAT)

    def finish(self, relevance: dict[str, str]) -> list[str]:
        """Scale (R-LRP), name and declare the outputs; returns the relevance output names."""
        b = self.b
        b.scope = "outputs"
        if self.rlrp:
            relevance = self.rlrp_final_scale(relevance)
        single = len(self.sources) == 1
        names = []
        for vi in data_inputs(self.graph):
            r = relevance.get(vi.name)
            if r is None:
                r = b.op("ConstantOfShape", [b.op("Shape", [vi.name])], "zeros")
            elif vi.type.tensor_type.elem_type != TensorProto.FLOAT:
                r = b.op("Cast", [r], "R", to=TensorProto.FLOAT)
            out = RELEVANCE_OUTPUT if single else f"{RELEVANCE_OUTPUT}.{vi.name}"
            b.nodes.append(helper.make_node("Identity", [r], [out], name=b.fresh(out)))
            shape = [d.dim_param or d.dim_value or None for d in vi.type.tensor_type.shape.dim]
            self.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))
            names.append(out)
        b.nodes.append(helper.make_node("Identity", [self.class_tensor], [CLASS_OUTPUT], name=b.fresh(CLASS_OUTPUT)))
        batch = self.batch_dim()
        self.graph.output.append(helper.make_tensor_value_info(CLASS_OUTPUT, TensorProto.INT64, [batch]))
        self.graph.input.append(helper.make_tensor_value_info(TARGET_INPUT, TensorProto.INT64, [batch]))
        default = np.full(batch if isinstance(batch, int) else 1, -1, dtype=np.int64)  # broadcasts over the batch
        self.graph.initializer.append(numpy_helper.from_array(default, TARGET_INPUT))
        b.drop_unread({o.name for o in self.graph.output})
        b.nodes = activation_work_first(b.nodes, TARGET_INPUT)
        b.commit()
        return names

    def batch_dim(self):
        dims = data_inputs(self.graph)[0].type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return dims[0].dim_value
        return dims[0].dim_param if dims and dims[0].dim_param else "batch"

    def rlrp_final_scale(self, relevance: dict[str, str]) -> dict[str, str]:
        """Scale every sample so that ``sum |relevance| = |explained value|`` (all inputs together)."""
        b = self.b
        present = {k: v for k, v in relevance.items() if v is not None}
        if not present:
            return relevance
        mass = [self.reduce("ReduceSum", b.op("Abs", [b.op("Flatten", [r], "flat", axis=1)]), [1])
                for r in present.values()]
        total = mass[0] if len(mass) == 1 else b.op("Sum", mass, "mass")
        value = b.op("Unsqueeze", [b.op("Abs", [self.explained_value]), b.const([1], "axes", np.int64)])
        factor = b.op("Div", [value, b.op("Max", [total, b.const(TINY, "tiny")])], "final_scale")
        out = dict(relevance)
        for name, r in present.items():
            flat = b.op("Flatten", [r], "flat", axis=1)
            out[name] = b.op("Reshape", [b.op("Mul", [flat, factor]), b.op("Shape", [r])], "R")
        return out


def activation_work_first(nodes: list[onnx.NodeProto], relevance_source: str) -> list[onnx.NodeProto]:
    """The emitted nodes that read only forward values (stabilized denominators, gates, casts) before those that
    carry relevance (everything downstream of ``relevance_source``), each group in emission order; the first group
    never reads the second, so the order stays topological.

    onnxruntime's default execution order is a depth-first search from the graph outputs that enters a node's
    inputs from the highest node index down. In this order it enters a relevance node's relevance input first, so
    an activation-only node runs just before the node that reads it, not during the forward pass, where its output
    would stay alive through the whole backward pass (ResNet50 epsilon at batch 16: peak 2463 -> 1662 MiB)."""
    carrying = {relevance_source}
    first, second = [], []
    for node in nodes:
        if any(i in carrying for i in node.input):
            carrying.update(node.output)
            second.append(node)
        else:
            first.append(node)
    return first + second


def rule_table(plan: dict[str, Rule]) -> dict[str, str]:
    return {name: rule.describe() for name, rule in plan.items()}
