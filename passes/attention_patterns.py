"""Patterns of attention: the matrix product of two activations.

A MatMul whose operands are both computed at run time (``Q K^T``, ``P V``, in every exporter's form: the key
transposed by its own Transpose, scaled on both sides by ``sqrt(scale)``, or already laid out as ``K^T`` by the
projection's reshapes) is the virtual node ``ActivationMatMul`` (kind ``matmul``, AttnLRP Prop. 3.3), so that the
op type MatMul keeps meaning a linear layer with a constant weight.
"""

from __future__ import annotations

from .patterns import match, recognizer, virtual_node


@recognizer
def activation_matmul(scope, node):
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    if any(scope.is_constant(name) for name in node.input):
        return None
    return match(virtual_node("ActivationMatMul", list(node.input), node.output[0], node.name), [node])
