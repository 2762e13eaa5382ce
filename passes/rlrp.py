"""R-LRP (Nyiri & Gibaru, relative LRP) as a propagation family: contributions instead of ratios.

- Linear layers: Eq. 8 (dense) and Eq. 10-12 (convolution), :class:`onnxlrp.rules.RLRP`.
- Pools (Prop. 13): average pooling is a convolution with the pool's weights, max pooling one whose mask is 1 at
  every arg-max of the window; both times ``Card(J_i) / (N P1 P2)`` and the layer input (:class:`RelativePool`).
  An element-wise Max/Min of branches is a max pool over its operands, and a join for Eq. 13. A Resize is a linear
  map with its interpolation weights (Eq. 6-7, ``Card(J)`` and the fan-in from their sparsity pattern).
- Joins (Prop. 14): each branch of an Add/Sum/Sub gets the full relevance of the join (:class:`RelativeJoin`);
  Concat branches get their slices.
- Gates ``y = g * v`` (:class:`RelativeGate`): the gate is a constant weight, so the product is a linear map of the
  value with the diagonal weight ``g``, and Eq. 6-7 with one input per output (``M_j = 1``, ``Card(J_i) = 1``) give
  ``z_v = g * v * z_y = y * z_y``. A product where neither or both factors is a gate is refused (R-LRP has no uniform
  split: the fork where both factors meet would need Eq. 13 across a product).
- Normalizations (:class:`RelativeNorm`): with ``sigma`` constant, a LayerNorm is the dense map ``A = diag(w / sigma)
  (I - 1 1^T / n)``, and Eq. 8 gives ``z_x = x * (h - mean(h))``, ``h = w * z_y / sigma`` (up to the uniform
  ``1 / n``); RMS norm, a diagonal map, gives ``z_x = y * z_y``.
- Forks (Eq. 13): at the immediate dominator of a join (its fork), each branch's contribution ``c`` is rescaled per
  sample to ``c * S / stab(sum c)``, ``S`` the summed relevance that branch got at its join; nested joins innermost
  first (:meth:`RLRPFamily.combine`).
- Range: R-LRP is defined up to a positive factor per sample. Every linear layer and pool scales each sample's
  relevance by ``1 / (max |R| * max |x| * B)`` (``x`` the layer input, ``B`` a bound of the transposed product),
  so that what the layer sends back is at most 1 in magnitude whatever the weights and activations
  (:meth:`RLRPFamily.before_layer`); the final map is scaled so that ``sum |R| = |explained value|``
  (:meth:`RLRPFamily.finish`).

R-LRP is a whole-sweep method: its joins hand every branch the full relevance and rely on the fork to normalize
them, and its relevance is defined only up to per-layer factors that the final scaling fixes. A layer under another
rule in the middle of an R-LRP sweep would break both, so R-LRP cannot be mixed per layer with the classic rules
(:mod:`onnxlrp.composites` refuses such composites).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.quotients import mul
from onnxlrp.rules import RLRP, Rule, scaled_product

from .families import Family
from .ops import data_input_indices, spec

TINY = 1e-30  # far above float32's smallest normal (1.2e-38), far below any relevance worth keeping
FORK_EPS = 1e-6  # relative stabilizer of Eq. 13's denominator
SPAN_LOG2 = 64.0  # the layer input's peak enters the range factor clipped to [2^-64, 2^64]
EXPONENT_SPAN = 126.0  # a factor 2^k with |k| <= 126 is a normal float32
MEASURED_EVERY = 4  # layers between measurements of the relevance's peak (bounds stand in between)
UNBOUNDED = ("", -1)  # pending bound of a node that sent back relevance of unknown magnitude (after_layer)
SMALLEST = 2.0 ** -149  # float32's smallest subnormal: log2 of a zero peak is -149


@dataclass(frozen=True)
class RelativeJoin(Rule):
    """Prop. 14: each branch of a join gets the join's full relevance (a Sub's second operand negated); the fork
    normalizes them (Eq. 13)."""

    name = "rlrp"
    summary = "R-LRP join: each branch gets the full relevance, normalized at the fork (Prop. 14, Eq. 13)"
    kinds = ("join",)

    def join(self, ctx, node, r, on_path):
        return {i: ctx.b.op("Neg", [r], "R") if node.op_type == "Sub" and i == 1 else r for i in on_path}


@dataclass(frozen=True)
class RelativePool(Rule):
    """Prop. 13 with Eq. 12: ``Card(J_i)/(N P1 P2) * x * W^T R`` with the pool's weights (average) or the 0/1 mask
    of every arg-max of the window (max)."""

    name = "rlrp"
    summary = "R-LRP pooling (Prop. 13)"
    kinds = ("average_pool", "max_pool", "elementwise_max", "resize")

    def average(self, ctx, view, r, scale=None):
        """Average pools (Prop. 13) and resizes (Eq. 6-7 with the interpolation weights): ``x`` times the view's
        ``rlrp_spread`` and factor map; ``scale``: R-LRP's per-sample range factor (see
        :func:`onnxlrp.rules.scaled_product`)."""
        return scaled_product(ctx.b, view.x, r, lambda g: view.rlrp_spread(ctx.b, g), view.rlrp_factor(), scale,
                              *pool_shapes(ctx, view))

    def max_pool(self, ctx, view, r, scale=None):
        return scaled_product(ctx.b, view.x, r, lambda g: view.route_all(ctx.b, g), view.rlrp_factor(), scale,
                              *pool_shapes(ctx, view))

    def elementwise_max(self, ctx, view, r):
        """Element-wise Max/Min of branches: the max-pool mask over the operands at each position, times the operand
        (``Card(J_i) / (N M)`` is uniform: each input feeds one output, each output reads every operand)."""
        b = ctx.b
        return {i: mul(b, view.operands[i], routed) for i, routed in view.route_all(b, r).items()}


def pool_shapes(ctx, view) -> tuple[list, list]:
    """Per-sample shapes of a pool's output and input."""
    return list(ctx.shapes[view.node.output[0]][1:]), list(ctx.shapes[view.node.input[0]][1:])


