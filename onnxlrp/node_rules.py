"""Classic LRP rules for the non-linear node kinds: joins of branches and pools (Zennit 0.5's conventions).

A composite gives them to nodes like the linear rules (selectors by op type, name, position); a node that no entry
selects gets its kind's default rule here, with the composite's parameters that the rule has (``--stabilizer``).

- :class:`Norm` (joins ``z = sum_k u_k`` and average pools ``z = W x``): relevance in proportion to each
  contribution, ``R_k = u_k * R / stab(z)``, for a pool ``R_in = x * W^T (R / stab(z))`` (Zennit's Norm rule, the
  epsilon rule with the stabilizer as epsilon; Zennit's default 1e-6).
- :class:`WinnerTakesAll` (max pools): each window's relevance goes to its first arg-max, as the gradient routes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rules import STABILIZER, Rule, divide_behind_relu, divide_relevance, product


@dataclass(frozen=True)
class Norm(Rule):
    """Zennit's Norm rule: ``R_k = u_k * R / stab(z)`` for a join ``z = u_0 + u_1 + ...`` (a Sub's second operand
    enters negated), ``R_in = x * W^T (R / stab(z))`` for an average pool ``z = W x``; ``stab(z) = z + eps sign(z)``
    with ``eps`` the stabilizer."""

    stabilizer: float = STABILIZER
    name = "norm"
    summary = "joins and average pools: relevance in proportion to each contribution (Zennit's Norm rule)"
    kinds = ("join", "average_pool")
    multiplies_by_input = True

    def join(self, ctx, node, r: str, on_path: list[int]) -> dict[int, str]:
        """Behind a Relu, the join's relevance is 0 wherever its output is, so the Relu's output plus eps is the
        denominator (:func:`onnxlrp.rules.divide_behind_relu`), and an operand that a Conv or BatchNormalization
        produces for this join alone may be read through its stand-in (``RelevancePass.join_stand_in``)."""
        b = ctx.b
        y = ctx.relu_behind(node.output[0])
        s = divide_behind_relu(b, r, y, self.stabilizer) if y else \
            divide_relevance(b, r, ctx.value(node.output[0]), self.stabilizer)
        operands = {i: ctx.value(node.input[i]) for i in on_path}
        if y:
            operands.update(ctx.join_stand_in(node, y))
        shares = {i: product(b, operands[i], s) for i in on_path}
        return {i: b.op("Neg", [v], "R") if node.op_type == "Sub" and i == 1 else v for i, v in shares.items()}

    def average(self, ctx, view, r: str) -> str:
        """``x * W^T (R / stab(z))`` (see :class:`onnxlrp.passes.ops.pooling.AveragingView`)."""
        b = ctx.b
        return product(b, view.x, view.spread(b, divide_relevance(b, r, view.y, self.stabilizer)))


@dataclass(frozen=True)
class WinnerTakesAll(Rule):
    """Max pooling: each window's relevance to the first arg-max of the window (the arg-max the gradient picks);
    overlapping windows add up."""

    name = "winner-take-all"
    summary = "max pools: each window's relevance to its first arg-max"
    kinds = ("max_pool",)
    preserves_zero = True  # routing: an input that is 0 gets relevance only where a window's maximum is 0

    def max_pool(self, ctx, view, r: str) -> str:
        return view.route_first(ctx.b, r)


@dataclass(frozen=True)
class RecurrentEpsilon(Rule):
    """LSTM and GRU layers: Arras et al. 2017 (gates constant, signal-take-all for gated products, the epsilon
    rule on sums and on the linear maps into the candidate; see :mod:`onnxlrp.passes.ops.recurrent`), with their
    ``eps = 0.001``."""

    epsilon: float = 1e-3
    name = "recurrent-epsilon"
    summary = "LSTM/GRU: Arras et al. 2017, gates constant, signal-take-all, epsilon on sums and linear maps"
    kinds = ("recurrent",)
    multiplies_by_input = True


NODE_RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (Norm, WinnerTakesAll, RecurrentEpsilon)}
DEFAULTS: dict[str, type[Rule]] = {"join": Norm, "average_pool": Norm, "max_pool": WinnerTakesAll,
                                   "recurrent": RecurrentEpsilon}
