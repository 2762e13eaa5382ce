"""AttnLRP and CP-LRP rules for transformers, as LXT 2.1's explicit mode computes them.

Sources: Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers" (ICML 2024;
Eq. 8 epsilon rule, Prop. 3.1 softmax, Prop. 3.3 matrix product) and its code, LXT 2.1 (``lxt.explicit.functional``:
``linear_epsilon``, ``add2``, ``softmax``, ``matmul``; ``lxt.explicit.rules``: ``EpsilonRule``,
``UniformEpsilonRule``); Ali et al., "XAI for Transformers: Better Explanations through Conservative Propagation"
(ICML 2022) for CP-LRP.

**Stabilizer.** LXT stabilizes a denominator as ``z + eps`` (``lxt.explicit.functional._stabilize``: 1e-8 on linear
layers, ``Q K^T`` and Add), not as Zennit's ``z + eps * sign(z)``. The rules here follow LXT (:func:`shifted_divide`),
the classic rules of :mod:`onnxlrp.rules` keep Zennit's convention, and a composite picks one per node: ``attnlrp``
and ``cp-lrp`` use these rules everywhere, the Zennit composites use theirs for linear layers and joins and these
for the node kinds that have no Zennit rule (softmax, matrix products of two activations). ``z + eps`` differs from
Zennit's only where ``z < 0``; where ``z + eps`` is exactly 0 (``z = -eps``), the denominator is ``eps`` instead, so
that no quotient is infinite.

Node kinds (a composite selects the rule per kind, op type, name or position):

- ``linear`` (Conv/Gemm/MatMul with a constant weight and its bias Add) and ``join`` (Add/Sum/Sub of several
  relevance-carrying tensors): :class:`LXTEpsilon`, Eq. 8: ``R_in = x * W^T (R / (z + eps))``, a join's operand
  ``u_k`` gets ``u_k * R / (z + eps)`` (``add2``).
- ``offset`` (an Add/Sub of a relevance-carrying tensor and one that carries none: a folded position or token-type
  embedding, an attention mask): :class:`LXTEpsilon` too, so that the other operand keeps its share
  ``c * R / (z + eps)`` (LXT's ``add2`` with a detached operand). Without an entry for ``offset`` (the Zennit
  composites), relevance passes unchanged, as before.
- ``softmax`` (a Softmax inside the network): :class:`SoftmaxTaylor`, Prop. 3.1, or :class:`HeldConstant` (CP-LRP:
  the attention probabilities are constants).
- ``matmul`` (MatMul of two activations, ``Q K^T`` and ``P V``): :class:`UniformEpsilon`, Prop. 3.3. An operand that
  CP-LRP holds constant (the output of a Softmax under :class:`HeldConstant`) gets nothing, and the other operand then
  gets the epsilon rule of a linear map with run-time weights, as LXT's CP-LRP attention computes it.
- ``normalization`` (LayerNorm, RMS norm and their decomposed forms, :mod:`onnxlrp.passes.ops.normalization`):
  :class:`LXTNorm`, LXT's rules (LayerNorm linearized with LXT's stabilizer on its output, RMS norm the identity).
- ``gate`` (a product of two relevance-carrying tensors, :mod:`onnxlrp.passes.ops.gates`): AttnLRP's uniform split
  is :class:`onnxlrp.node_rules.Uniform`; CP-LRP's constant gate is :class:`ActivationGate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quotients import product
from .rules import Rule

LXT_EPSILON = 1e-8  # lxt.explicit.rules.EpsilonRule, lxt.explicit.functional.add2 and matmul
LXT_NORM_EPSILON = 1e-6  # lxt.explicit.functional.layer_norm_grad_fn: relevance_norm = R / (y + 1e-6)
# op types whose output is an element-wise activation of its input (the gate of SwiGLU or GeGLU); with the fused
# ElementwiseActivation of :func:`onnxlrp.passes.patterns.activation_product`
ACTIVATIONS = {"ElementwiseActivation", "Sigmoid", "Tanh", "HardSigmoid", "Gelu", "Relu", "Softplus", "Elu", "Selu",
               "Celu", "Mish", "HardSwish", "LeakyRelu", "Swish"}
FLOAT_MAX = float(np.finfo(np.float32).max)


def shifted_divide(b, r: str, z: str, eps: float) -> str:
    """``r / (z + eps)``, LXT's stabilizer; a denominator that is exactly 0 becomes ``eps``."""
    zero = b.const(0.0, "zero")
    shifted = b.op("Add", [z, b.const(eps, "eps")], "stab") if eps else z
    safe = b.op("Where", [b.op("Equal", [shifted, zero], "stab_zero"), b.const(eps or 1.0, "eps"), shifted], "stab")
    return b.op("Div", [r, safe], "s")


