"""Attention: a Softmax inside the network and the matrix product of two activations (``Q K^T``, ``P V``).

Both are rule-bearing kinds (``softmax``, ``matmul``): the rule the family planned does the arithmetic
(:mod:`onnxlrp.attention_rules`: AttnLRP Prop. 3.1 and 3.3, CP-LRP). A MatMul whose operands are both computed at
run time is seen by the sweep as the virtual node ``ActivationMatMul`` (:mod:`onnxlrp.passes.attention_patterns`);
a MatMul with a constant weight stays a linear layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

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


def check_softmax(ctx, node):
    return None if ctx.shapes.get(node.input[0]) is not None else "needs a known input rank"


@backward("Softmax", data_inputs=(0,), kind="softmax", nonnegative="always", check=check_softmax)
def softmax(ctx, node, r_out):
    """The planned softmax rule on ``s = softmax(x)`` along the node's axis (``s`` behind its NaN guard)."""
    s = nan_guard(ctx, node) or node.output[0]
    rank = len(ctx.shapes[node.input[0]])
    r = ctx.rule(node).softmax(ctx, ctx.value(node.input[0]), ctx.value(s), r_out[0], attr(node, "axis", -1) % rank)
    return {} if r is None else {0: r}


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
    a, w = node.input[:2]
    ranks = [len(ctx.shapes[name]) for name in (a, w)]
    shares = ctx.rule(node).matmul(ctx, ctx.value(a), ctx.value(w), ctx.value(node.output[0]), ranks, r_out[0], live)
    return {i: unbroadcast_batch(ctx, r, node.input[i], node.output[0]) for i, r in shares.items()}


def unbroadcast_batch(ctx, r: str, operand: str, output: str) -> str:
    """``r`` (shaped like the product's batch axes and the operand's matrix axes) summed over the batch axes that
    MatMul broadcast the operand along (the leading ones squeezed)."""
    si, so = ctx.shapes.get(operand), ctx.shapes.get(output)
    if si is None or so is None:
        raise OnnxlrpError(f"MatMul {output!r}: operand shapes unknown")
    lead = len(so) - len(si)
    axes = list(range(lead)) + [lead + a for a, d in enumerate(si[:-2]) if d == 1 and so[lead + a] != 1]
    if not axes:
        return r
    r = ctx.reduce(ctx.algebra.reduce_op, r, axes, hint="unbroadcast")
    if not lead:
        return r
    return ctx.b.op("Squeeze", [r, ctx.b.const(list(range(lead)), "axes", np.int64)], "unbroadcast")


# ---------------------------------------------------------------- the fused Attention op (opset 23)

def check_attention(ctx, node):
    shapes = [ctx.shapes.get(name) for name in node.input[:3]]
    if any(s is None or len(s) != 4 for s in shapes):
        return "needs 4-D query, key and value ([batch, heads, tokens, head size])"
    if shapes[0][1] is None or shapes[1][1] is None or shapes[0][1] % shapes[1][1]:
        return "needs static head counts (the query's a multiple of the key's)"
    if len(node.input) > 4 and any(node.input[4:]) or any(o for o in node.output[1:] if o in ctx.tensors):
        return "a key/value cache is not supported"
    if attr(node, "softcap", 0.0) or attr(node, "qk_matmul_output_mode", 0):
        return "softcap and qk_matmul_output_mode are not supported"
    return None


def repeat_heads(b, t: str, group: int) -> str:
    """``[B, Hk, T, d]`` -> ``[B, Hk * group, T, d]``, each head repeated ``group`` times in a row (grouped-query
    attention: query head ``i`` reads key head ``i // group``)."""
    if group == 1:
        return t
    wide = b.op("Unsqueeze", [t, b.const([2], "axes", np.int64)], "kv")
    shape = b.op("Shape", [wide], "kv_shape")
    target = b.op("Mul", [shape, b.const([1, 1, group, 1, 1], "group", np.int64)], "kv_shape")
    expanded = b.op("Expand", [wide, target], "kv")
    return b.op("Reshape", [expanded, b.const([0, -1, 0, 0], "shape", np.int64)], "kv")


