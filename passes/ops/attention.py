"""Attention: a Softmax inside the network and the matrix product of two activations (``Q K^T``, ``P V``).

Both are rule-bearing kinds (``softmax``, ``matmul``): the rule the family planned does the arithmetic
(:mod:`onnxlrp.attention_rules`: AttnLRP Prop. 3.1 and 3.3, CP-LRP). A MatMul whose operands are both computed at
run time is seen by the sweep as the virtual node ``ActivationMatMul`` (:mod:`onnxlrp.passes.attention_patterns`);
a MatMul with a constant weight stays a linear layer.
"""

from __future__ import annotations

from onnxlrp.errors import OnnxlrpError

from .helpers import attr, path_inputs
from .registry import backward

# ops through which a tensor keeps the values of one data input (re-indexed, cast, or with guarded NaN entries)
CARRIES_VALUES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Identity", "Dropout", "Expand",
                  "Where", "Slice", "Gather", "Concat"}


def nan_guard(ctx, node) -> str | None:
    """The output of ``Where(IsNaN(s), 0, s)`` when it is what the network reads of the softmax output ``s``
    (exporters guard fully masked rows, whose softmax is NaN)."""
    s = node.output[0]
    readers = ctx.view.consumers.get(s, [])
    checks = {r.output[0] for r, _ in readers if r.op_type == "IsNaN"}
    for reader, index in readers:
        if reader.op_type == "Where" and index == 2 and reader.input[0] in checks:
            value = ctx.constants.get(reader.input[1])
            if value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 0.0:
                return reader.output[0]
    return None


@backward("Softmax", data_inputs=(0,), kind="softmax", nonnegative="always")
def softmax(ctx, node, r_out):
    """The planned softmax rule on ``s = softmax(x)`` along the node's axis (``s`` behind its NaN guard)."""
    s = nan_guard(ctx, node) or node.output[0]
    rank = len(ctx.shapes.get(node.input[0]) or [None])
    axis = attr(node, "axis", -1)
    return ctx.rule(node).softmax(ctx, node, r_out[0], ctx.value(s), axis % rank if rank else axis)


def held_constant(ctx, tensor: str) -> bool:
    """Whether ``tensor`` holds the values of a node output that the plan treats as a constant (CP-LRP's attention
    probabilities), through ops that re-index, cast or guard it."""
    for _ in range(64):
        node = ctx.view.producer.get(tensor)
        if node is None:
            return False
        rule = ctx.plan.get(node.name)
        if rule is not None:
            return bool(getattr(rule, "holds_output_constant", False))
        if node.op_type not in CARRIES_VALUES:
            return False
        on_path = path_inputs(ctx, node)
        if len(on_path) != 1:
            return False
        tensor = node.input[on_path[0]]
    return False


def check_matmul(ctx, node):
    for name in node.input[:2]:
        shape = ctx.shapes.get(name)
        if shape is None or len(shape) < 2:
            return f"operand {name!r} needs a known rank of at least 2"
    return None


@backward("ActivationMatMul", fused=True, kind="matmul", check=check_matmul)
def activation_matmul(ctx, node, r_out):
    """``C = A B`` with run-time operands: the planned rule on the operands that carry relevance and are not held
    constant; each operand's relevance is summed over the batch axes along which MatMul broadcast it."""
    live = [i for i in path_inputs(ctx, node) if not held_constant(ctx, node.input[i])]
    if not live:
        return {}
    shares = ctx.rule(node).matmul(ctx, node, r_out[0], live)
    return {i: unbroadcast_batch(ctx, r, node.input[i], node.output[0]) for i, r in shares.items()}


def unbroadcast_batch(ctx, r: str, operand: str, output: str) -> str:
    """``r`` (shaped like the product's batch axes and the operand's matrix axes) summed over the batch axes that
    MatMul broadcast the operand along, and reshaped like the operand."""
    si, so = ctx.shapes.get(operand), ctx.shapes.get(output)
    if si is None or so is None:
        raise OnnxlrpError(f"MatMul {output!r}: operand shapes unknown")
    lead = len(so) - len(si)
    axes = list(range(lead)) + [lead + a for a, d in enumerate(si[:-2]) if d == 1 and so[lead + a] != 1]
    if not axes:
        return r
    r = ctx.reduce(ctx.algebra.reduce_op, r, axes, hint="unbroadcast")
    return ctx.b.op("Reshape", [r, ctx.b.op("Shape", [operand])], "unbroadcast")