@dataclass(frozen=True)
class LXTEpsilon(Rule):
    """The epsilon rule with LXT's stabilizer ``z + eps`` (AttnLRP Eq. 8; ``lxt.explicit.rules.EpsilonRule``).

    - linear layer ``z = W x + b``: ``R_in = x * W^T (R / (z + eps))``;
    - join ``z = u_0 + u_1 + ...``: ``R_k = u_k * R / (z + eps)`` (a Sub's second operand negated; ``add2``);
    - offset ``z = u + c`` with ``c`` carrying no relevance: ``R_u = u * R / (z + eps)``, ``c`` keeps the rest."""

    epsilon: float = LXT_EPSILON
    name = "lxt-epsilon"
    summary = "epsilon rule with LXT's stabilizer z + eps (default 1e-8): linear layers, joins, offsets"
    kinds = ("linear", "join", "offset")
    multiplies_by_input = True

    def relevance(self, b, layer, r):
        s = shifted_divide(b, r, layer.z, self.epsilon)
        return product(b, layer.x, layer.transpose(b, s, layer.weight, "W"))

    def join(self, ctx, node, r: str, on_path: list[int]) -> dict[int, str]:
        b = ctx.b
        s = shifted_divide(b, r, ctx.value(node.output[0]), self.epsilon)
        shares = {i: product(b, ctx.value(node.input[i]), s) for i in on_path}
        return {i: b.op("Neg", [v], "R") if node.op_type == "Sub" and i == 1 else v for i, v in shares.items()}

    def offset(self, ctx, node, r: str, index: int) -> str:
        return self.join(ctx, node, r, [index])[index]


@dataclass(frozen=True)
class SoftmaxTaylor(Rule):
    """AttnLRP Prop. 3.1 (Deep Taylor decomposition of the softmax at its input, with the bias):
    ``R_x = x * (R_s - s * sum_axis R_s)`` (``lxt.explicit.functional.softmax``).

    ``x`` is the softmax input after scaling and masking. LXT replaces ``-inf`` entries of ``x`` by 0; here ``x`` is
    clipped to the float32 range, the same where ``s = 0`` (a masked entry: ``R_s`` is 0 there, since every rule of
    the softmax's readers multiplies by ``s``), and finite everywhere. When the exporter guards the softmax's NaN rows
    (``Where(IsNaN(s), 0, s)``, fully masked rows), ``s`` is read behind the guard."""

    name = "softmax-taylor"
    summary = "AttnLRP Prop. 3.1: x * (R - s * sum R) at a softmax inside the network"
    kinds = ("softmax",)
    multiplies_by_input = True

    def softmax(self, ctx, x: str, s: str, r: str, axis: int) -> str | None:
        """``R_x`` for ``s = softmax(x)`` along ``axis`` (float32 values of ``x`` and ``s``)."""
        b = ctx.b
        x = b.op("Clip", [x, b.const(-FLOAT_MAX, "float_min")], "x_finite")
        total = ctx.reduce("ReduceSum", r, [axis])
        return product(b, x, b.op("Sub", [r, b.op("Mul", [s, total], "s_total")], "centred"))


@dataclass(frozen=True)
class HeldConstant(Rule):
    """CP-LRP (Ali et al. 2022; LXT's ``StopRelevanceRule`` and ``.detach()``): the softmax output is a constant. No
    relevance reaches its input, and a matrix product that reads it (``P V``) is a linear map of its other operand
    (:class:`UniformEpsilon`)."""

    name = "constant"
    summary = "CP-LRP: the softmax output (attention probabilities) is a constant; no relevance passes it"
    kinds = ("softmax",)
    holds_output_constant = True

    def softmax(self, ctx, x, s, r, axis):
        return None


