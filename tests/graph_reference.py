"""Independent float64 reference for onnxlrp's relevance on an ONNX graph: the classic rules, the composites and
R-LRP, for the exported models the tests use (model-zoo style files, PyTorch and tf2onnx exports).

``tests/reference.py`` computes the same rules on netspec layer lists; this module walks any ONNX classifier. It is
written from README.md ("Rules and composites", "R-LRP") and the R-LRP paper (Nyiri & Gibaru), and imports
nothing from onnxlrp; the rule functions on matrices are tests/reference.py's.

Forward: float64, every intermediate tensor kept (tests/graph_maps.py).

Relevance path: the float tensors that depend on the data input and reach the explained tensor (shape arithmetic
is integer, so a Reshape's computed shape is not on it).

Linear layers: a Conv, Gemm or MatMul with a constant weight, with the constant bias Add after a MatMul and a
BatchNormalization after either folded in (README: "A BatchNormalization after a linear layer is folded into that
layer"), folded only where the folded node is the one reader of the layer's output. Each becomes an explicit sparse
matrix ``M``, a bias ``b`` and the 0/1 connectivity ``C`` (tests/graph_maps.py); average pools and means are
matrices too (weights 1/divisor). Every call checks ``M x + b`` against the forward value of the layer's output.

Classic rules (Zennit 0.5, stabilizer 1e-6): a linear layer applies its planned rule to (M, b, C); joins (Add/Sum
of several path tensors) use the Norm rule ``R_k = a_k R / stab(sum_k a_k)``; average pools and means the same
(epsilon, no bias); max pools send each window's relevance to its first arg-max (row-major), overlapping windows add
up; activations, LRN, a BatchNormalization that is not folded and element-wise ops with a constant operand pass
relevance (summed over broadcast axes); re-indexing ops map it back.

R-LRP: start ``one_hot(target) * logit`` (Definition 9). A linear layer sends (Eq. 6-8, 12)
``z_i = Card(J_i) / N^(l+1) * x_i * sum_{j in J_i} w_ij z_j / M_j``, where ``Card(J_i)`` is the number of outputs
connected to input ``i`` (column sums of C), ``N^(l+1)`` the number of outputs and ``M_j`` the fan-in (dense:
``N^(l)``; convolution: ``C_in/groups * P1 P2``; pools: the window size). Max pools are that with a mask of 1 at
every arg-max of the window (Prop. 13). A join gives each branch its share: all of ``z`` (Add/Sum) or its slice
(Concat) (Prop. 14). Each share is tagged with its join and slot and carried back as a term of its own. At the
join's fork, the immediate dominator of the join's output among the path tensors, each branch's terms are summed
to ``c`` and rescaled to ``c * S / stab(sum c)`` (Eq. 13; ``S`` = the per-sample sum of that branch's share;
``stab(s) = s + sign(s) 1e-6 sum|c|``, ``sign(0) = +1``, see :func:`rescale`); an identity branch keeps its share.
Joins with one fork are combined innermost first, each block becoming one term of the next join. The result is
scaled per sample to ``sum |R| = |explained value|``; R-LRP is defined up to a positive factor per sample (compare
by cosine).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx
import reference as ref
from graph_maps import Windows, attr, conv_matrix, evaluator, float64_model, node_windows, window_geometry
from scipy import sparse

EPS = ref.EPS
FORK_EPS = 1e-6
PASS = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Softplus", "LRN",
        "HardSigmoid", "HardSwish", "Dropout", "Identity", "BatchNormalization", "Cast"}
RESHAPE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
CONV, DENSE = ("Conv",), ("Gemm", "MatMul")

# README "Rules and composites": selectors (first layer?, op types) -> rule; the first match wins.
COMPOSITES = {
    "epsilon-plus": [(None, CONV, "zplus"), (None, DENSE, "epsilon")],
    "epsilon-plus-flat": [(True, None, "flat"), (None, CONV, "zplus"), (None, DENSE, "epsilon")],
    "epsilon-gamma-box": [(True, CONV, "zbox"), (None, CONV, "gamma"), (None, DENSE, "epsilon")],
    "epsilon-alpha2-beta1": [(None, CONV, "alpha-beta"), (None, DENSE, "epsilon")],
    "epsilon-alpha2-beta1-flat": [(True, None, "flat"), (None, CONV, "alpha-beta"), (None, DENSE, "epsilon")],
    "cmp": [(True, None, "flat"), (None, CONV, "alpha-beta"), (None, DENSE, "epsilon")],
}
# Each rule's parameters and their defaults (Zennit's).
DEFAULTS = {
    "lrp0": {}, "epsilon": {"epsilon": EPS}, "gamma": {"gamma": 0.25, "stabilizer": EPS},
    "zplus": {"stabilizer": EPS}, "alpha-beta": {"alpha": 2.0, "beta": 1.0, "stabilizer": EPS},
    "flat": {"stabilizer": EPS}, "wsquare": {"stabilizer": EPS}, "zbox": {"low": 0.0, "high": 1.0, "stabilizer": EPS},
    "rlrp": {},
}


@dataclass
class Layer:
    """A linear layer as the rules see it: ``z = M x + b`` per sample."""

    head: onnx.NodeProto  # the Conv / Gemm / MatMul
    x: str
    z: str  # its output, or that of the folded bias Add / BatchNormalization
    folded: list  # the folded nodes, in order

    @property
    def kind(self) -> str:
        return "conv" if self.head.op_type == "Conv" else "dense"


# ---------------------------------------------------------------- the graph

class GraphReference:
    """The reference for one model: ``relevance(x, rule)`` and ``plan(rule)``.

    ``explained``: the tensor whose target entry is explained (the logits, e.g. a Softmax's input).
    ``float32_forward``: run the forward pass in float32 and the rules in float64 on those values. It measures how
    much float32 rounding of the activations alone moves a rule's result (how ill-conditioned a case is), the least
    error a float32 implementation can be held to."""

    def __init__(self, model: onnx.ModelProto, explained: str, input_name: str | None = None,
                 float32_forward: bool = False):
        self.model = onnx.ModelProto() if float32_forward else float64_model(model)
        if float32_forward:
            self.model.CopyFrom(model)
        name_nodes(self.model.graph)
        self.input_dtype = np.float32 if float32_forward else np.float64
        self.check_tolerance = 1e-4 if float32_forward else 1e-9  # of max |value|: M x + b against the forward
        graph = self.model.graph
        initializers = {t.name for t in graph.initializer}
        self.input = input_name or next(i.name for i in graph.input if i.name not in initializers)
        self.explained = explained
        self.nodes = list(graph.node)
        self.outputs = {o.name for o in graph.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.evaluator = evaluator(self.model)
        self.analyzed = False
        self.cache: dict = {}

    # ------------------------------------------------------------ analysis

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every tensor of the model at ``x``, as float64 (the last input's values are cached)."""
        key = (x.shape, x.tobytes())
        if self.cache.get("x") != key:
            values = self.evaluator.run(None, {self.input: np.asarray(x, self.input_dtype)}, intermediate=True)
            values = {k: v.astype(np.float64) if getattr(v, "dtype", None) == np.float32 else v
                      for k, v in values.items()}
            self.cache["x"], self.cache["values"] = key, values
            if not self.analyzed:
                self.analyze(values)
        return self.cache["values"]

    def analyze(self, values: dict) -> None:
        """The relevance path, the linear layers, their depths and the R-LRP forks (needs value types)."""
        def is_float(t):
            return t in values and np.issubdtype(np.asarray(values[t]).dtype, np.floating)

        depends = {self.input}
        for node in self.nodes:
            if any(i in depends for i in data_inputs(node)):
                depends |= {o for o in node.output if is_float(o)}
        reaches = {self.explained}
        for node in reversed(self.nodes):
            if any(o in reaches for o in node.output):
                reaches |= {i for i in data_inputs(node) if i in depends}
        self.path = depends & reaches
        self.path_nodes = [n for n in self.nodes if any(o in self.path for o in n.output)]
        self.layers: dict[str, Layer] = {}  # name of the node that writes z -> layer
        for node in self.path_nodes:
            layer = self.linear_layer(node)
            if layer is not None:
                self.layers[(layer.folded[-1] if layer.folded else node).name] = layer
            elif node.op_type in CONV + DENSE:
                raise NotImplementedError(f"{node.name}: {node.op_type} without a constant weight")
        depth = {self.input: 0}
        for node in self.path_nodes:
            d = max(depth.get(i, 0) for i in node.input if i in self.path) + (node.op_type in CONV + DENSE)
            depth.update({o: d for o in node.output})
        self.depth = {layer.head.name: depth[layer.head.output[0]] for layer in self.layers.values()}
        flow = nx.DiGraph([(i, o) for n in self.path_nodes for i in n.input if i in self.path
                           for o in n.output if o in self.path])
        dominator = nx.immediate_dominators(flow, self.input)
        self.fork_joins: dict[str, list[onnx.NodeProto]] = {}  # fork -> its joins in topological order
        for node in self.path_nodes:
            if self.is_join(node):
                self.fork_joins.setdefault(dominator[node.output[0]], []).append(node)
        self.analyzed = True

    def is_join(self, node) -> bool:
        return node.op_type in ("Add", "Sum", "Concat") and len(self.path_inputs(node)) > 1

    def path_inputs(self, node) -> list[int]:
        return [k for k, i in enumerate(node.input) if i in self.path]

    def sole_reader(self, tensor: str):
        readers = self.readers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in self.outputs else None

    def is_constant(self, tensor: str) -> bool:
        return bool(tensor) and tensor not in self.path and tensor in self.cache["values"]

    def linear_layer(self, node) -> Layer | None:
        """Conv/Gemm/MatMul with constant weights; a MatMul's constant bias Add and a BatchNormalization folded."""
        constant = self.is_constant
        if node.op_type not in CONV + DENSE or node.input[0] not in self.path or not constant(node.input[1]):
            return None
        if len(node.input) > 2 and node.input[2] and not constant(node.input[2]):
            return None
        if node.op_type == "MatMul" and self.cache["values"][node.input[1]].ndim != 2:
            return None
        layer = Layer(node, node.input[0], node.output[0], [])
        add = self.sole_reader(layer.z)
        if node.op_type == "MatMul" and add is not None and add.op_type == "Add":
            bias = next(i for i in add.input if i != layer.z)
            width = self.cache["values"][node.input[1]].shape[1]
            if constant(bias) and self.cache["values"][bias].size == width and self.cache["values"][bias].ndim <= 2:
                layer.folded.append(add)
                layer.z = add.output[0]
        bn = self.sole_reader(layer.z)
        if bn is not None and bn.op_type == "BatchNormalization" and all(constant(i) for i in bn.input[1:5]):
            layer.folded.append(bn)
            layer.z = bn.output[0]
        return layer

    def matrices(self, layer: Layer, values: dict):
        """``(M, b, C, fan_in)`` of a layer; checks ``M x + b`` against the forward value of ``z``."""
        x, z = values[layer.x], values[layer.z]
        key = ("layer", layer.z, x.shape[1:])
        if key not in self.cache:
            head = layer.head
            w = values[head.input[1]]
            bias = values[head.input[2]] if len(head.input) > 2 and head.input[2] else None
            if head.op_type == "Conv":
                strides, pads, dilations = window_geometry(head, x.shape[1:], w.shape[2:])
                out_shape = values[head.output[0]].shape[1:]
                m, c = conv_matrix(w, x.shape[1:], out_shape, strides, pads, dilations, attr(head, "group", 1))
                channels, fan_in = w.shape[0], float(np.prod(w.shape[1:]))
            else:
                if attr(head, "transA", 0):
                    raise NotImplementedError("Gemm with transA")
                w = w * attr(head, "alpha", 1.0) if head.op_type == "Gemm" else w
                dense = w if head.op_type == "Gemm" and attr(head, "transB", 0) else w.T  # [n_out, n_in]
                bias = None if bias is None else bias * attr(head, "beta", 1.0)
                m, c = sparse.csr_array(dense), sparse.csr_array(np.ones_like(dense))
                channels, fan_in = dense.shape[0], float(dense.shape[1])
            repeat = m.shape[0] // channels  # C order: the channel is the slowest axis of a Conv's output
            if bias is None:
                b = np.zeros(m.shape[0])
            else:
                b = np.repeat(bias, repeat) if head.op_type == "Conv" else np.broadcast_to(bias.reshape(-1), channels)
            for node in layer.folded:
                if node.op_type == "Add":
                    b = b + values[next(i for i in node.input if i != head.output[0])].reshape(-1)
                else:  # BN(W x + b) = (s W) x + s (b - mean) + beta, s = scale / sqrt(var + eps), per channel
                    scale, beta, mean, var = (np.repeat(values[i], repeat) for i in node.input[1:5])
                    s = scale / np.sqrt(var + attr(node, "epsilon", 1e-5))
                    m = sparse.csr_array(sparse.diags_array(s) @ m)
                    b = (b - mean) * s + beta
            self.cache[key] = (m, np.asarray(b, np.float64), c, fan_in)
        m, b, c, fan_in = self.cache[key]
        expected = z.reshape(len(z), -1)
        got = x.reshape(len(x), -1) @ m.T + b
        scale = max(np.abs(expected).max(), 1.0)
        assert np.abs(got - expected).max() <= self.check_tolerance * scale, f"{layer.head.name}: M x + b"
        return m, b, c, fan_in

    def windows(self, node, values: dict) -> Windows:
        x, y = values[node.input[0]], values[node.output[0]]
        key = ("windows", node.name, x.shape[1:])
        if key not in self.cache:
            axes = attr(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                axes = values[node.input[1]].tolist()
            self.cache[key] = node_windows(node, x.shape[1:], y.shape[1:], axes)
        return self.cache[key]

    # ------------------------------------------------------------ rules

    def plan(self, rule: str, flat_layers: int = 1, **params) -> dict[str, tuple[str, dict]]:
        """``{linear node: (rule, parameters)}`` for a rule name or a composite (README's selectors; the first
        layers have at most ``flat_layers`` linear layers on their longest path from the input, themselves
        included). ``params`` override the defaults of every rule that has them. Needs a :meth:`forward` first."""
        entries = COMPOSITES.get(rule, [(None, None, rule)])
        plan = {}
        for layer in self.layers.values():
            node = layer.head
            first = self.depth[node.name] <= flat_layers
            name = next(r for f, ops, r in entries if f in (None, first) and (ops is None or node.op_type in ops))
            plan[node.name] = (name, {**DEFAULTS[name], **{k: v for k, v in params.items() if k in DEFAULTS[name]}})
        return plan

    def relevance(self, x: np.ndarray, rule: str = "epsilon", target=None, flat_layers: int = 1,
                  **params) -> np.ndarray:
        """The relevance of the input ``x`` (float64, shaped like ``x``) for ``target`` per sample (None or -1: the
        arg-max). R-LRP is scaled per sample to ``sum |R| = |explained value|``."""
        values = self.forward(x)
        self.rlrp = rule == "rlrp"
        self.rules = self.plan(rule, flat_layers, **params)
        self.shares: dict[tuple[str, int], np.ndarray] = {}
        logits = values[self.explained].reshape(len(x), -1)
        target = logits.argmax(1) if target is None else np.broadcast_to(np.asarray(target), (len(x),))
        target = np.where(target < 0, logits.argmax(1), target)
        start = np.zeros_like(logits)
        start[np.arange(len(x)), target] = logits[np.arange(len(x)), target]  # Definition 9 / one-hot * logit
        received = {self.explained: [((), start.reshape(values[self.explained].shape))]}
        for node in reversed(self.path_nodes):
            outs = [o for o in node.output if o in received]
            if len(outs) > 1:
                raise NotImplementedError(f"{node.name}: relevance at several outputs")
            for stack, r in self.combine(outs[0], received.pop(outs[0])) if outs else []:
                for tensor, r_in, tag in self.backward(node, r, values):
                    received.setdefault(tensor, []).append((stack + tag, r_in))
        [(stack, relevance)] = self.combine(self.input, received[self.input])
        assert stack == (), stack
        if self.rlrp:
            mass = np.abs(relevance).reshape(len(x), -1).sum(1)
            factor = np.abs(logits[np.arange(len(x)), target]) / np.where(mass > 0, mass, 1.0)
            relevance = relevance * factor.reshape((-1,) + (1,) * (relevance.ndim - 1))
        return relevance

    def combine(self, tensor: str, terms: list) -> list[tuple[tuple, np.ndarray]]:
        """The terms a tensor received, summed per tag stack. Under R-LRP, at a fork, Eq. 13 for each of its joins,
        innermost (topologically first) first; the block is one term of the join around it."""
        for join in self.fork_joins.get(tensor, []) if self.rlrp else []:
            mine = [(s, r) for s, r in terms if s and s[-1][0] == join.name]
            terms = [(s, r) for s, r in terms if not (s and s[-1][0] == join.name)]
            if not mine:
                continue
            outer = {s[:-1] for s, _ in mine}
            if len(outer) != 1:
                raise NotImplementedError(f"{join.name}: branches reach its fork {tensor} inside different joins")
            branches: dict[int, np.ndarray] = {}
            for s, r in mine:
                branches[s[-1][1]] = branches.get(s[-1][1], 0) + r
            block = sum(c if join.input[k] == tensor else rescale(c, self.shares[(join.name, k)])
                        for k, c in branches.items())
            terms.append((outer.pop(), block))
        merged: dict[tuple, np.ndarray] = {}
        for s, r in terms:
            merged[s] = merged[s] + r if s in merged else r
        return list(merged.items())

    def backward(self, node, r: np.ndarray, values: dict) -> list[tuple[str, np.ndarray, tuple]]:
        """``[(input tensor, its relevance, tag)]`` from the relevance ``r`` of the node's output."""
        op, x, path = node.op_type, node.input[0], self.path_inputs(node)
        if node.name in self.layers:
            layer = self.layers[node.name]
            return [(layer.x, self.linear(layer, r, values), ())]
        if op == "Concat" or (op in ("Add", "Sum") and len(path) > 1):
            return self.join(node, r, values)
        if op in PASS or op in ("Add", "Sub", "Mul", "Div", "Sum"):
            if len(path) != 1 or (op in PASS and path != [0]) or (op == "Div" and path != [0]):
                raise NotImplementedError(f"{node.name}: {op} of {len(path)} relevance-carrying tensors")
            return [(node.input[path[0]], unbroadcast(r, values[node.input[path[0]]].shape), ())]
        if op in RESHAPE:
            return [(x, r.reshape(values[x].shape), ())]
        if op == "Transpose":
            perm = attr(node, "perm") or list(reversed(range(r.ndim)))
            return [(x, r.transpose(np.argsort(perm)), ())]
        if op in ("MaxPool", "GlobalMaxPool"):
            return [(x, self.max_pool(node, r, values), ())]
        if op in ("AveragePool", "GlobalAveragePool", "ReduceMean"):
            return [(x, self.average(node, r, values), ())]
        raise NotImplementedError(f"{node.name}: no reference rule for {op}")

    def linear(self, layer: Layer, r: np.ndarray, values: dict) -> np.ndarray:
        m, b, c, fan_in = self.matrices(layer, values)
        x = values[layer.x]
        xf, rf = x.reshape(len(x), -1), r.reshape(len(r), -1)
        name, params = self.rules[layer.head.name]
        if name == "rlrp":
            out = rlrp_linear(m, c, xf, rf, fan_in)
        elif name == "lrp0":  # R / z, with a quotient of 0 where z == 0
            z = xf @ m.T + b
            out = xf * (np.where(z == 0, 0.0, rf / np.where(z == 0, 1.0, z)) @ m)
        else:
            kwargs = {"eps" if k in ("epsilon", "stabilizer") else k: v for k, v in params.items()}
            out = ref.RULES[ref.rule_name(name)](m, b, xf, rf, C=c, **kwargs)
        return out.reshape(x.shape)

    def join(self, node, r: np.ndarray, values: dict) -> list[tuple[str, np.ndarray, tuple]]:
        """Concat: each input its slice. Add/Sum of several path tensors: the Norm rule ``a_k R / stab(z)``
        (classic), the full ``z`` (R-LRP, Prop. 14). R-LRP tags each share of a join with (join, slot)."""
        path = self.path_inputs(node)
        if node.op_type == "Concat":
            axis = attr(node, "axis") % r.ndim
            bounds = np.cumsum([0] + [values[i].shape[axis] for i in node.input])
            shares = {k: np.take(r, range(bounds[k], bounds[k + 1]), axis=axis) for k in path}
        elif self.rlrp:
            shares = {k: r for k in path}
        else:
            g = r / ref.stab(values[node.output[0]], EPS)
            shares = {k: values[node.input[k]] * g for k in path}
        shares = {k: unbroadcast(v, values[node.input[k]].shape) for k, v in shares.items()}
        if not self.rlrp or len(path) < 2:
            return [(node.input[k], v, ()) for k, v in shares.items()]
        for k, v in shares.items():
            if (node.name, k) in self.shares:
                raise NotImplementedError(f"{node.name}: a join whose output carries several R-LRP terms")
            self.shares[(node.name, k)] = v.reshape(len(v), -1).sum(1)
        return [(node.input[k], v, ((node.name, k),)) for k, v in shares.items()]

    def average(self, node, r: np.ndarray, values: dict) -> np.ndarray:
        """AveragePool, GlobalAveragePool, ReduceMean: the Norm rule (classic) or Eq. 12 with the pool's weights."""
        x, y = values[node.input[0]], values[node.output[0]]
        windows = self.windows(node, values)
        m, c = windows.matrices(x[0].size)
        xf, rf = x.reshape(len(x), -1), r.reshape(len(r), -1)
        expected = y.reshape(len(y), -1)
        scale = max(np.abs(expected).max(), 1.0)
        assert np.abs(xf @ m.T - expected).max() <= self.check_tolerance * scale, node.name
        if self.rlrp:
            return rlrp_linear(m, c, xf, rf, windows.size).reshape(x.shape)
        return ref.rule_epsilon(m, np.zeros(m.shape[0]), xf, rf, eps=EPS).reshape(x.shape)

    def max_pool(self, node, r: np.ndarray, values: dict) -> np.ndarray:
        """Classic: each window's relevance to its first arg-max. R-LRP (Prop. 13): Eq. 12 with a mask of 1 at every
        arg-max; ``Card(J_i)`` = the windows holding input i."""
        x, y = values[node.input[0]], values[node.output[0]]
        index = self.windows(node, values).index
        xf, rf = x.reshape(len(x), -1), r.reshape(len(r), -1)
        taps = np.where(index >= 0, xf[:, np.maximum(index, 0)], -np.inf)  # [batch, windows, taps]
        peak = taps.max(2)
        assert np.array_equal(peak, y.reshape(len(y), -1)), node.name
        out = np.zeros_like(xf)
        if self.rlrp:
            mask = (taps == peak[..., None]) & (index >= 0)
            for s in range(len(x)):
                np.add.at(out[s], np.broadcast_to(index, mask[s].shape)[mask[s]],
                          np.broadcast_to(rf[s][:, None], mask[s].shape)[mask[s]])
            card = np.bincount(index[index >= 0], minlength=xf.shape[1])
            return (card / len(index) * xf * out / index.shape[1]).reshape(x.shape)
        winner = np.take_along_axis(np.broadcast_to(index, taps.shape), taps.argmax(2)[..., None], 2)[..., 0]
        for s in range(len(x)):
            np.add.at(out[s], winner[s], rf[s])
        return out.reshape(x.shape)


def name_nodes(graph: onnx.GraphProto) -> None:
    """Every node gets a unique name (a plan names linear nodes): its own, or ``{op_type}_{index}``."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def data_inputs(node) -> list[str]:
    """The inputs whose values reach the output: all but CastLike's second, which gives only the element type (the
    dynamo exporter's zero bias ``Expand(CastLike(0, x), ...)`` is a constant)."""
    return list(node.input[:1]) if node.op_type == "CastLike" else list(node.input)


def rlrp_linear(m, c, x: np.ndarray, z: np.ndarray, fan_in: float) -> np.ndarray:
    """Eq. 6-7 / 12: ``z_i = Card(J_i) / N^(l+1) * x_i * sum_{j in J_i} w_ij z_j / M_j`` (``w_ij = 0`` off J_i)."""
    card = np.asarray(c.sum(axis=0)).ravel()
    return card / m.shape[0] * x * (z @ m) / fan_in


def rescale(c: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Eq. 13: ``c * S / stab(sum c)`` per sample, ``stab(s) = s + sign(s) 1e-6 sum|c|``, sign(0) = +1; an all-zero
    branch gives 0. README's stabilizer also adds 1e-30, an absolute floor for the compiled graph's range-kept
    float32 values; the reference keeps R-LRP's unscaled magnitudes (near 1e-30 at the fork of the inverted-residual
    net in test_graph_reference.py), so it leaves out that floor, which is not invariant under R-LRP's per-sample
    factor."""
    flat = c.reshape(len(c), -1)
    s, magnitude = flat.sum(1), np.abs(flat).sum(1)
    denominator = s + np.where(s >= 0, 1.0, -1.0) * FORK_EPS * magnitude
    factor = np.where(magnitude > 0, total / np.where(magnitude > 0, denominator, 1.0), 0.0)
    return c * factor.reshape((-1,) + (1,) * (c.ndim - 1))


def unbroadcast(r: np.ndarray, shape) -> np.ndarray:
    """Sum ``r`` over the axes along which a tensor of ``shape`` was broadcast to ``r``'s shape."""
    lead = r.ndim - len(shape)
    r = r.sum(axis=tuple(range(lead))) if lead else r
    axes = tuple(a for a, d in enumerate(shape) if d == 1 and r.shape[a] != 1)
    return r.sum(axis=axes, keepdims=True) if axes else r


def compiled_plan(compiled: onnx.ModelProto) -> dict[str, tuple[str, dict]]:
    """The compiler's ``onnxlrp.plan`` metadata parsed: ``{node: (rule, {parameter: value})}`` from
    ``"rule(k=v, ...)"``."""
    meta = {p.key: p.value for p in compiled.metadata_props}
    plan = {}
    for node, text in json.loads(meta["onnxlrp.plan"]).items():
        name, args = re.fullmatch(r"([\w-]+)(?:\((.*)\))?", text).groups()
        plan[node] = (name, {k: float(v) for k, v in (a.split("=") for a in args.split(", "))} if args else {})
    return plan
