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
- Range: R-LRP is defined up to a positive factor per sample. Every :data:`RANGE_STEPS` layers each sample's map is
  divided by its largest magnitude (:meth:`RLRPFamily.after_layer`); the final map is scaled so that
  ``sum |R| = |explained value|`` (:meth:`RLRPFamily.finish`).

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
from onnxlrp.rules import RLRP, Rule, mul, times_relative

from .families import Family
from .ops import data_input_indices, spec

TINY = 1e-30  # far above float32's smallest normal (1.2e-38), far below any relevance worth keeping
FORK_EPS = 1e-6  # relative stabilizer of Eq. 13's denominator
RANGE_STEPS = 4  # layers between per-sample rescalings of the relevance (see RLRPFamily.after_layer)


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

    def average(self, ctx, view, r):
        """Average pools (Prop. 13) and resizes (Eq. 6-7 with the interpolation weights): ``x`` times the view's
        ``rlrp_spread``."""
        b = ctx.b
        return mul(b, view.x, view.rlrp_spread(b, r))

    def max_pool(self, ctx, view, r):
        b = ctx.b
        return times_relative(b, mul(b, view.x, view.route_all(b, r)), view.rlrp_factor())

    def elementwise_max(self, ctx, view, r):
        """Element-wise Max/Min of branches: the max-pool mask over the operands at each position, times the operand
        (``Card(J_i) / (N M)`` is uniform: each input feeds one output, each output reads every operand)."""
        b = ctx.b
        return {i: mul(b, view.operands[i], routed) for i, routed in view.route_all(b, r).items()}


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
        self.range_steps: dict[str, int] = {}  # relevance tensor -> layers since its scale was last reset
        self.sample_sums: dict[str, str] = {}
        self.assigned: dict[tuple[str, int], tuple[str, list[int]]] = {}
        self.fork_joins: dict[str, list[str]] = {}
        self.join_reach: dict[tuple[str, str], list[int]] = {}

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

    def after_layer(self, ctx, r_in, r_out):
        """``r_in`` is the relevance one layer below ``r_out``. The per-layer factors would leave float32's range in
        deep networks: once RANGE_STEPS layers have passed since the last rescaling, divide each sample's map by its
        largest magnitude (floored at TINY). A fork takes the count of its join (Eq. 13 gives the block the scale of
        the join's shares, see :meth:`combine`)."""
        steps = self.range_steps.get(r_out, 0) + 1
        if steps >= RANGE_STEPS:
            b = ctx.b
            flat = b.op("Flatten", [r_in], "flat", axis=1)
            peak = ctx.reduce("ReduceMax", b.op("Abs", [flat], "abs"), [1])
            scaled = b.op("Div", [flat, b.op("Max", [peak, b.const(TINY, "tiny")], "peak")], "scaled")
            r_in, steps = b.op("Reshape", [scaled, b.op("Shape", [r_in])], "R"), 0
        self.range_steps[r_in] = steps
        return r_in

    def propagated(self, ctx, r_out, r_in):
        """Re-indexing and element-wise ops keep the scale of what they received."""
        steps = max(self.range_steps.get(r, 0) for r in r_out if r)
        for r in r_in:
            self.range_steps.setdefault(r, steps)

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

    def combine(self, ctx, tensor, parts):
        """At a fork, Eq. 13 per join, innermost join first: each branch contribution ``c`` of join ``J`` becomes
        ``c * S / stab(sum(c))`` where ``S`` is the summed relevance that branch received at ``J``
        (``stab(s) = s + sign(s) * (1e-6 * sum|c| + 1e-30)``, ``sign(0) = +1``), except a branch that is the join's
        own share (an identity shortcut), whose factor is exactly 1 without the stabilizer; the sum of these is the
        block's contribution, which is in turn one branch of the next join around it with the same fork (nested
        blocks). The block has the scale of the join's shares, whatever the branches did to theirs (see
        :meth:`after_layer`)."""
        if tensor not in self.fork_joins:
            return self.sum_keeping_scale(ctx, [r for _, _, r in parts])
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
            # the block sums to the join's shares: it has their scale, whatever happened inside the branches
            self.range_steps[block] = max(self.range_steps.get(ctx.join_shares[(join, k)], 0)
                                          for _, slots in members for k in slots)
            outer = next(((j, s) for (i, j), s in self.join_reach.items() if i == join), None)
            if outer is not None:
                groups.setdefault(outer[0], []).append((block, outer[1]))
            else:
                free.append(block)
        return self.sum_keeping_scale(ctx, free)

    def sum_keeping_scale(self, ctx, terms: list[str]) -> str:
        total = ctx.add_relevance(terms)
        self.range_steps.setdefault(total, max(self.range_steps.get(r, 0) for r in terms))
        return total

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
        """Scale every sample so that ``sum |relevance| = |explained value|`` (all inputs together)."""
        b = ctx.b
        present = {k: v for k, v in relevance.items() if v is not None}
        if not present:
            return relevance
        mass = [ctx.reduce("ReduceSum", b.op("Abs", [b.op("Flatten", [r], "flat", axis=1)]), [1])
                for r in present.values()]
        total = mass[0] if len(mass) == 1 else b.op("Sum", mass, "mass")
        value = b.op("Unsqueeze", [b.op("Abs", [ctx.explained_value]), b.const([1], "axes", np.int64)])
        factor = b.op("Div", [value, b.op("Max", [total, b.const(TINY, "tiny")])], "final_scale")
        out = dict(relevance)
        for name, r in present.items():
            flat = b.op("Flatten", [r], "flat", axis=1)
            out[name] = b.op("Reshape", [b.op("Mul", [flat, factor]), b.op("Shape", [r])], "R")
        return out