@dataclass(frozen=True)
class UniformEpsilon(Rule):
    """AttnLRP Prop. 3.3 for ``C = A B`` with two relevance-carrying operands: the epsilon rule on the bilinear map,
    then the uniform rule between the operands (``lxt.explicit.functional.matmul``):
    ``N = R / (n C + eps)``, ``R_A = A * (N B^T)``, ``R_B = B * (A^T N)``, ``n = 2``.

    An operand held constant (CP-LRP's attention probabilities, or a run-time tensor that carries no relevance)
    gets nothing, ``n = 1``, and the other operand gets the epsilon rule of the linear map it goes through
    (``lxt.explicit.special.multi_head_attention_cp``)."""

    epsilon: float = LXT_EPSILON
    name = "uniform-epsilon"
    summary = "AttnLRP Prop. 3.3: C = A B splits R / (2C + eps) between A and B (epsilon, then uniform)"
    kinds = ("matmul",)
    multiplies_by_input = True

    def matmul(self, ctx, a: str, w: str, c: str, ranks: list[int], r: str, live: list[int]) -> dict[int, str]:
        """The relevance of the operands ``live`` (0: ``a``, 1: ``w``) of ``c = a w`` (float32 values, ``ranks``
        of ``a`` and ``w``), each shaped like the product's batch axes and the operand's matrix axes."""
        b = ctx.b
        z = c if len(live) == 1 else b.op("Mul", [c, b.const(float(len(live)), "n_operands")], "n_c")
        s = shifted_divide(b, r, z, self.epsilon)
        out = {}
        if 0 in live:
            out[0] = product(b, a, b.op("MatMul", [s, swap_last(b, w, ranks[1])], "s_Bt"))
        if 1 in live:
            out[1] = product(b, w, b.op("MatMul", [swap_last(b, a, ranks[0]), s], "At_s"))
        return out


@dataclass(frozen=True)
class LXTNorm(Rule):
    """LXT's normalization rules. LayerNorm (centered; ``lxt.explicit.functional.layer_norm``): the standard deviation
    is a constant, so the layer is linear, and the epsilon rule with LXT's stabilizer on its output gives ``R_x = x *
    (h - mean(h))``, ``h = w * R / (sigma (y + eps))`` (AttnLRP Prop. 3.4's linearization; the map is
    :class:`onnxlrp.passes.ops.normalization.NormView`'s). RMS norm (not centered;
    ``lxt.explicit.functional.rms_norm_identity``): the identity, ``R_x = R``."""

    epsilon: float = LXT_NORM_EPSILON
    name = "lxt-norm"
    summary = "normalizations as LXT: LayerNorm linearized with the stabilizer y + eps (1e-6), RMS norm identity"
    kinds = ("normalization",)
    multiplies_by_input = True

    def normalization(self, ctx, view, r: str) -> str:
        if not view.centered:
            return r
        return view.input_relevance(shifted_divide(ctx.b, r, view.y, self.epsilon))


@dataclass(frozen=True)
class ActivationGate(Rule):
    """CP-LRP's gate (Ali et al. 2022; LXT's CP-LRP for LLaMA stops the relevance at the activation,
    ``lxt.explicit.models.llama.cp_lrp``): in ``y = act(g) * u`` the activation's output is a constant, ``R_u = R``.
    The gate is the factor that a gating activation makes (:func:`onnxlrp.passes.ops.gates.gate_side`: Sigmoid,
    HardSigmoid, Softmax, bounded Clip), else the one factor that an element-wise activation makes (the SiLU of
    SwiGLU, the GELU of GeGLU); where neither decides (a bilinear product), the product is split as
    :class:`onnxlrp.node_rules.Uniform` does."""

    name = "activation-gate"
    summary = "gates: the activation's factor (SwiGLU's SiLU, a Sigmoid) is a constant, the other gets all R (CP-LRP)"
    kinds = ("gate",)
    preserves_zero = True

    def gate(self, ctx, node, r: str, factors: list[int], gate: int | None) -> dict[int, str]:
        if gate is None:
            made = [i for i in factors if activation_output(ctx, node.input[i])]
            gate = made[0] if len(made) == 1 else None
        if gate is None:
            half = ctx.b.op("Mul", [r, ctx.b.const(1.0 / len(factors), "uniform")], "R_half")
            return {i: half for i in factors}
        return {next(i for i in factors if i != gate): r}


def activation_output(ctx, tensor: str) -> bool:
    """Whether ``tensor`` is the output of an element-wise activation (through Cast and Identity)."""
    node = ctx.view.producer.get(tensor)
    while node is not None and node.op_type in ("Cast", "Identity"):
        node = ctx.view.producer.get(node.input[0])
    return node is not None and node.op_type in ACTIVATIONS


def swap_last(b, tensor: str, rank: int) -> str:
    """``tensor`` (of rank ``rank``) with its last two axes swapped."""
    return b.op("Transpose", [tensor], "T", perm=list(range(rank - 2)) + [rank - 1, rank - 2])


ATTENTION_RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (LXTEpsilon, SoftmaxTaylor, HeldConstant,
                                                                     UniformEpsilon, LXTNorm, ActivationGate)}
ATTENTION_DEFAULTS: dict[str, type[Rule]] = {"softmax": SoftmaxTaylor, "matmul": UniformEpsilon}
