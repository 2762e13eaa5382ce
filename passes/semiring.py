"""Semiring LRP (Groudiev, "Extending Layer-wise Relevance Propagation using Semiring Annotations") as a propagation
family: K-LRP in the semiring's own algebra.

- Start (Eq. 2.1.2): the semiring's ``1`` at the explained class, ``0`` elsewhere (:meth:`SemiringFamily.seed`).
- Linear layers (Eq. K-LRP): ``R_j = plus_k Theta(d)_jk times R_k``, ``d_jk = a_j w_jk / z_k`` with the bias as
  neuron 0 and a BatchNormalization folded in (Sec. 4.1.3); pairs explicit (:mod:`onnxlrp.passes.semiring_pairs`,
  Sec. 4.1.2), or without materializing them where that is exact: the identity annotation with (+, x) is LRP-0's
  gradient form ``x * W^T (R / z)``, and thresholds summed with 0/1 products are sign-matching counts plus a
  pair-by-pair correction (:mod:`onnxlrp.passes.semiring_fast`).
- Average pools: convolutions with equal weights (Eq. 4.1.2); max pools: winner-take-all (each window's relevance to
  its first arg-max, ``Theta = 1``); joins ``z = u_0 + u_1``: the LRP-0 coefficients ``u_i / z`` of a join.
- Activations and re-indexing ops pass relevance through; re-indexing fills with the semiring's ``0``; a tensor read
  several times gets the plus of what its readers send back.
- Relevance lives in float32, except the counting semiring's path counts: float64, exact up to 2**53. The
  ``relevance`` outputs are float32 (counts rounded, saturating at float32's max, 3.4e38); counting adds
  ``relevance_exact`` (float64, saturating at float64's max) beside each (:meth:`SemiringFamily.exact`).

A semiring is one algebra for the whole sweep: it cannot be mixed per layer with other rules or semirings; its
composite entries select a threshold per layer (Sec. 4.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from onnxlrp.composites import SEMIRING_KINDS
from onnxlrp.rules import Rule
from onnxlrp.semirings import DEFAULT_THRESHOLD, Semiring, check_threshold

from .families import Algebra, Family
from .ops.pooling import WindowAverage, WindowMax
from .semiring_fast import FLOAT32_MAX, applies, fast_threshold_linear
from .semiring_pairs import (
    Annotator,
    abs_normalized_linear,
    axes_average,
    factorizes,
    general_linear,
    global_max,
    join,
    window_average,
    window_max,
)

PLUS_OPS = {"sum": ("Sum", "ReduceSum"), "max": ("Max", "ReduceMax"), "or": ("Max", "ReduceMax"),
            "min": ("Min", "ReduceMin")}


@dataclass(frozen=True)
class SemiringRule(Rule):
    """One node's K-LRP step: the semiring and the node's threshold (None when the annotation has none)."""

    semiring: Semiring | None = None
    threshold: float | None = None
    kinds = SEMIRING_KINDS

    @property
    def name(self) -> str:
        return self.semiring.name

    def describe(self) -> str:
        return self.name if self.threshold is None else f"{self.name}(threshold={self.threshold:g})"

    def annotator(self, ctx) -> Annotator:
        return Annotator(ctx, self.semiring, self.threshold)

    def linear(self, ctx, layer, r):
        ann = self.annotator(ctx)
        s = self.semiring
        if s.annotation == "identity" and (s.plus, s.times) == ("sum", "mul"):
            # plus_k (c_jk / z_k) R_k = a_j (W^T (R / z))_j: LRP-0 (quotient 0 where z = 0), exact, no pairs
            b = ctx.b
            return b.op("Mul", [layer.x, layer.transpose(b, b.op("Mul", [r, ann.inverse(layer.z)], "s"),
                                                         layer.weight, "W")], "R")
        if applies(ann):
            return fast_threshold_linear(ann, layer, r)
        if factorizes(ann):
            return abs_normalized_linear(ann, layer, r)
        return general_linear(ann, layer, r)

    def join(self, ctx, node, r, on_path):
        return join(self.annotator(ctx), node, r, on_path)

    def average(self, ctx, view, r):
        ann = self.annotator(ctx)
        return window_average(ann, view, r) if isinstance(view, WindowAverage) else axes_average(ann, view, r)

    def max_pool(self, ctx, view, r):
        ann = self.annotator(ctx)
        return window_max(ann, view, r) if isinstance(view, WindowMax) else global_max(ann, view, r)


class SemiringFamily(Family):
    """K-LRP in one semiring; see the module docstring."""

    def __init__(self, composite, params: dict):
        s = composite.semiring
        self.semiring, self.composite = s, composite
        self.default_threshold = None
        if s.uses_threshold:
            self.default_threshold = check_threshold(params.get("threshold", DEFAULT_THRESHOLD), "--threshold")
        self.threshold_given = "threshold" in params
        self.threshold_used = False
        plus_op, reduce_op = PLUS_OPS[s.plus]
        self.algebra = Algebra(s.name, plus_op, reduce_op, "Add" if s.times == "add" else "Mul", s.zero, s.one,
                               TensorProto.DOUBLE if s.counts else TensorProto.FLOAT)
        self.name = f"semiring ({s.describe()})"

    def plan(self, nodes):
        """The semiring at every rule-bearing node, with the threshold of the first composite entry that selects
        the node, or ``--threshold`` (default 1e-9)."""
        per_kind: dict[str, int] = {}
        for node in nodes:
            per_kind[node.kind] = per_kind.get(node.kind, 0) + 1
        rules = {}
        for node in nodes:
            entry = next((e for e in self.composite.entries if e.matches(node, per_kind[node.kind], 1)), None)
            threshold = None
            if self.semiring.uses_threshold and node.kind != "max_pool":  # winner-take-all has no coefficient
                threshold = (entry.params.get("threshold") if entry else None)
                if threshold is None:
                    threshold, self.threshold_used = self.default_threshold, True
            rules[node.name] = SemiringRule(semiring=self.semiring, threshold=threshold)
        return rules

    def parameters_unused(self, plan):
        return ["threshold"] if self.threshold_given and not self.threshold_used else []

    def seed(self, ctx, one_hot, selected):
        """Eq. 2.1.2: ``1`` at the explained class, ``0`` elsewhere (``one_hot`` is 0/1 in float32)."""
        b, s = ctx.b, self.semiring
        if (s.zero, s.one) == (0, 1):
            return one_hot if self.algebra.dtype == TensorProto.FLOAT else \
                b.op("Cast", [one_hot], "R0", to=self.algebra.dtype)
        hit = b.op("Greater", [one_hot, b.const(0.5, "half")], "hit")
        return b.op("Where", [hit, ctx.relevance_const(s.one, "one"), ctx.relevance_const(s.zero, "zero")], "R0")

    def finish(self, ctx, relevance):
        """float32 outputs: float64 counts are rounded, and saturate at float32's largest value instead of Inf."""
        if self.algebra.dtype == TensorProto.FLOAT:
            return relevance
        b = ctx.b
        low, high = ctx.relevance_const(-FLOAT32_MAX, "float32_min"), ctx.relevance_const(FLOAT32_MAX, "float32_max")
        return {name: None if r is None else
                b.op("Cast", [b.op("Clip", [r, low, high], "saturated")], "R", to=TensorProto.FLOAT)
                for name, r in relevance.items()}

    def exact(self, ctx, r):
        return r if self.algebra.dtype == TensorProto.DOUBLE else None

