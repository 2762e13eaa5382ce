"""Normalizations: LayerNormalization, GroupNormalization, InstanceNormalization, RMSNormalization and the virtual
``Normalization`` node of their decomposed forms (:mod:`onnxlrp.passes.normalization_patterns`).

Each is ``y = w * (x - mean(x)) / sigma + b`` over some axes of ``x`` (per group of channels for GroupNormalization;
``y = w * x / sigma`` for RMS norm, where ``sigma = sqrt(mean(x^2) + eps)``). With ``sigma`` held constant (AttnLRP's
and LXT's linearization, as LXT's ``layer_norm`` detaches the standard deviation) the layer is the linear map ``y = A x
+ b`` with ``A = diag(w / sigma) (I - 1 1^T / n)`` (``A = diag(w / sigma)`` for RMS norm). Its transpose applied to a
cofactor ``g`` is ``A^T g = h - mean(h)`` with ``h = w * g / sigma`` (``h`` alone for RMS norm), which
:class:`NormView` emits; the rule the family planned for the node (:mod:`onnxlrp.node_rules`: the epsilon rule on that
map, or identity; R-LRP: Eq. 6-7) chooses ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxlrp.quotients import product

from .helpers import attr
from .registry import backward


@dataclass
class NormView:
    """One normalization node as its rule sees it.

    ``x``, ``y``: input and output (float32). ``axes``: the normalized axes of ``x`` after the optional reshape
    ``grouped`` (GroupNormalization's ``[N, G, -1]``: axes ``[2]``). ``weight``: the constant ``w`` broadcastable
    against ``x``, or None. ``statistic``: a forward tensor holding ``sigma`` (``inverse`` False) or ``k / sigma``
    (``inverse`` True; ``k`` is then already in it and ``weight`` is None), or None: ``sigma`` is recomputed from
    ``x`` with ``epsilon``."""

    ctx: object
    x: str
    y: str
    axes: list[int]
    centered: bool
    epsilon: float
    weight: np.ndarray | None = None
    grouped: list[int] | None = None
    statistic: str | None = None
    inverse: bool = False

    def group(self, t: str) -> str:
        b = self.ctx.b
        return t if self.grouped is None else b.op("Reshape", [t, b.const(self.grouped, "groups", np.int64)], "grouped")

    def ungroup(self, t: str) -> str:
        b = self.ctx.b
        return t if self.grouped is None else b.op("Reshape", [t, b.op("Shape", [self.x])], "ungrouped")

    def mean(self, t: str) -> str:
        return self.ctx.reduce("ReduceMean", t, self.axes, hint="mean")

    def inverse_sigma(self) -> str:
        """``1 / sigma`` (times ``k`` for an inverse statistic), shaped like the grouped ``x`` with the normalized axes
        kept as 1."""
        b = self.ctx.b
        if self.statistic is not None:
            stat = self.ctx.value(self.statistic)
            return stat if self.inverse else b.op("Reciprocal", [stat], "inv_sigma")
        x = self.group(self.x)
        d = b.op("Sub", [x, self.mean(x)], "centered") if self.centered else x
        variance = self.mean(b.op("Mul", [d, d], "squared"))
        return b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [variance, b.const(self.epsilon, "eps")])])],
                    "inv_sigma")

    def transposed(self, g: str) -> str:
        """``A^T g = h - mean(h)``, ``h = w * g / sigma`` (``h`` for RMS norm), shaped like ``x``."""
        b = self.ctx.b
        if self.weight is not None:
            g = b.op("Mul", [g, b.const(self.weight, "norm_weight")], "wg")
        h = b.op("Mul", [self.group(g), self.inverse_sigma()], "h")
        if self.centered:
            h = b.op("Sub", [h, self.mean(h)], "h_centered")
        return self.ungroup(h)

    def input_relevance(self, g: str) -> str:
        """``x * A^T g``."""
        return product(self.ctx.b, self.x, self.transposed(g))


def constant_weight(ctx, name: str, shape: list[int], channel_axis: int | None) -> np.ndarray | None:
    """A scale input as an array broadcastable against ``x`` of ``shape``: as is, or (``channel_axis``) one value
    per channel along that axis."""
    if not name:
        return None
    w = ctx.constants[name].astype(np.float64)
    if channel_axis is not None:
        w = w.reshape(-1, *[1] * (len(shape) - channel_axis - 1))
    return w


def check_norm(ctx, node):
    shape = ctx.shapes.get(node.input[0])
    if not shape or (node.op_type == "GroupNormalization" and shape[1] is None):
        return "needs a known input rank (and channel count for GroupNormalization)"
    if any(i and i not in ctx.constants for i in node.input[1:]):
        return "needs constant scale and bias"
    return None


def norm_view(ctx, node) -> NormView:
    """The :class:`NormView` of a normalization op or of a virtual ``Normalization`` node."""
    x, y = ctx.value(node.input[0]), ctx.value(node.output[0])
    shape = ctx.shapes[node.input[0]]
    rank = len(shape)
    epsilon = attr(node, "epsilon", 1e-5)
    scale = node.input[1] if len(node.input) > 1 else ""
    if node.op_type in ("LayerNormalization", "RMSNormalization"):
        axis = attr(node, "axis", -1) % rank
        return NormView(ctx, x, y, list(range(axis, rank)), node.op_type == "LayerNormalization", epsilon,
                        constant_weight(ctx, scale, shape, None))
    if node.op_type == "InstanceNormalization":
        return NormView(ctx, x, y, list(range(2, rank)), True, epsilon, constant_weight(ctx, scale, shape, 1))
    if node.op_type == "GroupNormalization":
        groups, channels = attr(node, "num_groups"), shape[1]
        w = ctx.constants[scale].astype(np.float64).reshape(-1)
        if w.size == groups and groups != channels:  # opset 18: one scale per group
            w = np.repeat(w, channels // groups)
        w = w.reshape(-1, *[1] * (rank - 2))
        return NormView(ctx, x, y, [2], True, epsilon, w, grouped=[0, groups, -1])
    statistic, weight = node.input[1], node.input[2]  # the virtual Normalization node
    groups = attr(node, "groups", 0)
    return NormView(ctx, x, y, list(attr(node, "axes")), bool(attr(node, "centered")), epsilon,
                    ctx.constants[weight].astype(np.float64) if weight else None,
                    grouped=[0, groups, -1] if groups else None, statistic=statistic or None,
                    inverse=bool(attr(node, "inverse")))


def normalization(ctx, node, r_out):
    """The planned rule's ``normalization`` (classic: the epsilon rule on the linearized layer, or identity; R-LRP:
    Eq. 6-7 on it), then the family's per-layer step."""
    return {0: ctx.family.after_layer(ctx, ctx.rule(node).normalization(ctx, norm_view(ctx, node), r_out[0]),
                                      r_out[0])}


backward("LayerNormalization", "InstanceNormalization", "GroupNormalization", "RMSNormalization", data_inputs=(0,),
         kind="normalization", check=check_norm)(normalization)
backward("Normalization", fused=True, data_inputs=(0,), kind="normalization")(normalization)