@dataclass(frozen=True)
class RelativeGate(Rule):
    """The gate as a constant diagonal weight (Eq. 6-7 with ``M_j = 1``): ``z_v = y * z_y``."""

    name = "rlrp"
    summary = "R-LRP gate: the gate is a constant diagonal weight of the value (Eq. 6-7, M_j = 1)"
    kinds = ("gate",)
    multiplies_by_input = True

    def gate(self, ctx, node, r, factors, gate):
        value = next(i for i in factors if i != gate)
        return {value: mul(ctx.b, ctx.value(node.output[0]), r)}


@dataclass(frozen=True)
class RelativeNorm(Rule):
    """Eq. 8 on the linearized normalization: ``z_x = x * A^T z_y`` (``x * (h - mean(h))``, ``h = w * z_y /
    sigma``)."""

    name = "rlrp"
    summary = "R-LRP normalization: Eq. 8 on the layer with its standard deviation held constant"
    kinds = ("normalization",)
    multiplies_by_input = True

    def normalization(self, ctx, view, r):
        return view.input_relevance(r)


class RLRPFamily(Family):
    """R-LRP: see the module docstring."""

    name = "rlrp"
    gates_need_a_side = True

    def __init__(self):
        self.sample_sums: dict[str, str] = {}
        self.assigned: dict[tuple[str, int], tuple[str, list[int]]] = {}
        self.fork_joins: dict[str, list[str]] = {}
        self.join_reach: dict[tuple[str, str], list[int]] = {}
        self.log_bound: dict[str, str] = {}  # relevance -> [batch]: an upper bound of log2 max |R| per sample
        self.unscaled: set[str] = set()  # layers between a plain fork and the node its branches meet at
        self.bound_steps: dict[str, int] = {}  # relevance -> layers since its bound was last measured
        self.pending: tuple[str, int] | None = None  # the bound of what the layer being emitted sends back

    def plan(self, nodes):
        """Linear layers, joins, pools, gates and normalizations as above; an offset (an Add of a tensor that carries
        no relevance) passes relevance unchanged, as a product with a constant does. Softmax and matrix products of
        two activations have no R-LRP rule in the paper: refused with the node's name."""
        rules = {"linear": RLRP(), "join": RelativeJoin(), "average_pool": RelativePool(), "max_pool": RelativePool(),
                 "elementwise_max": RelativePool(), "resize": RelativePool(), "gate": RelativeGate(),
                 "normalization": RelativeNorm()}
        for node in nodes:
            if node.kind not in rules and node.kind != "offset":
                raise OnnxlrpError(f"node {node.name!r} ({node.op_type}): R-LRP is defined for feed-forward layers "
                                   f"(Eq. 8-14) and has no rule for a {node.kind} layer; use a classic rule, e.g. "
                                   "--rule epsilon or epsilon-plus-flat (transformers: --rule attnlrp or cp-lrp)")
        return {node.name: rules[node.kind] for node in nodes if node.kind in rules}

    # ------------------------------------------------------------ range

    def before_layer(self, ctx, node, r_out, x, growth):
        """The per-sample factor ``2^-k`` that the layer's rule applies before multiplying by ``x``
        (:func:`onnxlrp.rules.scaled_product`), ``k = L_r + clip(L_x, -64, 64) + growth`` (clipped to [-126, 126]),
        where ``L_x = log2 max |x|`` and ``L_r`` bounds ``log2 max |r_out|``. The transposed product is then at most
        ``2^-clip(L_x)``, and what the layer sends back at most ``2^(L_x - clip(L_x))``: 1 unless the activations
        pass 2^64 (or the clip of ``k`` bit), which is the bound the next layer starts from. So no per-layer factor (an
        activation of 3e6 times a weight bound, or of 1e-30) can move the relevance out of float32's range, up or
        down. ``L_r`` is measured (ReduceMax and ReduceMin of ``r_out``) every :data:`MEASURED_EVERY` layers, after a
        fork or a sum, and at the first layer; in between the previous layer's bound stands in, so that the bounds'
        slack (a weight bound above the actual product, a peak of ``x`` where the relevance is small) cannot
        accumulate into an underflow. Everything per sample is a log2, so nothing in it overflows."""
        if node.name in self.unscaled:  # its branch adds up with another at a plain fork: one scale for both
            self.pending = UNBOUNDED
            return r_out, None
        b = ctx.b
        rank_r, rank_x = (len(ctx.shapes.get(t) or []) for t in (node.output[0], node.input[0]))
        log_x = self.log2_peak(ctx, x, rank_x, signed=not ctx.nonnegative(node.input[0]))
        span = b.op("Clip", [log_x, b.const(-SPAN_LOG2, "minus_span"), b.const(SPAN_LOG2, "span")], "x_span")
        steps = self.bound_steps.get(r_out)
        if steps is None or steps + 1 >= MEASURED_EVERY:
            log_r, steps = self.log2_peak(ctx, r_out, rank_r, signed=True), 0
        else:
            log_r, steps = self.log_bound[r_out], steps + 1
        k = b.op("Sum", [log_r, span, b.const(float(np.clip(growth, -EXPONENT_SPAN, EXPONENT_SPAN)), "growth")], "k")
        k_clipped = b.op("Clip", [k, b.const(-EXPONENT_SPAN, "minus_exponent_span"),
                                  b.const(EXPONENT_SPAN, "exponent_span")], "k")
        bound = b.op("Sub", [b.op("Add", [log_x, k], "log_bound"), b.op("Add", [span, k_clipped], "log_bound")],
                     "log_bound")
        self.pending = (bound, steps)
        return r_out, b.op("Pow", [b.const(0.5, "half"), k_clipped], "range_scale")

    def after_layer(self, ctx, r_in, r_out):
        """A node that scales its relevance by forward values without :meth:`before_layer` (a gate times its output,
        a normalization) leaves no bound of what it sends back: the next layer measures its own."""
        if self.pending is None:
            self.pending = UNBOUNDED
        return r_in

    def propagated(self, ctx, r_out, r_in):
        """The bound of what a layer sent back (:meth:`before_layer`); re-indexing, element-wise ops and joins keep
        the bound of what they received when there is one."""
        if self.pending is UNBOUNDED:
            self.pending = None
            return
        if self.pending is not None:
            bound, steps = self.pending
            self.pending = None
        else:
            known = {(self.log_bound.get(r), self.bound_steps.get(r)) for r in r_out if r}
            if len(known) != 1 or None in next(iter(known)):
                return
            bound, steps = next(iter(known))
        for r in r_in:
            self.log_bound.setdefault(r, bound)
            self.bound_steps.setdefault(r, steps)

    def log2_peak(self, ctx, t: str, rank: int, signed: bool) -> str:
        """``log2 max |t|`` per sample, shape [batch] (at least -149, a zero tensor's): ReduceMax (and ReduceMin where
        ``t`` may be negative) over every axis but the first read ``t`` once each and write nothing, unlike Abs, or
        a Flatten, which copies a tensor that is read again later; ``rank``: that of ``t`` (0: unknown)."""
        b = ctx.b
        if rank >= 2:
            axes, source = list(range(1, rank)), t
        else:
            axes, source = [1], b.op("Flatten", [t], "flat", axis=1)
        peak = [ctx.reduce("ReduceMax", source, axes, keepdims=0)]
        if signed:
            peak.append(b.op("Neg", [ctx.reduce("ReduceMin", source, axes, keepdims=0)], "low"))
        peak = b.op("Max", peak + [b.const(SMALLEST, "smallest")], "peak")
        return b.op("Mul", [b.op("Log", [peak], "log_peak"), b.const(1.0 / np.log(2.0), "inv_ln2")], "log2_peak")

    # ------------------------------------------------------------ forks (Eq. 13)

    def prepare(self, ctx):
        """For every consumer edge (node, input index) of a fork: its join and the join input slots it reaches.

        A join is a node declared as one (Add, Sum, Sub, Concat) with several relevance inputs; its fork is the
        immediate dominator of its output. Each consumer edge of a fork belongs to the first join (topological
        order) that has this fork and that the edge reaches. Also fills ``fork_joins`` (fork -> its joins,
        innermost first) and ``join_reach`` ((inner join, outer join) -> the outer join's slots that the inner
        join's output reaches).
        """
        joins = [n for n in ctx.nodes if spec(n).join
                 and sum(n.input[i] in ctx.tensors for i in data_input_indices(n)) > 1]
        forks = ctx.view.forks_of_joins(ctx.tensors, ctx.sources, joins)
        sub = ctx.view.flow.subgraph(ctx.tensors)
        self.find_plain_forks(ctx, sub)

        def slots_reached(node, join) -> list[int]:
            reach = set()
            for out in node.output:
                if out in sub:
                    reach |= nx.descendants(sub, out) | {out}
            return [k for k in data_input_indices(join) if join.input[k] in reach]

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
            for consumer, idx in ctx.view.consumers.get(fork, []):
                if (consumer.name, idx) in self.assigned or consumer not in ctx.nodes:
                    continue
                slots = [idx] if consumer is join else slots_reached(consumer, join)
                if slots:
                    self.assigned[(consumer.name, idx)] = (join.name, slots)

    def find_plain_forks(self, ctx, sub) -> None:
        """Fill ``unscaled``: a node that brings several relevance-carrying inputs together without being a join (the
        magnitude of an STFT's two convolutions, an element-wise Max of branches) sends relevance down branches that
        add up unnormalized at their fork (Eq. 13 normalizes joins only), so the layers between the fork and the
        node must not scale their relevance each by its own range factor (:meth:`before_layer`)."""
        meeting = [n for n in ctx.nodes if not spec(n).join
                   and sum(n.input[i] in ctx.tensors for i in data_input_indices(n)) > 1]
        forks = ctx.view.forks_of_joins(ctx.tensors, ctx.sources, meeting) if meeting else {}
        for node in meeting:
            fork = forks.get(node.name)
            if fork is None or fork.startswith("\0"):
                continue
            below = nx.descendants(sub, fork) | {fork}
            above = set()
            for i in data_input_indices(node):
                if node.input[i] in sub:
                    above |= nx.ancestors(sub, node.input[i]) | {node.input[i]}
            self.unscaled |= {n.name for n in ctx.nodes if n.input and n.input[0] in below and n.output
                              and n.output[0] in above}

    def combine(self, ctx, tensor, parts):
        """At a fork, Eq. 13 per join, innermost join first: each branch contribution ``c`` of join ``J`` becomes
        ``c * S / stab(sum(c))`` where ``S`` is the summed relevance that branch received at ``J``
        (``stab(s) = s + sign(s) * (1e-6 * sum|c| + 1e-30)``, ``sign(0) = +1``), except a branch that is the join's
        own share (an identity shortcut), whose factor is exactly 1 without the stabilizer; the sum of these is the
        block's contribution, which is in turn one branch of the next join around it with the same fork (nested
        blocks). The block has the scale of the join's shares, whatever the layers inside the branches did to
        theirs (:meth:`before_layer`)."""
        if tensor not in self.fork_joins:
            return ctx.add_relevance([r for _, _, r in parts])
        b = ctx.b
        groups: dict[str, list[tuple[str, list[int]]]] = {}
        free = []
        for node_name, idx, r in parts:
            if (node_name, idx) in self.assigned:
                join, slots = self.assigned[(node_name, idx)]
                groups.setdefault(join, []).append((r, slots))
            else:
                free.append(r)
        for join in self.fork_joins[tensor]:
            members = groups.pop(join, [])
            if not members:
                continue
            # an identity shortcut brings back the join's own share: its sum is S, Eq. 13's factor is 1
            terms = [r if len(slots) == 1 and ctx.join_shares[(join, slots[0])] == r else
                     self.rescale_branch(ctx, r, self.join_reference(ctx, join, slots)) for r, slots in members]
            block = terms[0] if len(terms) == 1 else b.op("Sum", terms, "block")
            outer = next(((j, s) for (i, j), s in self.join_reach.items() if i == join), None)
            if outer is not None:
                groups.setdefault(outer[0], []).append((block, outer[1]))
            else:
                free.append(block)
        return ctx.add_relevance(free)

    def sample_sum(self, ctx, r: str) -> str:
        """Per-sample sum, shape [batch, 1], emitted once per tensor (joins share one tensor)."""
        if r not in self.sample_sums:
            self.sample_sums[r] = ctx.reduce("ReduceSum", ctx.b.op("Flatten", [r], "flat", axis=1), [1])
        return self.sample_sums[r]

    def join_reference(self, ctx, join: str, slots: list[int]) -> str:
        """``S``: the per-sample sum of the relevance the join routed to ``slots``."""
        sums = [self.sample_sum(ctx, ctx.join_shares[(join, k)]) for k in slots]
        return sums[0] if len(sums) == 1 else ctx.b.op("Sum", sums, "S")

    def rescale_branch(self, ctx, c: str, reference: str) -> str:
        b = ctx.b
        flat = b.op("Flatten", [c], "flat", axis=1)
        s = ctx.reduce("ReduceSum", flat, [1])
        magnitude = ctx.reduce("ReduceSum", b.op("Abs", [flat], "abs"), [1])
        sign = b.op("Where", [b.op("GreaterOrEqual", [s, b.const(0.0, "zero")]), b.const(1.0, "one"),
                              b.const(-1.0, "minus_one")], "sign")
        guard = b.op("Add", [b.op("Mul", [magnitude, b.const(FORK_EPS, "fork_eps")]), b.const(TINY, "tiny")])
        denom = b.op("Add", [s, b.op("Mul", [sign, guard])], "denom")
        factor = b.op("Div", [reference, denom], "eq13_factor")
        return b.op("Reshape", [b.op("Mul", [flat, factor]), b.op("Shape", [c])], "R")

    # ------------------------------------------------------------ final scaling

    def finish(self, ctx, relevance):
        """Scale every sample so that ``sum |relevance| = |explained value|`` (all inputs together): divided by its
        mass first (every entry at most 1), then multiplied by the value, so that no factor can overflow (the
        value over a small mass could)."""
        b = ctx.b
        present = {k: v for k, v in relevance.items() if v is not None}
        if not present:
            return relevance
        mass = [ctx.reduce("ReduceSum", b.op("Abs", [b.op("Flatten", [r], "flat", axis=1)]), [1])
                for r in present.values()]
        total = mass[0] if len(mass) == 1 else b.op("Sum", mass, "mass")
        value = b.op("Unsqueeze", [b.op("Abs", [ctx.explained_value]), b.const([1], "axes", np.int64)])
        total = b.op("Max", [total, b.const(SMALLEST, "smallest")], "mass")
        out = dict(relevance)
        for name, r in present.items():
            share = b.op("Div", [b.op("Flatten", [r], "flat", axis=1), total], "share")
            out[name] = b.op("Reshape", [b.op("Mul", [share, value], "R"), b.op("Shape", [r])], "R")
        return out
