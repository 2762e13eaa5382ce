"""INTERIM (branch ``tf``): gate rules for a product of two relevance-carrying tensors, until the gated-activation
work of issue 16 lands in main and replaces this module (its rules ``uniform`` and ``value`` have the same names).

A gate is ``y = a * b`` where both factors carry relevance (SwiGLU's ``silu(x W_g) * (x W_u)``, GLU):

- :class:`UniformGate`: AttnLRP Prop. 3.2, each factor gets ``R / 2`` (``lxt.explicit.rules.UniformRule``,
  ``lxt.explicit.functional.mul2``).
- :class:`ValueGate`: CP-LRP, the gate is a constant: all of ``R`` goes to the factor that is not the output of an
  element-wise activation (LXT's CP-LRP for LLaMA stops the relevance at the activation,
  ``lxt.explicit.models.llama.cp_lrp``; its epsilon rule on the product then gives the other factor
  ``R * y / (y + 1e-8)``, here ``R``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import OnnxlrpError
from .rules import Rule

# op types whose output is an element-wise activation of its input (the gate of a gated unit)
ACTIVATIONS = {"ElementwiseActivation", "Sigmoid", "Tanh", "HardSigmoid", "Gelu", "Relu", "Softplus", "Elu", "Selu",
               "Celu", "Mish", "HardSwish", "LeakyRelu"}


@dataclass(frozen=True)
class UniformGate(Rule):
    """AttnLRP Prop. 3.2: each relevance-carrying factor of a product gets an equal share."""

    name = "uniform"
    summary = "gates (a * b, both carrying relevance): each factor gets R / 2 (AttnLRP Prop. 3.2)"
    kinds = ("gate",)

    def gate(self, ctx, node, r: str, live: list[int]) -> dict[int, str]:
        if len(live) == 1:
            return {live[0]: r}
        half = ctx.b.op("Mul", [r, ctx.b.const(1.0 / len(live), "share")], "R")
        return {i: half for i in live}


@dataclass(frozen=True)
class ValueGate(Rule):
    """CP-LRP: the activation branch of a gate is a constant; the other factor gets all the relevance."""

    name = "value"
    summary = "gates: the activation branch is a constant, the other factor gets all of R (CP-LRP)"
    kinds = ("gate",)

    def gate(self, ctx, node, r: str, live: list[int]) -> dict[int, str]:
        if len(live) == 1:
            return {live[0]: r}
        gates = [i for i in live if is_activation(ctx, node.input[i])]
        if len(gates) != 1:
            raise OnnxlrpError(f"node {node.name!r}: the 'value' gate rule needs exactly one factor that is an "
                               f"activation's output; found {len(gates)}")
        return {i: r for i in live if i != gates[0]}


def is_activation(ctx, tensor: str) -> bool:
    """Whether ``tensor`` is the output of an element-wise activation (through Cast/Identity)."""
    node = ctx.view.producer.get(tensor)
    while node is not None and node.op_type in ("Cast", "Identity"):
        node = ctx.view.producer.get(node.input[0])
    return node is not None and node.op_type in ACTIVATIONS


GATE_RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (UniformGate, ValueGate)}
GATE_DEFAULTS: dict[str, type[Rule]] = {"gate": UniformGate}
