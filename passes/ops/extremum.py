"""Element-wise Max and Min (n-ary, broadcasting).

- One relevance-carrying operand, the others constant or off the path (``Max(x, 0)`` is a ReLU, ``Min(x, 6)`` half
  a ReLU6): an element-wise activation, relevance passes unchanged (Zennit's Pass rule), broadcasting undone.
- Several relevance-carrying operands (maxout, ``torch.maximum(a, b)`` of two branches): the node kind
  ``elementwise_max`` joins branches, and its rule comes from the family like a max pool's, the operands at one
  position being the pool's window (:class:`ExtremumView`): classic winner-take-all sends ``R`` to the first operand
  that attains the extremum (operand order; the max-pool rule's first arg-max), R-LRP sends ``x_k R`` to every
  operand that attains it (Prop. 13's mask of all arg-maxes; ``Card(J_i) / (N M)`` is uniform here, each input
  feeding one output and each output reading ``n`` inputs). R-LRP treats the node as a join: its fork normalizes the
  branches (Eq. 13).

Constant operands compete only in the forward pass: where one of them wins (``Max(a, b, 0)`` where ``a, b < 0``),
the relevance still goes to the extremal relevance-carrying operand, as if the constant were an activation applied
after ``Max(a, b)``.
"""

from __future__ import annotations

from onnxlrp.quotients import mul

from .helpers import float_mask, path_inputs, unbroadcast
from .registry import backward


def extremum_nonnegative(is_nonneg, node, tensor) -> bool:
    """``Max`` is ``>= 0`` when one operand is, ``Min`` when all are."""
    operands = [i for i in node.input if i]
    test = any if node.op_type == "Max" else all
    return test(is_nonneg(i) for i in operands)


def extremum_preserves_zero(ctx, node, index) -> bool:
    """With one relevance-carrying operand: ``f(0) = 0`` when every constant operand allows it (``Max(0, c) = 0``
    for ``c <= 0``, ``Min(0, c) = 0`` for ``c >= 0``); operands that are not constants are not known."""
    others = [n for i, n in enumerate(node.input) if n and i != index]
    values = [ctx.constants.get(n) for n in others]
    if any(v is None for v in values):
        return False
    return all((v <= 0).all() if node.op_type == "Max" else (v >= 0).all() for v in values)


class ExtremumView:
    """The relevance-carrying operands ``x_k`` (float32, by input index), their extremum ``m`` (the node's output
    when every operand carries relevance), and the two routings of ``R`` (shaped like the output; the emitter undoes
    broadcasting)."""

    def __init__(self, ctx, node, on_path: list[int]):
        self.ctx, self.node = ctx, node
        self.operands = {i: ctx.value(node.input[i]) for i in on_path}
        if len(on_path) == len([n for n in node.input if n]):
            self.extremum = ctx.value(node.output[0])
        else:
            self.extremum = ctx.b.op(node.op_type, list(self.operands.values()), "extremum")

    def attains(self, b, i: int) -> str:
        return b.op("Equal", [self.operands[i], self.extremum], "attains")

    def route_first(self, b, r: str) -> dict[int, str]:
        """``R`` to the first operand (input order) that attains the extremum."""
        shares, taken = {}, None
        for i in self.operands:
            attains = self.attains(b, i)
            first = attains if taken is None else b.op("And", [attains, b.op("Not", [taken])], "first")
            shares[i] = mul(b, float_mask(b, first), r)
            taken = attains if taken is None else b.op("Or", [taken, attains], "taken")
        return shares

    def route_all(self, b, r: str) -> dict[int, str]:
        """``R`` to every operand that attains the extremum."""
        return {i: mul(b, float_mask(b, self.attains(b, i)), r) for i in self.operands}


def check_extremum(ctx, node):
    shapes = [ctx.shapes.get(node.input[i]) for i in path_inputs(ctx, node)]
    if len(shapes) > 1 and any(s is None for s in shapes):
        return "needs the shapes of its relevance-carrying operands"
    return None


@backward("Max", "Min", join=True, kind="elementwise_max", nonnegative=extremum_nonnegative,
          zero_preserving=extremum_preserves_zero, check=check_extremum)
def extremum(ctx, node, r_out):
    r = r_out[0]
    on_path = path_inputs(ctx, node)
    if len(on_path) == 1:
        i = on_path[0]
        return {i: unbroadcast(ctx, r, node.input[i], node.output[0])}
    shares = ctx.rule(node).elementwise_max(ctx, ExtremumView(ctx, node, on_path), r)
    out = {i: unbroadcast(ctx, v, node.input[i], node.output[0]) for i, v in shares.items()}
    ctx.join_shares.update({(node.name, i): v for i, v in out.items()})
    return out
