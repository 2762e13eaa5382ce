"""Classic LRP rules for the non-linear node kinds: joins of branches and pools (Zennit 0.5's conventions), gates
and normalizations (AttnLRP's and LXT's, with Zennit's stabilizer).

A composite gives them to nodes like the linear rules (selectors by op type, name, position); a node that no entry
selects gets its kind's default rule here, with the composite's parameters that the rule has (``--stabilizer``).

- :class:`Norm` (joins ``z = sum_k u_k``, average pools and resizes ``z = W x``): relevance in proportion to each
  contribution, ``R_k = u_k * R / stab(z)``, for a pool or resize ``R_in = x * W^T (R / stab(z))`` (Zennit's Norm
  rule, the epsilon rule with the stabilizer as epsilon; Zennit's default 1e-6).
- :class:`WinnerTakesAll` (max pools, element-wise Max/Min of branches): each window's relevance goes to its first
  arg-max, as the gradient routes it; for ``Max(u_0, u_1, ...)`` the operands at one position are the window.
- :class:`Value` (gates ``y = g * v``, the default): the gate ``g`` is a constant weight, all relevance goes to the
  value ``v`` (CP-LRP's treatment of gating, Ali et al. 2022; the signal-take-all rule of Arras et al. for LSTM gates);
  :class:`Uniform`: each factor gets half (AttnLRP's uniform rule, Prop. 3.2 / Eq. 7; LXT's ``mul2``).
- :class:`Linearized` (normalizations, the default): the epsilon rule on the layer with its standard deviation held
  constant (AttnLRP, LXT's ``layer_norm``); :class:`IdentityNorm`: relevance passes unchanged (AttnLRP's identity rule,
  LXT's RMSNorm).
- :class:`RecurrentEpsilon` (LSTM, GRU): Arras et al. 2017.
"""

from __future__ import annotations

from dataclasses import dataclass

from .quotients import divide_behind_relu, divide_relevance, product
from .rules import STABILIZER, Rule


@dataclass(frozen=True)
class Norm(Rule):
    """Zennit's Norm rule: ``R_k = u_k * R / stab(z)`` for a join ``z = u_0 + u_1 + ...`` (a Sub's second operand
    enters negated), ``R_in = x * W^T (R / stab(z))`` for an average pool ``z = W x``; ``stab(z) = z + eps sign(z)``
    with ``eps`` the stabilizer."""

    stabilizer: float = STABILIZER
    name = "norm"
    summary = "joins, average pools, resizes: relevance in proportion to each contribution (Zennit's Norm rule)"
    kinds = ("join", "average_pool", "resize")
    multiplies_by_input = True

    def join(self, ctx, node, r: str, on_path: list[int]) -> dict[int, str]:
        """Behind a Relu, the join's relevance is 0 wherever its output is, so the Relu's output plus eps is the
        denominator (:func:`onnxlrp.quotients.divide_behind_relu`), and an operand that a Conv or BatchNormalization
        produces for this join alone may be read through its stand-in (``RelevancePass.join_stand_in``)."""
        b = ctx.b
        y = ctx.relu_behind(node.output[0]) if self.stabilizer > 0 else None  # y / (y + 0) is 0/0 where y = 0
        s = divide_behind_relu(b, r, y, self.stabilizer) if y else \
            divide_relevance(b, r, ctx.value(node.output[0]), self.stabilizer)
        operands = {i: ctx.value(node.input[i]) for i in on_path}
        if y:
            operands.update(ctx.join_stand_in(node, y))
        shares = {i: product(b, operands[i], s) for i in on_path}
        return {i: b.op("Neg", [v], "R") if node.op_type == "Sub" and i == 1 else v for i, v in shares.items()}

    def average(self, ctx, view, r: str) -> str:
        """``x * W^T (R / stab(z))`` for average pools and resizes (see
        :class:`onnxlrp.passes.ops.pooling.AveragingView`)."""
        b = ctx.b
        return product(b, view.x, view.spread(b, divide_relevance(b, r, view.y, self.stabilizer)))


@dataclass(frozen=True)
class WinnerTakesAll(Rule):
    """Max pooling: each window's relevance to the first arg-max of the window (the arg-max the gradient picks);
    overlapping windows add up. Element-wise Max/Min of several relevance-carrying operands: ``R`` to the first
    operand that attains the extremum (:class:`onnxlrp.passes.ops.extremum.ExtremumView`)."""

    name = "winner-take-all"
    summary = "max pools and element-wise Max/Min of branches: each window's relevance to its first arg-max"
    kinds = ("max_pool", "elementwise_max")
    preserves_zero = True  # routing: an input that is 0 gets relevance only where a window's maximum is 0

    def max_pool(self, ctx, view, r: str) -> str:
        return view.route_first(ctx.b, r)

    def elementwise_max(self, ctx, view, r: str) -> dict[int, str]:
        return view.route_first(ctx.b, r)


