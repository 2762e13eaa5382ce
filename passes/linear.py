"""Linear layers as the rules see them, extracted from the canonical graph: a Conv/Gemm/MatMul with a constant
weight, the constant bias Add after a MatMul, and a BatchNormalization after either folded in."""

from __future__ import annotations

import numpy as np
import onnx

from onnxlrp.layers import Linear, Window
from onnxlrp.weights import Weight

from .ops.helpers import attr, explicit_pads


def linear_layer(ctx, node: onnx.NodeProto) -> Linear | None:
    """Wrap a Conv/Gemm/MatMul with constant weights as a :class:`Linear`, with the constant bias Add after a
    MatMul and a BatchNormalization after either folded in (``z`` is then that node's output), or None."""
    consts, shapes = ctx.constants, ctx.shapes
    x = node.input[0]
    if node.op_type == "Conv" and node.input[1] in consts:
        w = model_weight(ctx, node.input[1])
        bias = consts[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] in consts else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            return None
        layer = Linear(node.name, "conv", x, node.output[0], w, bias, shapes.get(x), conv_window(ctx, node, w),
                       group=attr(node, "group", 1))
    elif node.op_type == "Gemm" and node.input[1] in consts:
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        w = model_weight(ctx, node.input[1])
        w = alpha * (w.T if attr(node, "transB", 0) else w)  # [in, out]
        bias = None
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in consts:
                return None
            bias = np.broadcast_to(consts[node.input[2]].astype(np.float64).reshape(-1) * beta, (w.shape[1],))
        layer = Linear(node.name, "dense", x, node.output[0], w, bias, shapes.get(x),
                       transpose_x=bool(attr(node, "transA", 0)))
    elif node.op_type == "MatMul" and node.input[1] in consts and consts[node.input[1]].ndim == 2:
        w = model_weight(ctx, node.input[1])
        layer = Linear(node.name, "dense", x, node.output[0], w, None, shapes.get(x))
        add = sole_reader(ctx, layer.z)
        other = add.input[1] if add is not None and add.op_type == "Add" and add.input[0] == layer.z else \
            add.input[0] if add is not None and add.op_type == "Add" else None
        if other in consts and consts[other].size == w.shape[1] and consts[other].ndim <= 2:
            layer.bias, layer.z = consts[other].astype(np.float64).reshape(-1), add.output[0]
    else:
        return None
    fold_batchnorm(ctx, layer)
    return layer


def model_weight(ctx, name: str) -> Weight:
    """The initializer ``name`` as a :class:`Weight`. A graph input's default (an initializer a caller may override)
    is not read by the relevance graph: onnxruntime does not fold ops on it, so the rules get a copy of the default
    (the value the compile-time analysis saw)."""
    return Weight.initializer(name, ctx.constants[name], readable=name not in {i.name for i in ctx.graph.input})


def sole_reader(ctx, tensor: str) -> onnx.NodeProto | None:
    """The only node reading ``tensor``, when it is not also a graph output."""
    readers = ctx.view.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in {o.name for o in ctx.graph.output}:
        return None
    return readers[0][0]


def fold_batchnorm(ctx, layer: Linear) -> None:
    """``BN(W x + b) = (s W) x + s (b - mean) + beta`` with ``s = scale / sqrt(var + eps)``, per output channel:
    the rule sees the folded layer and the BatchNormalization output as ``z``. The forward graph is untouched; the
    folded weight is ``W`` times the per-channel constant ``s`` (a Mul that onnxruntime folds, see
    :mod:`onnxlrp.weights`)."""
    bn = sole_reader(ctx, layer.z)
    if bn is None or bn.op_type != "BatchNormalization" or any(n not in ctx.constants for n in bn.input[1:5]):
        return
    scale, beta, mean, var = (ctx.constants[n].astype(np.float64) for n in bn.input[1:5])
    s = scale / np.sqrt(var + attr(bn, "epsilon", 1e-5))
    bias = np.zeros(len(s)) if layer.bias is None else layer.bias
    if layer.kind == "conv":
        layer.weight = layer.weight * s.reshape(-1, *([1] * (layer.weight.ndim - 1)))
    else:
        layer.weight = layer.weight * s[None, :]
    layer.bias = (bias - mean) * s + beta
    layer.z = bn.output[0]


def conv_window(ctx, node: onnx.NodeProto, w: Weight) -> Window | None:
    x_shape, y_shape = ctx.shapes.get(node.input[0]), ctx.shapes.get(node.output[0])
    if not x_shape or not y_shape or any(d is None for d in x_shape[2:] + y_shape[2:]):
        return None
    kernel = list(w.shape[2:])
    r = len(kernel)
    strides = list(attr(node, "strides", [1] * r))
    dilations = list(attr(node, "dilations", [1] * r))
    pads = explicit_pads(attr(node, "auto_pad", "NOTSET"), attr(node, "pads"), x_shape[2:], kernel, strides,
                         dilations)
    return Window(list(x_shape[2:]), list(y_shape[2:]), kernel, strides, pads, dilations)
