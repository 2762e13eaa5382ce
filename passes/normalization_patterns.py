"""Recognizers for normalizations that exporters decompose into primitive ops (see :mod:`onnxlrp.passes.patterns`).

Each match becomes one virtual ``Normalization`` node (:mod:`onnxlrp.passes.ops.normalization` gives its rule) with
the inputs ``[x, statistic, weight]`` and the attributes ``axes`` (the normalized axes of ``x``), ``centered``
(``x - mean(x)`` is normalized, not ``x``: LayerNorm rather than RMS norm), ``inverse`` (the statistic is ``k / sigma``
rather than ``sigma``) and, for a normalization op inside a match, ``epsilon`` and ``groups`` (an empty statistic:
the rule recomputes ``sigma`` from ``x``). ``weight`` is a constant that multiplies the normalized value, or empty.

The forms the exporters write, ``m = ReduceMean(x)``, ``d = x - m`` (or ``d = x`` for RMS norm),
``v = ReduceMean(d^2)`` (``Pow(d, 2)`` or ``Mul(d, d)``, with ``d`` possibly computed twice):

- torch TorchScript (opset < 17), paddle2onnx, ONNX's own function body: ``Div(d, Sqrt(v + eps)) [* w] [+ b]``, or
  ``d * Reciprocal(Sqrt(v + eps))`` / ``d * Pow(v + eps, -0.5)`` (torch RMSNorm, LLaMA);
- TensorFlow's ``tf.nn.batch_normalization`` (Keras LayerNormalization/GroupNormalization through tf2onnx):
  ``x * s + (b - m * s)`` with ``s = w * Reciprocal(Sqrt(v + eps))``, written ``Add(Mul(x, s), Add(Mul(Neg(m), s),
  b))`` or ``Add(Mul(x, s), Sub(b, Mul(m, s)))``;
- torch's GroupNorm export (TorchScript, opset < 18): ``Reshape(InstanceNormalization(Reshape(x, [N, G, -1])),
  shape(x)) * w + b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .ops.helpers import attr
from .ops.pooling import reduce_axes
from .patterns import Scope, match, recognizer, virtual_node

# ops between the variance and the statistic a normalization divides by (or multiplies with): sqrt, eps, 1/s, w/s
STATISTIC_OPS = {"Sqrt", "Reciprocal", "Add", "Mul", "Div", "Pow", "Cast", "Identity"}


def constant_operand(scope: Scope, node: onnx.NodeProto) -> tuple[str, str] | None:
    """``(data operand, constant operand)`` of a binary node with exactly one constant operand."""
    if len(node.input) != 2:
        return None
    a, b = node.input
    if scope.is_constant(a) != scope.is_constant(b):
        return (b, a) if scope.is_constant(a) else (a, b)
    return None


def scalar(scope: Scope, name: str) -> float | None:
    value = scope.constants.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def mean_over(scope: Scope, tensor: str) -> tuple[onnx.NodeProto, str, list[int]] | None:
    """``(node, input, axes)`` when ``tensor`` is a ReduceMean (keepdims) over constant axes, not the batch axis."""
    node = scope.producer.get(tensor)
    if node is None or node.op_type != "ReduceMean" or not attr(node, "keepdims", 1) or not scope.shapes.get(
            node.input[0]):
        return None
    axes = reduce_axes(scope, node)
    if axes is None or 0 in axes:
        return None
    return node, node.input[0], axes


def statistic(scope: Scope, tensor: str) -> tuple[list[onnx.NodeProto], onnx.NodeProto, list[int]] | None:
    """The element-wise chain (Sqrt, ``+ eps``, Reciprocal, ``1 / s``, ``Pow(s, -0.5)``, ``* w``) from a variance
    ReduceMean to ``tensor``: ``(chain nodes, the ReduceMean, its axes)``."""
    chain = []
    while True:
        found = mean_over(scope, tensor)
        if found is not None:
            return chain, found[0], found[2]
        node = scope.producer.get(tensor)
        if node is None or node.op_type not in STATISTIC_OPS or len(chain) > 8:
            return None
        operands = scope.data_inputs(node)
        if len(operands) != 1:
            return None
        chain.append(node)
        tensor = operands[0]


def squared(scope: Scope, tensor: str) -> str | None:
    """``u`` when ``tensor`` is ``Pow(u, 2)`` or ``Mul(u, u)``."""
    node = scope.producer.get(tensor)
    if node is None:
        return None
    if node.op_type == "Pow" and scalar(scope, node.input[1]) == 2.0 and not scope.is_constant(node.input[0]):
        return node.input[0]
    if node.op_type == "Mul" and node.input[0] == node.input[1]:
        return node.input[0]
    return None


@dataclass
class Statistics:
    """How one normalization computes ``sigma`` (or ``k / sigma``) from ``x``: the nodes, whether ``x`` is centered
    (and the mean's tensor), and the normalized axes."""

    x: str
    centered: bool
    nodes: list[onnx.NodeProto]
    axes: list[int]
    mean: str | None


def statistics_of(scope: Scope, stat: str, numerator: str) -> Statistics | None:
    """The statistics behind ``stat`` when ``numerator`` is what it normalizes: ``x - ReduceMean(x)`` (centered) or
    ``x`` itself (RMS norm), with the variance over the same axes as the mean."""
    found = statistic(scope, stat)
    if found is None:
        return None
    chain, variance, axes = found
    u = squared(scope, variance.input[0])
    if u is None:
        return None
    nodes = chain + [variance, scope.producer[variance.input[0]]]
    centered = centered_operands(scope, numerator)
    if centered is not None:
        x, mean_node = centered
        if u != numerator:
            duplicate = centered_operands(scope, u)
            if duplicate is None or duplicate[0] != x or duplicate[1] is not mean_node:
                return None
            nodes.append(scope.producer[u])
        if reduce_axes(scope, mean_node) != axes:
            return None
        return Statistics(x, True, nodes + [mean_node, scope.producer[numerator]], axes, mean_node.output[0])
    if u != numerator:
        return None
    return Statistics(numerator, False, nodes, axes, None)


def centered_operands(scope: Scope, tensor: str) -> tuple[str, onnx.NodeProto] | None:
    """``(x, the mean node)`` when ``tensor`` is ``Sub(x, ReduceMean(x))``."""
    node = scope.producer.get(tensor)
    if node is None or node.op_type != "Sub" or len(node.input) != 2:
        return None
    found = mean_over(scope, node.input[1])
    if found is None or found[1] != node.input[0]:
        return None
    return node.input[0], found[0]


def normalization_match(scope: Scope, top: onnx.NodeProto, stats: Statistics, stat: str, weight: str, inverse: bool,
                        nodes: list[onnx.NodeProto]):
    """The virtual node when the subgraph is private and ``x`` has the output's shape."""
    covered = {n.name: n for n in stats.nodes + nodes}
    covered.pop(top.name, None)
    interior = sorted(covered.values(), key=lambda n: scope.position[n.name])
    shape = scope.shapes.get(stats.x)
    if shape is None or shape != scope.shapes.get(top.output[0]) or not scope.private(interior, top):
        return None
    rank = len(shape)
    node = virtual_node("Normalization", [stats.x, stat, weight], top.output[0], f"{top.name}/normalization",
                        axes=[a % rank for a in stats.axes], centered=int(stats.centered), inverse=int(inverse))
    return match(node, interior + [top])


def affine_tail(scope: Scope, node: onnx.NodeProto) -> tuple[onnx.NodeProto, str, list[onnx.NodeProto]] | None:
    """Peel ``[+ b]`` and ``[* w]`` (constant operands) off ``node``: ``(the core node, w or "", peeled nodes)``."""
    peeled, weight = [], ""
    for op in ("Add", "Mul"):
        operands = constant_operand(scope, node) if node.op_type == op else None
        if operands is None:
            continue
        peeled.append(node)
        if op == "Mul":
            weight = operands[1]
        node = scope.producer.get(operands[0])
        if node is None:
            return None
    return node, weight, peeled


@recognizer
def divided_normalization(scope: Scope, node: onnx.NodeProto):
    """``d / sigma`` or ``d * (k / sigma)`` (``d = x - mean(x)``, or ``x``), then optionally ``* w`` and ``+ b``."""
    if node.op_type not in ("Add", "Mul", "Div"):
        return None
    tail = affine_tail(scope, node)
    if tail is None:
        return None
    core, weight, peeled = tail
    operands = scope.data_inputs(core)
    if core.op_type not in ("Div", "Mul") or len(operands) != 2 or len(core.input) != 2:
        return None
    orders = [(0, 1)] if core.op_type == "Div" else [(0, 1), (1, 0)]
    for n, s in orders:
        stats = statistics_of(scope, core.input[s], core.input[n])
        if stats is not None:
            return normalization_match(scope, node, stats, core.input[s], weight, core.op_type == "Mul",
                                       peeled + [core])
    return None


@recognizer
def moments_normalization(scope: Scope, node: onnx.NodeProto):
    """TensorFlow's ``x * s + (b - m * s)``: ``Add(Mul(x, s), c)`` with ``c`` one of ``Add(Mul(Neg(m), s), b)``,
    ``Sub(b, Mul(m, s))``, ``Mul(Neg(m), s)`` or ``Neg(Mul(m, s))`` (either operand order); ``s`` is ``k / sigma``
    of ``d = x - m``."""
    if node.op_type != "Add" or len(scope.data_inputs(node)) != 2:
        return None
    for p, c in ((0, 1), (1, 0)):
        scaled = scope.producer.get(node.input[p])
        if scaled is None or scaled.op_type != "Mul" or len(scope.data_inputs(scaled)) != 2:
            continue
        for xi in (0, 1):
            x, s = scaled.input[xi], scaled.input[1 - xi]
            shift = shift_nodes(scope, node.input[c], s)
            if shift is None:
                continue
            nodes, mean = shift
            numerator = centered_numerator(scope, x, mean)
            stats = statistics_of(scope, s, numerator) if numerator else None
            if stats is None or stats.x != x or stats.mean != mean:
                continue
            return normalization_match(scope, node, stats, s, "", True, nodes + [scaled])
    return None


def centered_numerator(scope: Scope, x: str, mean: str) -> str | None:
    """The output of a node ``Sub(x, mean)`` (the one the variance squares), if any."""
    for reader in scope.readers.get(x, []):
        if reader.op_type == "Sub" and list(reader.input) == [x, mean]:
            return reader.output[0]
    return None


def shift_nodes(scope: Scope, tensor: str, s: str) -> tuple[list[onnx.NodeProto], str] | None:
    """The nodes that compute ``tensor = -m * s [+ b]``, and ``m`` (see :func:`moments_normalization`)."""
    node = scope.producer.get(tensor)
    if node is None:
        return None
    if node.op_type in ("Add", "Sub") and constant_operand(scope, node) is not None:
        inner = constant_operand(scope, node)[0]
        product = scope.producer.get(inner)
        negated = node.op_type == "Sub" and node.input[1] == inner  # b - m s
        if node.op_type == "Sub" and not negated:
            return None
        found = product_with(scope, product, s, negated) if product is not None else None
        return None if found is None else ([node] + found[0], found[1])
    if node.op_type == "Neg":
        product = scope.producer.get(node.input[0])
        found = product_with(scope, product, s, True) if product is not None else None
        return None if found is None else ([node] + found[0], found[1])
    return product_with(scope, node, s, False)


def product_with(scope: Scope, node: onnx.NodeProto, s: str, negated: bool):
    """``([nodes], m)`` for ``Mul(m, s)`` (``negated``: the minus sign is outside) or ``Mul(Neg(m), s)``."""
    if node.op_type != "Mul" or s not in node.input or len(node.input) != 2:
        return None
    other = node.input[1] if node.input[0] == s else node.input[0]
    if negated:
        return ([node], other) if mean_over(scope, other) else None
    neg = scope.producer.get(other)
    if neg is None or neg.op_type != "Neg" or not mean_over(scope, neg.input[0]):
        return None
    return [node, neg], neg.input[0]


@recognizer
def instance_normalized_groups(scope: Scope, node: onnx.NodeProto):
    """torch's GroupNorm export: ``Reshape(InstanceNormalization(Reshape(x, [N, G, -1])), shape(x)) [* w] [+ b]``,
    one group normalization of ``x`` with the per-channel affine map after it."""
    if node.op_type not in ("Add", "Mul"):
        return None
    tail = affine_tail(scope, node)
    if tail is None or not tail[2]:
        return None
    back, weight, peeled = tail
    if back.op_type != "Reshape":
        return None
    norm = scope.producer.get(back.input[0])
    if norm is None or norm.op_type != "InstanceNormalization" or any(not scope.is_constant(i) for i in norm.input[1:]):
        return None
    grouped = scope.producer.get(norm.input[0])
    if grouped is None or grouped.op_type != "Reshape":
        return None
    x = grouped.input[0]
    shape, grouped_shape = scope.shapes.get(x), scope.shapes.get(grouped.output[0])
    if not shape or not grouped_shape or len(grouped_shape) != 3 or None in shape[1:] or grouped_shape[1] is None:
        return None
    groups, channels = grouped_shape[1], shape[1]
    if channels % groups or scope.shapes.get(node.output[0]) != shape:
        return None
    scale = scope.constants[norm.input[1]].astype(np.float64).reshape(-1)
    per_channel = np.repeat(scale, channels // groups).reshape(channels, *[1] * (len(shape) - 2))
    if weight:
        per_channel = per_channel * scope.constants[weight].astype(np.float64)
    if per_channel.shape != (channels, *[1] * (len(shape) - 2)) and per_channel.size != channels:
        return None
    interior = [grouped, norm, back] + peeled[::-1][:-1]
    if not scope.private(interior, node):
        return None
    name = f"{node.name}/group_weight"
    fused = virtual_node("Normalization", [x, "", name], node.output[0], f"{node.name}/normalization",
                         axes=[2], centered=1, inverse=0, groups=groups, epsilon=float(attr(norm, "epsilon", 1e-5)))
    found = match(fused, interior + [node])
    found.constants[name] = per_channel.reshape(channels, *[1] * (len(shape) - 2))
    return found
