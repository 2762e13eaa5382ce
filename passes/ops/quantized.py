"""Quantization nodes: QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear pass relevance (the rules see the
dequantized values, so rounding to the integer grid is an activation, like a Relu); the facts of the quantized
operator nodes that :mod:`onnxlrp.passes.quantized` could not rewrite, with the reason.

An integer tensor's facts are those of its dequantized value: ``DequantizeLinear(QuantizeLinear(x)) >= 0`` where
``x >= 0``.
"""

from __future__ import annotations

from .elementwise import pass_through
from .registry import backward, declare

backward("QuantizeLinear", "DequantizeLinear", data_inputs=(0,), nonnegative="first",
         zero_preserving=True)(pass_through)
backward("DynamicQuantizeLinear", data_inputs=(0,), data_outputs=(0,), nonnegative="first",
         zero_preserving=True)(pass_through)


def not_rewritten(ctx, node):
    return ctx.quantized.unsupported.get(node.name, "a quantized node the relevance pass does not rewrite")


declare("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", data_inputs=(0,), check=not_rewritten)
declare("QGemm", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSigmoid",
        data_inputs=(0,), domain="com.microsoft", check=not_rewritten)
declare("QLinearAdd", "QLinearMul", data_inputs=(0, 3), domain="com.microsoft", check=not_rewritten)
declare("QLinearConcat", domain="com.microsoft", check=not_rewritten)
