"""Semirings of semiring LRP (Groudiev, "Extending Layer-wise Relevance Propagation using Semiring Annotations").

K-LRP (Sec. 2.1): for a semiring ``(K, plus, times, 0, 1)`` and annotation functions ``Theta``, the relevance of a
neuron is ``R_j = plus_k Theta(d)_jk times R_k`` (Eq. K-LRP) with the LRP-0 coefficients
``d_jk = a_j w_jk / sum_j' a_j' w_j'k`` (the bias is neuron 0 with ``a_0 = 1``), and the start is ``1`` at the
explained class and ``0`` elsewhere (Eq. 2.1.2).

A semiring here is ``plus`` in {sum, max, min, or}, ``times`` in {mul, and, add}, ``zero``, ``one`` and an
element-wise annotation:

- ``threshold``: ``1`` where ``d_jk >= theta``, else ``0`` (Eq. 2.2.1 / 2.2.2; ``theta`` per layer, Sec. 4.3);
- ``identity``: ``d_jk`` itself (real LRP-0 without the output factor, Sec. 2.1);
- ``abs-normalized``: ``|a_j w_jk| / (max_j' |a_j' w_j'k| + 1e-9)`` (Eq. 2.2.3, the bias term included in the max);
- ``log-`` + one of these: its logarithm, ``log 0`` being the semiring's ``zero`` (max-plus "tropical" Viterbi, which
  cannot underflow where the products of Eq. 2.2.3 do).

Every annotation maps ``d = 0`` (an unconnected pair, ``w_jk = 0``) to ``zero``, so convolutions need only the pairs
inside receptive fields (Sec. 4.1); thresholds are therefore positive.

Built in: ``boolean`` (B-LRP, Eq. 2.2.1), ``counting`` (N-LRP, Eq. 2.2.2), ``viterbi`` (Eq. 2.2.3), ``real``
(LRP-0 / logit). A TOML composite may define its own in a ``[semiring]`` table (:func:`semiring_from_table`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import OnnxlrpError

PLUS = ("sum", "max", "min", "or")
TIMES = ("mul", "and", "add")
ANNOTATIONS = ("threshold", "identity", "abs-normalized", "log-threshold", "log-identity", "log-abs-normalized")
DEFAULT_THRESHOLD = 1e-9  # the paper's choice (Sec. 2.2.1)
VITERBI_EPS = 1e-9  # Eq. 2.2.3's guard against an all-zero column


@dataclass(frozen=True)
class Semiring:
    """``(K, plus, times, zero, one)`` with its annotation; see the module docstring."""

    name: str
    plus: str
    times: str
    zero: float
    one: float
    annotation: str
    summary: str = ""

    @property
    def base_annotation(self) -> str:
        """The annotation without its ``log-`` prefix."""
        return self.annotation.removeprefix("log-")

    @property
    def uses_threshold(self) -> bool:
        return self.base_annotation == "threshold"

    @property
    def counts(self) -> bool:
        """Relevance is a count of paths (sums of 0/1 annotations): exact integers, kept in float64."""
        return self.plus == "sum" and self.annotation == "threshold"

    @property
    def bottom(self) -> bool:
        """``plus`` is max (or or): ``zero`` is the least element and products are clamped at it from below."""
        return self.plus in ("max", "or")

    def describe(self) -> str:
        return (f"{self.name}: plus={self.plus}, times={self.times}, zero={self.zero:g}, one={self.one:g}, "
                f"annotation={self.annotation}")


BUILTIN: dict[str, Semiring] = {s.name: s for s in (
    Semiring("boolean", "or", "and", 0.0, 1.0, "threshold",
             "B-LRP (Eq. 2.2.1): R_j = OR_k [d_jk >= theta] AND R_k; --threshold (default 1e-9)"),
    Semiring("counting", "sum", "mul", 0.0, 1.0, "threshold",
             "N-LRP (Eq. 2.2.2): the number of relevant paths, exact up to 2**53 (float64 output relevance_exact)"),
    Semiring("viterbi", "max", "mul", 0.0, 1.0, "abs-normalized",
             "Viterbi (Eq. 2.2.3): R_j = max_k |a_j w_jk| / (max_j' |a_j' w_j'k| + 1e-9) * R_k"),
    Semiring("real", "sum", "mul", 0.0, 1.0, "identity",
             "(R, +, x) with the identity annotation: LRP-0 divided by the explained logit (Sec. 2.1)"),
)}


def check_semiring(s: Semiring, where: str) -> Semiring:
    """Refuse combinations that are not semirings on float32, with one line naming ``where``."""
    def fail(why: str):
        raise OnnxlrpError(f"{where}: semiring {s.name!r}: {why}")

    if s.plus not in PLUS:
        fail(f"plus must be one of {', '.join(PLUS)} (got {s.plus!r})")
    if s.times not in TIMES:
        fail(f"times must be one of {', '.join(TIMES)} (got {s.times!r})")
    if s.annotation not in ANNOTATIONS:
        fail(f"annotation must be one of {', '.join(ANNOTATIONS)} (got {s.annotation!r})")
    for key in ("zero", "one"):
        value = getattr(s, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                abs(value) > 1e36:
            fail(f"{key} must be a finite number of magnitude at most 1e36 (got {value!r}; a compiled graph may "
                 "output no Inf: write -1e30 for the -inf of max-plus)")
    if (s.plus == "or") != (s.times == "and"):
        fail("or and and go together (the boolean semiring)")
    if s.times == "and" and ((s.zero, s.one) != (0, 1) or s.annotation != "threshold"):
        fail("the boolean semiring has zero = 0, one = 1 and the threshold annotation (its values are truth values)")
    if s.times == "mul" and s.one != 1:
        fail("times = mul needs one = 1")
    if s.times == "mul" and s.zero != 0:
        fail("times = mul needs zero = 0 (0 must absorb: 0 x a = 0)")
    if s.plus == "sum" and s.zero != 0:
        fail("plus = sum needs zero = 0")
    if s.times == "add":
        if s.one != 0:
            fail("times = add needs one = 0")
        if s.plus not in ("max", "min"):
            fail("times = add needs plus = max (max-plus) or min (min-plus)")
        if (s.plus == "max" and s.zero >= 0) or (s.plus == "min" and s.zero <= 0):
            fail("zero must be the absorbing end of the order: very negative for max-plus (e.g. -1e30), very "
                 "positive for min-plus")
    if s.plus == "min" and s.times != "add":
        fail("plus = min needs times = add (min-times has no finite absorbing zero)")
    if s.annotation.startswith("log-") and s.times != "add":
        fail(f"a log annotation ({s.annotation}) lives in a max-plus or min-plus semiring (times = add)")
    return s


def semiring_from_table(table: dict, where: str, default_name: str) -> Semiring:
    """A ``[semiring]`` TOML table: name (default: the file's stem), plus, times, zero, one, annotation."""
    table = dict(table)
    known = {"name", "plus", "times", "zero", "one", "annotation", "summary"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise OnnxlrpError(f"{where}: [semiring] has no key {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    missing = [k for k in ("plus", "times", "zero", "one", "annotation") if k not in table]
    if missing:
        raise OnnxlrpError(f"{where}: [semiring] needs {', '.join(missing)}")
    name = table.get("name", default_name)
    if not isinstance(name, str) or not name or name in BUILTIN:
        raise OnnxlrpError(f"{where}: [semiring] name must be a new name (got {name!r}; built in: "
                           f"{', '.join(BUILTIN)})")
    s = Semiring(name, table["plus"], table["times"], table["zero"], table["one"], table["annotation"],
                 table.get("summary", "user-defined semiring"))
    return check_semiring(s, where)


def check_threshold(value, where: str) -> float:
    """A threshold is a finite positive number (``theta <= 0`` would annotate unconnected pairs, ``d = 0``, as 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise OnnxlrpError(f"{where}: threshold must be a finite number > 0 (got {value!r}; d = 0 for unconnected "
                           "pairs must stay below it)")
    return float(value)


def rules_listing() -> list[str]:
    """Lines for ``onnxlrp rules``."""
    lines = ["semirings (--rule NAME [--threshold T]; semiring LRP, Groudiev; thresholds per layer in a TOML "
             "composite):"]
    lines += [f"  {name:28s} {s.summary}" for name, s in BUILTIN.items()]
    lines.append("  user-defined: a [semiring] table in --composite FILE.toml: plus = sum|max|min|or, "
                 "times = mul|and|add, zero, one, annotation = " + "|".join(ANNOTATIONS))
    return lines
