"""Vector-Jacobian products per op type: what the Taylor family (:mod:`onnxlrp.passes.taylor`) propagates instead of
relevance.

Each emitter ``(ctx, node, g_out) -> {input index: g_in}`` sends back ``g_in = (d out / d in)^T g_out`` evaluated at
the forward values the sweep reads (``ctx.value``), which for the Taylor family are those of the root point's copy of
the forward pass. Re-indexing ops (Reshape, Transpose, Concat, Slice, Pad, Gather, ...) are linear maps whose LRP
emitter already is their transposed map: the registry's emitters serve unchanged (:data:`SHARED`).
"""

from __future__ import annotations

import numpy as np

from .ops import spec
from .ops.helpers import attr, float_mask, path_inputs, unbroadcast
from .ops.pooling import (
    AxesAverage,
    GlobalMax,
    WindowAverage,
    WindowMax,
    check_global,
    check_pool,
    check_reduce_mean,
    reduce_axes,
)

#: Ops whose registry emitter is their vector-Jacobian product (linear re-indexing, the identity at inference).
SHARED = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Transpose", "Concat", "Split",
          "Slice", "Pad", "Gather")

GRADIENTS: dict = {}


def gradient(*op_types: str, check=None):
    def register(fn):
        for op in op_types:
            GRADIENTS[op] = (fn, check)
        return fn
    return register


def times(ctx, g: str, factor: str) -> str:
    return ctx.b.op("Mul", [g, factor], "g")


def const(ctx, value: float, hint: str) -> str:
    return ctx.b.const(np.float32(value), hint)


# ---------------------------------------------------------------- element-wise maps: g * f'(x) at the root point

@gradient("Relu")
def relu(ctx, node, g_out):
    x = ctx.value(node.input[0])
    return {0: times(ctx, g_out[0], float_mask(ctx.b, ctx.b.op("Greater", [x, const(ctx, 0.0, "zero")])))}


@gradient("LeakyRelu")
def leaky_relu(ctx, node, g_out):
    b, x = ctx.b, ctx.value(node.input[0])
    slope = b.op("Where", [b.op("Greater", [x, const(ctx, 0.0, "zero")]), const(ctx, 1.0, "one"),
                           const(ctx, attr(node, "alpha", 0.01), "alpha")], "slope")
    return {0: times(ctx, g_out[0], slope)}


@gradient("Sigmoid")
def sigmoid(ctx, node, g_out):
    b, y = ctx.b, ctx.value(node.output[0])  # s' = s (1 - s)
    return {0: times(ctx, g_out[0], b.op("Mul", [y, b.op("Sub", [const(ctx, 1.0, "one"), y])], "ds"))}


@gradient("Tanh")
def tanh(ctx, node, g_out):
    b, y = ctx.b, ctx.value(node.output[0])  # tanh' = 1 - tanh^2
    return {0: times(ctx, g_out[0], b.op("Sub", [const(ctx, 1.0, "one"), b.op("Mul", [y, y])], "dtanh"))}


@gradient("Softplus")
def softplus(ctx, node, g_out):
    return {0: times(ctx, g_out[0], ctx.b.op("Sigmoid", [ctx.value(node.input[0])], "dsoftplus"))}


@gradient("Exp")
def exp(ctx, node, g_out):
    return {0: times(ctx, g_out[0], ctx.value(node.output[0]))}


@gradient("Neg")
def neg(ctx, node, g_out):
    return {0: ctx.b.op("Neg", [g_out[0]], "g")}


@gradient("Abs")
def abs_(ctx, node, g_out):
    return {0: times(ctx, g_out[0], ctx.b.op("Sign", [ctx.value(node.input[0])], "sign"))}


def constant_bounds(ctx, node):
    if any(n and n not in ctx.constants for n in node.input[1:3]):
        return "a Clip with relevance-carrying bounds has no gradient here"
    return None


