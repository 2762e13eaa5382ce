"""Products: a Mul with a constant operand passes relevance (Zennit's Pass rule); a Mul of two relevance-carrying
tensors is a *gate* (squeeze-and-excitation ``x * Sigmoid(FC(GAP(x)))``, GLU ``a * Sigmoid(b)``, SwiGLU ``SiLU(a) *
b``), whose rule the family plans (:mod:`onnxlrp.node_rules`: ``value`` or ``uniform``; R-LRP: the value rule as
Eq. 6-7). A Mul whose two factors are element-wise functions of one tensor is an activation, not a gate
(:func:`onnxlrp.passes.patterns.activation_product` fuses it first).

The gate factor is the one that a gating activation bounds to a fixed range: Sigmoid, HardSigmoid, Softmax, or a
Clip with both bounds (the decomposed hard sigmoid ``Clip(x + 3, 0, 6) / 6``), possibly behind re-shaping,
broadcasting and arithmetic with constants. When exactly one factor is such a gate, the other is the value; otherwise
(two gates, or none, as in SwiGLU or a bilinear product) the gate is ambiguous.
"""

from __future__ import annotations

from .helpers import path_inputs, unbroadcast
from .registry import backward, spec

GATE_OPS = ("Sigmoid", "HardSigmoid", "Softmax")
FOLLOWED = ("Transpose", "Expand", "Tile")  # re-indexing or broadcasting ops a gate may pass through
WITH_CONSTANT = ("Add", "Sub", "Mul", "Div")


def gating_op(ctx, tensor: str) -> str | None:
    """The gating activation that bounds ``tensor`` (see the module docstring), or None."""
    for _ in range(16):
        node = ctx.view.producer.get(tensor)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in GATE_OPS:
            return node.op_type
        if node.op_type == "Clip":
            bounds = list(node.input[1:3])
            return "Clip" if len(bounds) == 2 and all(b in ctx.constants for b in bounds) else None
        data = [i for i in node.input if i and i not in ctx.constants]
        if spec(node).shape_only or node.op_type in FOLLOWED:
            tensor = node.input[0]
        elif node.op_type in WITH_CONSTANT and len(data) == 1 and len(node.input) == 2:
            tensor = data[0]
        else:
            return None
    return None


def gate_side(ctx, node) -> tuple[int, str] | None:
    """``(index of the gate factor, its gating op)`` when exactly one of the two relevance-carrying factors is a gate;
    None when that is ambiguous."""
    on_path = path_inputs(ctx, node)
    gates = [(i, op) for i in on_path if (op := gating_op(ctx, node.input[i])) is not None]
    return gates[0] if len(on_path) == 2 and len(gates) == 1 else None


def describe_gate(ctx, node) -> str:
    """One line for ``inspect``: which factor is the value and which the gate."""
    side = gate_side(ctx, node)
    if side is None:
        consequence = f"{ctx.family.name} has no rule for it" if ctx.family.gates_need_a_side else \
            "'value' splits it like 'uniform'"
        return (f"gate at {node.name!r}: no single gate factor (neither or both factors come from Sigmoid, "
                f"HardSigmoid, Softmax or a bounded Clip): {consequence}")
    gate, op = side
    value = next(i for i in path_inputs(ctx, node) if i != gate)
    return f"gate at {node.name!r}: value = input {value} ({node.input[value]}), gate = input {gate} ({op})"


def check_mul(ctx, node):
    on_path = path_inputs(ctx, node)
    if len(on_path) > 1 and ctx.family.gates_need_a_side and gate_side(ctx, node) is None:
        return ("a product of two relevance-carrying tensors of which neither (or both) is a gate (Sigmoid, "
                f"HardSigmoid, Softmax, bounded Clip): {ctx.family.name} has no rule for it")
    return None


@backward("Mul", kind="gate", nonnegative="all", zero_preserving=True, check=check_mul)
def mul(ctx, node, r_out):
    """One relevance-carrying factor (the other constant): relevance maps back unchanged. Two: the gate rule the
    family planned, told which factor is the gate (None: ambiguous), then the family's per-layer step."""
    on_path = path_inputs(ctx, node)
    if len(on_path) == 1:
        (i,) = on_path
        return {i: unbroadcast(ctx, r_out[0], node.input[i], node.output[0])}
    side = gate_side(ctx, node)
    shares = ctx.rule(node).gate(ctx, node, r_out[0], on_path, None if side is None else side[0])
    return {i: unbroadcast(ctx, ctx.family.after_layer(ctx, r, r_out[0]), node.input[i], node.output[0])
            for i, r in shares.items()}
