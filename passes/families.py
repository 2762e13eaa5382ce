"""Propagation families: what the backward sweep propagates, and how.

The sweep (:class:`onnxlrp.passes.relevance.RelevancePass`) visits the nodes on the relevance path in reverse
topological order and knows no family by name. A family is an object that owns everything in which LRP variants
differ:

- **the algebra** (:class:`Algebra`): the semiring ``(K, plus, times, 0, 1)`` relevance lives in. A tensor's
  relevance is the ``plus`` of what its readers send back, re-indexing ops fill with ``0``, broadcasting is undone by
  a ``plus``-reduction. Classic LRP and R-LRP propagate real numbers with ``+`` and ``x``; a semiring family (boolean
  ``(or, and)``, counting, max-product) declares its own.
- **the seed** ``R^(L) = one_hot(target) (x) y`` at the explained tensor ``y`` (:meth:`Family.seed`).
- **the rule of every rule-bearing node** (:meth:`Family.plan`): linear layers (Conv, Gemm, MatMul with a constant
  weight), joins (Add, Sum, Sub with several relevance-carrying inputs), average and max pools, gates (a Mul of two
  relevance-carrying tensors) and normalizations. Emitters ask the
  planned rule (``ctx.rule(node)``) and never the family's name.
- **the per-layer steps** (:meth:`Family.before_layer`, :meth:`Family.after_layer`) applied to what a linear layer or a
  pool receives and sends back (R-LRP keeps its relevance in float32's range before each layer).
- **how a fork combines its branches** (:meth:`Family.combine`): the relevance a tensor receives from its readers,
  ``R_x = plus_k R_{x <- k}`` (classic), or R-LRP's Eq. 13 normalization per join.
- **the final scaling** (:meth:`Family.finish`) of the input relevance.

:class:`ClassicFamily` is the classic rules and composites (Zennit's conventions); :class:`onnxlrp.passes.rlrp.
RLRPFamily` is R-LRP (Nyiri & Gibaru); :class:`onnxlrp.passes.taylor.TaylorFamily` is the first-order Taylor
decomposition (Bach et al.), which propagates gradients with its own per-op emitters (:meth:`Family.emitter`,
:meth:`Family.unsupported_reason`) and sees patterns as their ops (:attr:`Family.fuses_patterns`). A new family
subclasses :class:`Family` and overrides what differs.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from onnxlrp.quotients import product
from onnxlrp.ranges import Ranges
from onnxlrp.rules import Rule

from .ops import lookup, unsupported_reason


@dataclass(frozen=True)
class Algebra:
    """A commutative semiring ``(K, plus, times, 0, 1)`` and the ONNX ops that compute it on relevance tensors:
    ``plus_op`` (n-ary, e.g. Sum, Max), ``reduce_op`` (``plus`` along axes, e.g. ReduceSum), ``times_op`` (Mul), and
    the element type of relevance inside the graph (``dtype``, a TensorProto type: float32, or float64 for exact
    path counts)."""

    name: str
    plus_op: str
    reduce_op: str
    times_op: str
    zero: float
    one: float
    dtype: int = TensorProto.FLOAT


FORK_LIMIT = 64.0  # log2 bound of a summed cofactor above which a fork normalizes it (onnxlrp.ranges.LIMIT: 120)

REAL = Algebra("real", plus_op="Sum", reduce_op="ReduceSum", times_op="Mul", zero=0.0, one=1.0)


@dataclass(frozen=True)
class PlanNode:
    """What composite selectors see of a rule-bearing node."""

    name: str
    op_type: str
    kind: str  # "linear", "join", "offset", "average_pool", "max_pool", "resize", "elementwise_max", "gate",
    # "normalization", "recurrent", "softmax" or "matmul"
    index: int  # position among the nodes of its kind, topological order
    depth: int  # linear layers on the longest input path up to and including this node (first layer: 1)


class Family:
    """The interface the sweep calls; the defaults are those of real-valued LRP without forks or final scaling."""

    name = "family"
    algebra = REAL
    divides_by_outputs = False  # its rules divide by layer outputs (a Relu behind them may stand in, see relu_behind)
    gates_need_a_side = False  # its gate rule needs to know which factor is the gate (products without one are refused)
    fuses_patterns = True  # the sweep sees recognized patterns (passes/patterns.py) as one virtual node each

    def emitter(self, ctx, node):
        """The backward emitter of ``node``: the op registry's (:mod:`onnxlrp.passes.ops`) for the LRP families."""
        return lookup(ctx, node)

    def unsupported_reason(self, ctx, node) -> str | None:
        """Why ``node`` cannot carry this family's relevance, or None."""
        return unsupported_reason(ctx, node)

    def plan(self, nodes: list[PlanNode]) -> dict[str, Rule]:
        """The rule of every rule-bearing node, by node name."""
        raise NotImplementedError

    def parameters_unused(self, plan: dict[str, Rule]) -> list[str]:
        """The rule parameters given by the user that no planned node uses (``inspect`` reports them)."""
        return []

    def seed(self, ctx, one_hot: str, selected: str) -> str:
        """The start relevance on the flattened explained tensor ``y``, given ``one_hot(target)`` and ``selected =
        one_hot(target) * y``: the real families start from ``selected`` (Definition 9 of R-LRP; LRP's usual
        start), a semiring family from its ``1`` at the target (``one_hot`` in its algebra)."""
        return selected

    def prepare(self, ctx) -> None:
        """Analysis before the sweep (R-LRP: its forks and joins)."""

    def before_layer(self, ctx, node, r_out: str, x: str, growth: float) -> tuple[str, str | None]:
        """The relevance a linear layer or pool ``node`` receives, and a per-sample factor ``[batch]`` (or None) that
        its rule applies (R-LRP keeps its relevance in float32's range so); ``x``: the layer input (batch first),
        ``growth``: ``log2 max_i sum_j |w_ji|`` of the layer's transposed product."""
        return r_out, None

    def after_layer(self, ctx, r_in: str, r_out: str) -> str:
        """What a linear layer or pool sends back, ``r_in``, one layer below ``r_out``."""
        return r_in

    def propagated(self, ctx, r_out: list[str | None], r_in: list[str]) -> None:
        """Called after each node's emitter (bookkeeping, e.g. R-LRP's range steps)."""

    def combine(self, ctx, tensor: str, parts: list[tuple[str, int, str]]) -> str:
        """The relevance of ``tensor`` from ``parts`` = [(reader node, input index, relevance)]."""
        return ctx.add_relevance([r for _, _, r in parts])

    def finish(self, ctx, relevance: dict[str, str | None]) -> dict[str, str | None]:
        """The input relevance as the compiled model outputs it (float32)."""
        return relevance

    def exact(self, ctx, r: str) -> str | None:
        """An extra output beside a relevance output, in the algebra's own type, when float32 loses information
        (the counting semiring's float64 path counts); None for the real families."""
        return None