@gradient("Clip", check=constant_bounds)
def clip(ctx, node, g_out):
    """1 strictly inside the bounds, 0 outside."""
    b, x = ctx.b, ctx.value(node.input[0])
    inside = None
    for index, compare in ((1, "Greater"), (2, "Less")):
        if len(node.input) > index and node.input[index]:
            bound = b.op("Cast", [node.input[index]], "bound", to=1)
            test = b.op(compare, [x, bound])
            inside = test if inside is None else b.op("And", [inside, test])
    return {0: g_out[0] if inside is None else times(ctx, g_out[0], float_mask(b, inside))}


def constant_exponent(ctx, node):
    return None if node.input[1] in ctx.constants else "a power with a relevance-carrying exponent"


@gradient("Pow", check=constant_exponent)
def power(ctx, node, g_out):
    """``d x^p = p x^(p-1)``."""
    b, x = ctx.b, ctx.value(node.input[0])
    p = float(np.asarray(ctx.constants[node.input[1]]).reshape(-1)[0])
    return {0: times(ctx, g_out[0], b.op("Mul", [const(ctx, p, "p"), b.op("Pow", [x, const(ctx, p - 1, "p1")])]))}


@gradient("Sqrt")
def sqrt(ctx, node, g_out):
    b = ctx.b
    return {0: b.op("Div", [times(ctx, g_out[0], const(ctx, 0.5, "half")), ctx.value(node.output[0])], "g")}


@gradient("Log")
def log(ctx, node, g_out):
    return {0: ctx.b.op("Div", [g_out[0], ctx.value(node.input[0])], "g")}


@gradient("Elu")
def elu(ctx, node, g_out):
    """1 for x > 0, else ``y + alpha``."""
    b, x, y = ctx.b, ctx.value(node.input[0]), ctx.value(node.output[0])
    slope = b.op("Where", [b.op("Greater", [x, const(ctx, 0.0, "zero")]), const(ctx, 1.0, "one"),
                           b.op("Add", [y, const(ctx, attr(node, "alpha", 1.0), "alpha")])], "slope")
    return {0: times(ctx, g_out[0], slope)}


@gradient("Erf")
def erf(ctx, node, g_out):
    """``2 / sqrt(pi) exp(-x^2)``."""
    b, x = ctx.b, ctx.value(node.input[0])
    bell = b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])], "bell")
    return {0: times(ctx, g_out[0], b.op("Mul", [bell, const(ctx, 2 / np.sqrt(np.pi), "two_over_sqrt_pi")]))}


@gradient("Softsign")
def softsign(ctx, node, g_out):
    """``1 / (1 + |x|)^2``."""
    b = ctx.b
    denominator = b.op("Add", [const(ctx, 1.0, "one"), b.op("Abs", [ctx.value(node.input[0])])])
    return {0: b.op("Div", [g_out[0], b.op("Mul", [denominator, denominator])], "g")}


@gradient("HardSigmoid")
def hard_sigmoid(ctx, node, g_out):
    """``alpha`` where ``0 < alpha x + beta < 1``, else 0."""
    b, x = ctx.b, ctx.value(node.input[0])
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    v = b.op("Add", [b.op("Mul", [x, const(ctx, alpha, "alpha")]), const(ctx, beta, "beta")])
    inside = b.op("And", [b.op("Greater", [v, const(ctx, 0.0, "zero")]), b.op("Less", [v, const(ctx, 1.0, "one")])])
    return {0: times(ctx, g_out[0], b.op("Mul", [float_mask(b, inside), const(ctx, alpha, "alpha")]))}


def check_softmax(ctx, node):
    return None if ctx.shapes.get(node.input[0]) else "needs a known rank"


@gradient("Softmax", check=check_softmax)
def softmax(ctx, node, g_out):
    """``y * (g - sum(g * y))`` along the Softmax's axis."""
    b, y = ctx.b, ctx.value(node.output[0])
    axis = attr(node, "axis", -1) % len(ctx.shapes[node.input[0]])
    inner = ctx.reduce("ReduceSum", b.op("Mul", [g_out[0], y]), [axis])
    return {0: b.op("Mul", [y, b.op("Sub", [g_out[0], inner])], "g")}


