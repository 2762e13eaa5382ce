"""INTERIM (branch ``tf``): normalization layers and gates, the part of issue 16 that transformers need, until the
gated-activation and normalization work lands in main and replaces this module (and
:mod:`onnxlrp.interim_gate_rules`).

- ``LayerNormalization``: the standard deviation is a constant, so the layer is linear in its input; LXT's rule
  (``lxt.explicit.functional.layer_norm``: epsilon on the output, ``y + 1e-6``, through the layer with ``sigma``
  detached): ``R_x = x * (g - mean(g))`` with ``g = w * R / (sigma (y + eps))``, the mean over the normalized axes.
- RMS norm ``x * 1 / sqrt(mean(x^2) + eps)`` (decomposed by every exporter before opset 23, ``RMSNormalization`` from
  opset 23): the identity (``lxt.explicit.functional.rms_norm_identity``, AttnLRP Prop. 3.4); the weight that follows
  is a product with a constant and passes relevance.
- A product of two tensors that are both computed at run time is the virtual node ``Product`` (kind ``gate``): with
  two relevance-carrying factors the planned gate rule splits ``R`` (:mod:`onnxlrp.interim_gate_rules`), with one
  (RoPE's ``q * cos`` when ``cos`` is computed at run time) the other factor is a constant and ``R`` passes.
"""

from __future__ import annotations

from onnxlrp.attention_rules import shifted_divide

from ..patterns import UNARY, WITH_CONSTANT, Match, recognizer, virtual_node
from .helpers import attr, path_inputs, unbroadcast
from .registry import backward

LXT_NORM_EPSILON = 1e-6  # lxt.explicit.functional.layer_norm_grad_fn: relevance_norm = R / (y + 1e-6)
TINY = 1e-30


@backward("LayerNormalization", data_inputs=(0,))
def layer_normalization(ctx, node, r_out):
    """LXT's LayerNorm rule (module docstring); ``sigma = sqrt(mean((x - mean x)^2) + epsilon)`` is recomputed from
    ``x`` with the node's own epsilon."""
    b = ctx.b
    x, y = ctx.value(node.input[0]), ctx.value(node.output[0])
    rank = len(ctx.shapes[node.input[0]])
    axes = list(range(attr(node, "axis", -1) % rank, rank))
    centred = b.op("Sub", [x, ctx.reduce("ReduceMean", x, axes)], "centred")
    variance = ctx.reduce("ReduceMean", b.op("Mul", [centred, centred], "square"), axes)
    sigma = b.op("Sqrt", [b.op("Add", [variance, b.const(attr(node, "epsilon", 1e-5), "ln_eps")], "var_eps")], "sigma")
    sigma = b.op("Max", [sigma, b.const(TINY, "tiny")], "sigma")
    g = b.op("Div", [shifted_divide(b, r_out[0], y, LXT_NORM_EPSILON), sigma], "g")
    if len(node.input) > 1 and node.input[1]:
        g = b.op("Mul", [g, ctx.value(node.input[1])], "g")
    centred_g = b.op("Sub", [g, ctx.reduce("ReduceMean", g, axes)], "g_centred")
    return {0: b.op("Mul", [x, centred_g], "R")}


def identity(ctx, node, r_out):
    return {0: r_out[0]}


backward("RMSNormalization", data_inputs=(0,))(identity)
backward("RMSNormCore", fused=True, data_inputs=(0,), zero_preserving=True)(identity)


@backward("Product", fused=True, kind="gate", nonnegative="all", zero_preserving=True)
def product(ctx, node, r_out):
    """``a * b``: the planned gate rule on the relevance-carrying factors (one factor: it gets ``R``)."""
    live = path_inputs(ctx, node)
    rule = ctx.plan.get(node.name)
    shares = rule.gate(ctx, node, r_out[0], live) if rule is not None and len(live) > 1 else {live[0]: r_out[0]}
    return {i: unbroadcast(ctx, r, node.input[i], node.output[0]) for i, r in shares.items()}


# ---------------------------------------------------------------- recognizers

ELEMENTWISE = UNARY | WITH_CONSTANT | {"Add", "Sub", "Mul", "Div", "Pow"}


