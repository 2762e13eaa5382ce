"""Recognizers for signal-processing front-ends (see :mod:`onnxlrp.passes.patterns`)."""

from __future__ import annotations

import numpy as np
import onnx

from .patterns import Match, Scope, recognizer, virtual_node


def squared(scope: Scope, tensor: str) -> tuple[str, onnx.NodeProto] | None:
    """``(t, node)`` when ``tensor = t^2`` as ``Pow(t, 2)`` or ``Mul(t, t)``."""
    node = scope.producer.get(tensor)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return node.input[0], node
    exponent = scope.constants.get(node.input[1]) if node.op_type == "Pow" else None
    if exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0:
        return node.input[0], node
    return None


@recognizer
def magnitude(scope: Scope, node: onnx.NodeProto):
    """``Sqrt(a^2 + b^2)`` or ``Sqrt(a^2 + b^2 + eps)`` (eps a non-negative constant): ``Magnitude(a, b) -> y``."""
    if node.op_type != "Sqrt" or node.domain not in ("", "ai.onnx"):
        return None
    inner = scope.producer.get(node.input[0])
    interior = []
    if inner is not None and inner.op_type == "Add" and any(scope.is_constant(i) for i in inner.input):
        constant = next(i for i in inner.input if scope.is_constant(i))
        if np.any(scope.constants[constant] < 0):
            return None
        interior.append(inner)
        inner = scope.producer.get(next(i for i in inner.input if i != constant))
    if inner is None or inner.op_type != "Add" or inner.domain not in ("", "ai.onnx"):
        return None
    terms = [squared(scope, t) for t in inner.input]
    if None in terms or terms[0][0] == terms[1][0]:
        return None
    shape = scope.shapes.get(node.output[0])
    if any(scope.shapes.get(t) != shape for t, _ in terms):
        return None
    interior += [inner] + [n for _, n in terms]
    if not scope.private(interior, node):
        return None
    return Match(virtual_node("Magnitude", [terms[0][0], terms[1][0]], node.output[0],
                              f"{node.name}/magnitude"), [n.name for n in interior] + [node.name])