class ClassicFamily(Family):
    """Classic LRP: the rule of each node from a composite (one rule everywhere is a one-entry composite), real
    numbers, relevance summed at forks: ``R_x = sum_k R_{x <- k}``, no final scaling."""

    name = "classic"
    divides_by_outputs = True

    def __init__(self, composite, params: dict, flat_layers: int = 1):
        self.composite, self.params, self.flat_layers = composite, params, flat_layers

    def plan(self, nodes):
        return self.composite.plan(nodes, self.params, self.flat_layers)

    def prepare(self, ctx):
        """Relevance is linear in the seed: carry it as ``t * 2^e`` to keep it in float32's range
        (:mod:`onnxlrp.ranges`)."""
        ctx.b.ranges = Ranges()

    def seed(self, ctx, one_hot, selected):
        """``one_hot(target) * y``, scaled by a power of two to a peak in [1, 4)."""
        ranges = ctx.b.ranges
        return ranges.normalize(ctx.b, ranges.register(selected))

    def finish(self, ctx, relevance):
        """``t * 2^e`` as plain float32, capped at +-3.4e38 where the exact map does not fit."""
        return {name: None if r is None else ctx.b.ranges.restore(ctx.b, r) for name, r in relevance.items()}

    def parameters_unused(self, plan):
        used = {field for rule in plan.values() for field in rule.__dataclass_fields__}
        return sorted(p for p in self.params if self.composite.field_of(p) not in used)

    def combine(self, ctx, tensor, parts):
        """When every term is a product ``x * c_k`` with the same forward value ``x`` (a fork whose readers all
        multiply by their input, see :func:`onnxlrp.quotients.product`), the sum is ``x * sum_k c_k``: one product
        instead of one per reader. The summed cofactor is normalized here when its bound exceeds
        :data:`FORK_LIMIT`: the branches below then start from one exponent and rarely need a normalization (and
        an alignment at their fork) of their own."""
        terms = [r for _, _, r in parts]
        factors = [ctx.b.products.get(t) for t in terms]
        if len(terms) > 1 and all(factors) and len({x for x, _ in factors}) == 1:
            b = ctx.b
            cofactors = b.ranges.at_most(b, b.op(self.algebra.plus_op, [c for _, c in factors], "cofactors"),
                                         FORK_LIMIT)
            return product(b, factors[0][0], cofactors)
        return ctx.add_relevance(terms)