def elementwise_cone(scope, top) -> tuple[set[str], list] | None:
    """The tensors that ``top``'s output is an element-wise function of (walking back through element-wise ops, with
    any number of run-time operands, up to the first tensor that has several readers: the ``x`` of ``x * f(x)``),
    and the nodes walked: ``(leaves, interior)``."""
    leaves, interior, frontier = set(), [], [i for i in top.input if i and not scope.is_constant(i)]
    seen = set()
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        node = scope.producer.get(tensor)
        data = [i for i in node.input if i and not scope.is_constant(i)] if node is not None else []
        if node is None or len(scope.readers.get(tensor, [])) > 1 or node.domain not in ("", "ai.onnx") or \
                node.op_type not in ELEMENTWISE or not data or (node.op_type in UNARY and data != [node.input[0]]) or \
                len(interior) > 32:
            leaves.add(tensor)
            continue
        interior.append(node)
        frontier.extend(data)
    return leaves, interior


@recognizer
def elementwise_function(scope, node):
    """``x * f(x)`` where ``f`` is any composition of element-wise ops of ``x`` and constants (GELU's tanh form
    ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))``, SiLU with dynamic dims, which the static-shape recognizer of
    :mod:`onnxlrp.passes.patterns` leaves): one ``ElementwiseActivation(x)`` with the identity rule."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2 or \
            node.input[0] == node.input[1] or any(scope.is_constant(i) for i in node.input):
        return None
    leaves, interior = elementwise_cone(scope, node)
    if len(leaves) != 1 or not interior:
        return None
    (source,) = leaves
    shape, source_shape = scope.shapes.get(node.output[0]), scope.shapes.get(source)
    if shape is None or source_shape is None or len(shape) != len(source_shape) or \
            any(a is not None and b is not None and a != b for a, b in zip(shape, source_shape, strict=True)):
        return None
    if not scope.private(interior, node):
        return None
    return Match(virtual_node("ElementwiseActivation", [source], node.output[0], f"{node.name}/activation"),
                 [n.name for n in interior] + [node.name])


def _through(scope, tensor: str, ops: tuple[str, ...]):
    node = scope.producer.get(tensor)
    return node if node is not None and node.op_type in ops else None


def rms_source(scope, r: str) -> tuple[str, list] | None:
    """``(x, interior nodes)`` when ``r = 1 / sqrt(mean(x^2, last axis) + eps)`` (Reciprocal or ``1 / .``), else
    None; with ``r`` the denominator itself (``sqrt(...)``) when it is read by a Div."""
    chain = []
    node = scope.producer.get(r)
    if node is not None and node.op_type == "Reciprocal":
        chain.append(node)
        node = scope.producer.get(node.input[0])
    elif node is not None and node.op_type == "Div" and scope.is_constant(node.input[0]):
        chain.append(node)
        node = scope.producer.get(node.input[1])
    if node is None or node.op_type != "Sqrt":
        return None
    chain.append(node)
    node = scope.producer.get(node.input[0])
    if node is None or node.op_type != "Add" or not any(scope.is_constant(i) for i in node.input):
        return None
    chain.append(node)
    mean = _through(scope, next(i for i in node.input if not scope.is_constant(i)), ("ReduceMean",))
    if mean is None:
        return None
    chain.append(mean)
    square = scope.producer.get(mean.input[0])
    if square is None:
        return None
    if square.op_type == "Pow" and scope.is_constant(square.input[1]) and \
            float(scope.constants[square.input[1]].reshape(-1)[0]) == 2.0:
        source = square.input[0]
    elif square.op_type == "Mul" and square.input[0] == square.input[1]:
        source = square.input[0]
    else:
        return None
    chain.append(square)
    return source, chain


@recognizer
def rms_norm(scope, node):
    """``x * rsqrt(mean(x^2) + eps)`` or ``x / sqrt(mean(x^2) + eps)``: one ``RMSNormCore(x)`` (identity rule)."""
    if node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    pairs = [(node.input[0], node.input[1])] if node.op_type == "Div" else \
        [(node.input[0], node.input[1]), (node.input[1], node.input[0])]
    for x, r in pairs:
        found = rms_source(scope, r)
        if node.op_type == "Div" and found is not None and found[1][0].op_type in ("Reciprocal", "Div"):
            found = None  # x / (1 / sqrt(...)) is not a normalization
        if found is not None and found[0] == x and scope.private(found[1], node):
            return Match(virtual_node("RMSNormCore", [x], node.output[0], f"{node.name}/rms_norm"),
                         [n.name for n in found[1]] + [node.name])
    return None


@recognizer
def run_time_product(scope, node):
    """``a * b`` with both factors computed at run time: ``Product(a, b)`` (kind ``gate``)."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2 or \
            node.input[0] == node.input[1] or any(scope.is_constant(name) for name in node.input):
        return None  # a square x * x is no gate
    return Match(virtual_node("Product", list(node.input), node.output[0], node.name), [node.name])