@dataclass(frozen=True)
class Uniform(Rule):
    """AttnLRP's uniform rule (Prop. 3.2, Eq. 7; LXT's ``mul2``) for a product ``y = a * b`` of two
    relevance-carrying factors: ``R_a = R_b = R / 2`` (each summed over the axes along which it was broadcast)."""

    name = "uniform"
    summary = "gates: each factor of a product gets half the relevance (AttnLRP Prop. 3.2)"
    kinds = ("gate",)
    preserves_zero = True  # y = 0 where a factor is 0, and R vanishes there if it vanishes where y does

    def gate(self, ctx, node, r: str, factors: list[int], gate: int | None) -> dict[int, str]:
        half = ctx.b.op("Mul", [r, ctx.b.const(1.0 / len(factors), "uniform")], "R_half")
        return {i: half for i in factors}


@dataclass(frozen=True)
class Value(Rule):
    """The gate of ``y = g * v`` is a constant weight: ``R_v = R``, ``R_g = 0`` (CP-LRP, Ali et al. 2022, which
    detaches the gating; Arras et al.'s signal-take-all rule for LSTM gates). The gate is the factor that a gating
    activation (Sigmoid, HardSigmoid, Softmax, bounded Clip) produces (:func:`onnxlrp.passes.ops.gates.gate_side`);
    where neither or both factors are gates (SwiGLU, a bilinear product), the product is split as :class:`Uniform`
    does."""

    name = "value"
    summary = "gates: the gate (Sigmoid/HardSigmoid/Softmax branch) is a constant, the value gets all relevance"
    kinds = ("gate",)
    preserves_zero = True

    def gate(self, ctx, node, r: str, factors: list[int], gate: int | None) -> dict[int, str]:
        if gate is None:
            return Uniform().gate(ctx, node, r, factors, gate)
        return {next(i for i in factors if i != gate): r}


@dataclass(frozen=True)
class Linearized(Rule):
    """The epsilon rule on a normalization with its standard deviation held constant (AttnLRP; LXT's ``layer_norm``,
    which detaches ``sigma`` and applies the epsilon rule to the whole layer): for ``y = A x + b``, ``A = diag(w /
    sigma) (I - 1 1^T / n)``, ``R_x = x * A^T (R / stab(y)) = x * (h - mean(h))`` with ``h = w * R / (sigma *
    stab(y))``; for RMS norm (``A = diag(w / sigma)``) ``R_x = x * h = y * R / stab(y)``, the identity rule up to the
    stabilizer. Group and instance normalization take the mean per group or channel.

    The stabilizer is Zennit's ``stab(y) = y + eps * sign(y)`` (``sign(0) = +1``) with ``eps`` the ``stabilizer``
    (1e-6, LXT's epsilon), not LXT's ``y + eps``: the classic composites use Zennit's stabilizer everywhere, and
    ``y + eps`` divides by zero where ``y = -eps``. Both agree to ``2 eps / |y|``."""

    stabilizer: float = STABILIZER
    name = "linearized"
    summary = "normalizations: the epsilon rule with the standard deviation held constant (AttnLRP, LXT)"
    kinds = ("normalization",)
    multiplies_by_input = True

    def normalization(self, ctx, view, r: str) -> str:
        return view.input_relevance(divide_relevance(ctx.b, r, view.y, self.stabilizer))


@dataclass(frozen=True)
class IdentityNorm(Rule):
    """A normalization passes relevance unchanged: ``R_x = R_y`` (AttnLRP's identity rule for normalizations, which
    LXT applies to RMSNorm)."""

    name = "identity"
    summary = "normalizations: relevance passes unchanged (AttnLRP's identity rule, LXT's RMSNorm)"
    kinds = ("normalization",)

    def normalization(self, ctx, view, r: str) -> str:
        return r


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




NODE_RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (Norm, WinnerTakesAll, Uniform, Value, Linearized,
                                                                IdentityNorm, RecurrentEpsilon)}
DEFAULTS: dict[str, type[Rule]] = {"join": Norm, "average_pool": Norm, "max_pool": WinnerTakesAll,
                                   "elementwise_max": WinnerTakesAll, "resize": Norm, "gate": Value,
                                   "normalization": Linearized, "recurrent": RecurrentEpsilon}
