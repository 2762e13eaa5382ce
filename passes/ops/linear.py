"""Linear layers (Conv, Gemm, MatMul with a constant weight): the rule the family planned for the layer."""

from __future__ import annotations

from .registry import backward


def check_linear(ctx, node):
    if node.name not in ctx.layers:
        return "only supported with a constant weight (after constant folding)"
    layer = ctx.layers[node.name]
    if layer.kind == "conv" and layer.window is None:
        return "needs static spatial input dims (give --input-shape)"
    return None


def linear(ctx, node, r_out):
    """The planned rule on the layer as :class:`onnxlrp.layers.Linear` (classic rules; R-LRP: Eq. 8 / Eq. 12),
    between the family's per-layer steps."""
    b = ctx.b
    layer = ctx.layers[node.name]
    r, scale = ctx.family.before_layer(ctx, node, r_out[0], layer.x, layer.growth(layer.weight, "W"))
    rule = ctx.rule(node)
    r_in = rule.linear(ctx, layer, r) if scale is None else rule.relevance(b, layer, r, scale=scale)
    r_in = ctx.family.after_layer(ctx, r_in, r_out[0])
    if layer.transpose_x:  # Gemm transA=1 reads x^T: the layer sees x^T (batch first), R goes back to x's layout
        r_in = b.op("Transpose", [r_in], "R", perm=[1, 0])
    return {0: r_in}


backward("Conv", data_inputs=(0,), kind="linear", fusable_producer=True, check=check_linear)(linear)
backward("Gemm", "MatMul", kind="linear", check=check_linear)(linear)
