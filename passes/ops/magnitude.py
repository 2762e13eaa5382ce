"""The magnitude of a complex pair ``y = sqrt(a^2 + b^2 [+ eps])`` (spectrogram front-ends: the real and imaginary
parts of a Conv-based Fourier transform), as one virtual node ``Magnitude(a, b) -> y`` from
:func:`onnxlrp.passes.patterns.magnitude`.

The relevance of ``y`` is split in proportion to the squares: ``R_a = R a^2 / (a^2 + b^2 + eps)``, ``R_b`` likewise
(a constant ``eps`` under the root absorbs its own share, as a bias does). Every family uses this split: for R-LRP
the squares are the two contributions to the layer (Eq. 8 with the squares as the weighted inputs).
"""

from __future__ import annotations

from onnxlrp.quotients import quotient

from .registry import backward

TINY = 1e-30  # keeps 0 / 0 at 0 where a = b = 0


@backward("Magnitude", fused=True, data_inputs=(0, 1), nonnegative="always")
def magnitude(ctx, node, r_out):
    b = ctx.b
    a, c, y = (ctx.value(n) for n in (*node.input[:2], node.output[0]))
    square = b.op("Mul", [y, y], "y_squared")  # a^2 + b^2 (+ eps)
    ratio = quotient(b, r_out[0], b.op("Add", [square, b.const(TINY, "tiny")], "denominator"), TINY)
    return {0: b.op("Mul", [b.op("Mul", [a, a], "a_squared"), ratio], "R"),
            1: b.op("Mul", [b.op("Mul", [c, c], "b_squared"), ratio], "R")}