def sum_heads(ctx, r: str, group: int) -> str:
    """The transpose of :func:`repeat_heads`: each key head's relevance summed over its query heads."""
    if group == 1:
        return r
    b = ctx.b
    split = b.op("Reshape", [r, b.const([0, -1, group, 0, 0], "shape", np.int64)], "R_groups")
    return ctx.reduce("ReduceSum", split, [2], keepdims=0, hint="R")


def masked_scores(ctx, node, scores: str) -> str:
    """The op's attention logits: the scaled scores plus a float mask, or set to ``-inf`` where a boolean mask (or
    the causal mask of ``is_causal``) is False."""
    b = ctx.b
    minus_inf = b.const(float("-inf"), "minus_inf")
    if len(node.input) > 3 and node.input[3]:
        mask = node.input[3]
        if ctx.elem_type(mask) == TensorProto.BOOL:
            scores = b.op("Where", [mask, scores, minus_inf], "masked")
        else:
            scores = b.op("Add", [scores, ctx.value(mask)], "masked")
    if attr(node, "is_causal", 0):
        shape = b.op("Shape", [scores], "scores_shape")
        ones = b.op("ConstantOfShape", [b.op("Slice", [shape, b.const([2], "start", np.int64),
                                                      b.const([4], "end", np.int64)], "qk")],
                    "ones", value=onnx.helper.make_tensor("value", TensorProto.BOOL, [1], [True]))
        causal = b.op("Cast", [b.op("Trilu", [b.op("Cast", [ones], "ones", to=TensorProto.INT64)], "causal", upper=0)],
                      "causal", to=TensorProto.BOOL)
        scores = b.op("Where", [causal, scores, minus_inf], "masked")
    return scores


@backward("Attention", data_inputs=(0, 1, 2), kind=("softmax", "matmul"), check=check_attention)
def attention(ctx, node, r_out):
    """``Y = softmax(scale * Q K^T + mask) V`` (ONNX ``Attention``, opset 23): the logits and the probabilities are
    recomputed in the relevance graph (the op does not expose them), then the planned rules run as on the exporters'
    decomposed attention: the matmul rule on ``P V``, the softmax rule, the mask and the scale pass relevance (as
    LXT's ``add2`` and ``mul2`` do where the mask is 0), and the matmul rule on ``Q K^T``. Grouped-query heads are
    repeated for the products and their relevance summed back."""
    b = ctx.b
    q, k, v = (ctx.value(name) for name in node.input[:3])
    shapes = [ctx.shapes[name] for name in node.input[:3]]
    group = shapes[0][1] // shapes[1][1]
    k_all, v_all = repeat_heads(b, k, group), repeat_heads(b, v, group)
    scale = attr(node, "scale")
    if scale is None:
        head_size = b.op("Cast", [b.op("Slice", [b.op("Shape", [q]), b.const([3], "start", np.int64),
                                                 b.const([4], "end", np.int64)])], "head_size", to=TensorProto.FLOAT)
        factor = b.op("Reciprocal", [b.op("Sqrt", [head_size], "sqrt_d")], "scale")
    else:
        factor = b.const(float(scale), "scale")
    k_t = b.op("Transpose", [k_all], "K_T", perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [q, k_t], "QK")
    logits = masked_scores(ctx, node, b.op("Mul", [scores, factor], "logits"))
    probs = b.op("Softmax", [logits], "P", axis=-1)
    probs = b.op("Where", [b.op("IsNaN", [probs], "nan"), b.const(0.0, "zero"), probs], "P")
    softmax_rule, matmul_rule = ctx.rule(node, "softmax"), ctx.rule(node, "matmul")
    live = [1] if getattr(softmax_rule, "holds_output_constant", False) else [0, 1]
    shares = matmul_rule.matmul(ctx, probs, v_all, ctx.value(node.output[0]), [4, 4], r_out[0], live)
    out = {2: sum_heads(ctx, shares[1], group)}
    if 0 in shares:
        r_logits = softmax_rule.softmax(ctx, logits, probs, shares[0], 3)
        if r_logits is not None:
            qk = matmul_rule.matmul(ctx, q, k_t, scores, [4, 4], r_logits, [0, 1])
            r_k = b.op("Transpose", [qk[1]], "R_K", perm=[0, 1, 3, 2])
            out.update({0: qk[0], 1: sum_heads(ctx, r_k, group)})
    return out