@gradient("Max", "Min")
def extremum(ctx, node, g_out):
    """Each operand gets ``g`` where it is the extremum, ties sharing it equally."""
    b, y = ctx.b, ctx.value(node.output[0])
    hits = {i: float_mask(b, b.op("Equal", [ctx.value(node.input[i]), y])) for i in range(len(node.input))}
    count = hits[0] if len(hits) == 1 else b.op("Sum", list(hits.values()), "ties")
    share = b.op("Div", [g_out[0], count], "share")
    return {i: unbroadcast(ctx, times(ctx, share, hits[i]), node.input[i], node.output[0])
            for i in path_inputs(ctx, node)}


@gradient("Cast")
def cast(ctx, node, g_out):
    return {0: g_out[0]}


# ---------------------------------------------------------------- arithmetic: sums, products, quotients

@gradient("Add", "Sum", "Sub")
def add(ctx, node, g_out):
    out = {}
    for i in path_inputs(ctx, node):
        g = ctx.b.op("Neg", [g_out[0]], "g") if node.op_type == "Sub" and i == 1 else g_out[0]
        out[i] = unbroadcast(ctx, g, node.input[i], node.output[0])
    return out


@gradient("Mul")
def mul(ctx, node, g_out):
    """``d(a b) = b da + a db``."""
    out = {}
    for i in path_inputs(ctx, node):
        other = node.input[1 - i]
        out[i] = unbroadcast(ctx, times(ctx, g_out[0], ctx.value(other)), node.input[i], node.output[0])
    return out


@gradient("Div")
def div(ctx, node, g_out):
    """``d(a / b) = da / b - (a / b) db / b``."""
    b = ctx.b
    denominator = ctx.value(node.input[1])
    g = b.op("Div", [g_out[0], denominator], "g")
    out = {}
    for i in path_inputs(ctx, node):
        gi = g if i == 0 else b.op("Neg", [times(ctx, g, ctx.value(node.output[0]))], "g")
        out[i] = unbroadcast(ctx, gi, node.input[i], node.output[0])
    return out


# ---------------------------------------------------------------- linear layers, normalizations, pools

def check_layer(ctx, node):
    if node.name not in ctx.layers:
        return "a product of two relevance-carrying tensors (only a constant weight is supported)"
    layer = ctx.layers[node.name]
    return "needs static spatial input dims (give --input-shape)" if layer.kind == "conv" and \
        layer.window is None else None


def check_matmul(ctx, node):
    if node.name in ctx.layers or len(path_inputs(ctx, node)) < 2:
        return check_layer(ctx, node)
    a, b = (ctx.shapes.get(i) for i in node.input)
    if not a or not b or len(a) < 2 or a[:-2] != b[:-2]:
        return "a product of two tensors needs known shapes with the same batch axes"
    return None


def swap_last(ctx, tensor: str, rank: int) -> str:
    return ctx.b.op("Transpose", [tensor], "T", perm=[*range(rank - 2), rank - 1, rank - 2])


@gradient("Conv", "Gemm", check=check_layer)
@gradient("MatMul", check=check_matmul)
def linear(ctx, node, g_out):
    """``W^T g``. A BatchNormalization that the layer folds in (:func:`onnxlrp.passes.linear.fold_batchnorm`) is in
    its weight, and its own gradient is the identity then (:func:`batch_norm`). A MatMul of two relevance-carrying
    tensors with the same batch axes (attention's scores and mixing): ``g b^T`` and ``a^T g``."""
    b = ctx.b
    if node.name not in ctx.layers:
        a_, b_ = node.input
        rank = len(ctx.shapes[a_])
        grads = {0: b.op("MatMul", [g_out[0], swap_last(ctx, ctx.value(b_), rank)], "g_a"),
                 1: b.op("MatMul", [swap_last(ctx, ctx.value(a_), rank), g_out[0]], "g_b")}
        return {i: grads[i] for i in path_inputs(ctx, node)}
    layer = ctx.layers[node.name]
    g = layer.transpose(b, g_out[0], layer.weight, "grad")
    return {0: b.op("Transpose", [g], "g", perm=[1, 0]) if layer.transpose_x else g}


@gradient("BatchNormalization")
def batch_norm(ctx, node, g_out):
    """``g * scale / sqrt(var + eps)`` per channel, or ``g`` when a linear layer folds this node in."""
    if node.output[0] in ctx.layer_output.values():
        return {0: g_out[0]}
    scale, var = (np.asarray(ctx.constants[n], dtype=np.float64) for n in (node.input[1], node.input[4]))
    s = scale / np.sqrt(var + attr(node, "epsilon", 1e-5))
    rank = len(ctx.shapes[node.input[0]])
    return {0: times(ctx, g_out[0], ctx.b.const(s.astype(np.float32).reshape(-1, *[1] * (rank - 2)), "bn_scale"))}


def check_batch_norm(ctx, node):
    if any(n not in ctx.constants for n in node.input[1:5]):
        return "a BatchNormalization with relevance-carrying statistics"
    return None if ctx.shapes.get(node.input[0]) else "needs a known rank"


GRADIENTS["BatchNormalization"] = (batch_norm, check_batch_norm)


@gradient("AveragePool", check=check_pool)
def average_pool(ctx, node, g_out):
    return {0: WindowAverage(ctx, node).spread(ctx.b, g_out[0])}


@gradient("GlobalAveragePool", check=check_global)
def global_average_pool(ctx, node, g_out):
    rank = len(ctx.shapes[node.input[0]])
    return {0: AxesAverage(ctx, node, list(range(2, rank)), keepdims=True).spread(ctx.b, g_out[0])}


@gradient("ReduceMean", check=check_reduce_mean)
def reduce_mean(ctx, node, g_out):
    view = AxesAverage(ctx, node, reduce_axes(ctx, node), keepdims=bool(attr(node, "keepdims", 1)))
    return {0: view.spread(ctx.b, g_out[0])}


def check_reduce_sum(ctx, node):
    if not ctx.shapes.get(node.input[0]):
        return "needs a known rank"
    return "needs constant axes" if reduce_axes(ctx, node) is None else None


@gradient("ReduceSum", check=check_reduce_sum)
def reduce_sum(ctx, node, g_out):
    """``g`` broadcast back over the summed axes."""
    b, g = ctx.b, g_out[0]
    if not attr(node, "keepdims", 1):
        g = b.op("Unsqueeze", [g, b.const(reduce_axes(ctx, node), "axes", np.int64)], "g")
    return {0: b.op("Expand", [g, b.op("Shape", [node.input[0]])], "g")}


@gradient("ReduceMax", check=check_reduce_sum)
def reduce_max(ctx, node, g_out):
    """``g`` to the maxima of each reduced slice, shared equally among ties (the mean of the one-sided
    derivatives)."""
    b, g, y = ctx.b, g_out[0], ctx.value(node.output[0])
    axes = reduce_axes(ctx, node)
    if not attr(node, "keepdims", 1):
        g = b.op("Unsqueeze", [g, b.const(axes, "axes", np.int64)], "g")
        y = b.op("Unsqueeze", [y, b.const(axes, "axes", np.int64)], "y")
    hit = float_mask(b, b.op("Equal", [ctx.value(node.input[0]), y]))
    share = b.op("Div", [hit, ctx.reduce("ReduceSum", hit, axes)], "share")
    return {0: b.op("Mul", [share, g], "g")}


@gradient("MaxPool", check=check_pool)
def max_pool(ctx, node, g_out):
    """To the first maximum of each window (as the autograd of PyTorch and TensorFlow route it)."""
    return {0: WindowMax(ctx, node).route_first(ctx.b, g_out[0])}


@gradient("GlobalMaxPool", check=check_global)
def global_max_pool(ctx, node, g_out):
    return {0: GlobalMax(ctx, node).route_first(ctx.b, g_out[0])}


# ---------------------------------------------------------------- lookup

def gradient_reason(ctx, node) -> str | None:
    """Why the Taylor family cannot differentiate ``node``, or None."""
    if node.op_type in SHARED:
        entry = spec(node)
        return entry.check(ctx, node) if entry.check else None
    if node.op_type not in GRADIENTS or node.domain not in ("", "ai.onnx"):
        return f"the taylor rule has no gradient for {node.op_type}"
    check = GRADIENTS[node.op_type][1]
    return check(ctx, node) if check else None


def gradient_emitter(node):
    return spec(node).emit if node.op_type in SHARED else GRADIENTS[node.op_type][0]
