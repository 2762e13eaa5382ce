"""The ``--rules`` and ``--percent`` options of ``onnxlrp evaluate``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from onnxlrp.errors import OnnxlrpError
from onnxlrp.naming import escape_terminal

__all__ = ["POSITIONAL", "RuleSpec", "parse_number", "parse_percents", "parse_rules", "resolve_alpha_beta"]


#: Positional parameters of ``name:v1,v2`` per rule.
POSITIONAL = {"epsilon": ("epsilon",), "gamma": ("gamma",), "alpha-beta": ("alpha", "beta"), "zbox": ("low", "high")}


@dataclass
class RuleSpec:
    """One entry of ``--rules``: its label as typed, the rule or composite, and its (Zennit-convention) params."""

    label: str
    rule: str
    params: dict[str, float] = field(default_factory=dict)
    note: str = ""


def parse_number(text: str) -> float | None:
    """``text`` as a finite float, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def resolve_alpha_beta(alpha: float, beta: float, label: str) -> tuple[float, float, str]:
    """(alpha, beta) in our (Zennit's) convention ``R = alpha * R+ - beta * R-``, ``alpha - beta = 1``.

    The R-LRP paper (Eq. 5) writes ``R = alpha * R+ + beta * R-`` with ``alpha + beta = 1`` (``R-`` the share of
    the negative contributions, a positive fraction), so its ``(alpha, beta)`` is our ``(alpha, -beta)``.  A pair
    with ``alpha - beta = 1`` is read in our convention, one with ``alpha + beta = 1`` in the paper's; ``(1, 0)``
    means the same in both.  Our rule needs ``beta >= 0``: the paper's pairs with ``beta > 0`` (e.g. 0.5, 0.5,
    which would give the negative contributions positive relevance) cannot be expressed.
    """
    tol = 1e-9
    if abs(alpha - beta - 1) <= tol and alpha >= 0 and beta >= 0:
        return alpha, beta, "" if (alpha, beta) != (1.0, 0.0) else "alpha=1, beta=0 (z+) in either convention"
    if abs(alpha + beta - 1) <= tol:
        if beta > 0 or alpha < 0:
            raise OnnxlrpError(
                f"rule {label!r}: the paper's alpha={alpha:g}, beta={beta:g} (alpha + beta = 1) is alpha={alpha:g}, "
                f"beta={-beta:g} in our convention (alpha - beta = 1, alpha * R+ - beta * R-); our alpha-beta rule "
                "needs alpha, beta >= 0, so it cannot be expressed")
        return alpha, -beta, f"paper alpha={alpha:g}, beta={beta:g} = ours alpha={alpha:g}, beta={-beta:g}"
    raise OnnxlrpError(f"rule {label!r}: alpha-beta needs alpha + beta = 1 (the R-LRP paper's notation, e.g. 2,-1) "
                       f"or alpha - beta = 1 (Zennit's, e.g. 2,1), got {alpha:g}, {beta:g}")


def parse_rules(spec: str | Sequence[str]) -> list[RuleSpec]:
    """``"rlrp,lrp0,epsilon:0.01,gamma:0.25,alpha-beta:2,-1"`` -> one :class:`RuleSpec` per rule.

    A rule is a rule or composite name (``onnxlrp rules``), optionally followed by ``:`` and parameters:
    positional numbers (epsilon: epsilon; gamma: gamma; alpha-beta: alpha, beta; zbox: low, high) or ``key=value``
    pairs, separated by commas.  A comma-separated item that is a number or ``key=value`` belongs to the rule
    before it.  alpha-beta pairs are read in the paper's or Zennit's convention (:func:`resolve_alpha_beta`).
    """
    from onnxlrp.compiler import PARAMETER_NAMES
    from onnxlrp.composites import COMPOSITES

    tokens = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
    if not tokens or tokens == [""]:
        raise OnnxlrpError("--rules is empty; give at least one rule, e.g. rlrp,lrp0,epsilon")
    groups: list[list[str]] = []
    for tok in tokens:
        if not tok:
            raise OnnxlrpError(f"--rules {escape_terminal(str(spec))!r}: empty item between commas")
        continues = parse_number(tok) is not None or ("=" in tok and ":" not in tok)
        if continues:
            if not groups or ":" not in groups[-1][0]:
                raise OnnxlrpError(f"--rules: {escape_terminal(tok)!r} is not a rule (parameters follow "
                                   "'name:', e.g. epsilon:0.01)")
            groups[-1].append(tok)
        else:
            groups.append([tok])
    out: list[RuleSpec] = []
    for group in groups:
        label = ",".join(group)
        name, _, first = group[0].partition(":")
        name = name.strip()
        if name not in COMPOSITES:
            raise OnnxlrpError(f"unknown rule {escape_terminal(name)!r} in --rules; valid: {', '.join(COMPOSITES)}")
        args = ([first.strip()] if first.strip() else []) + group[1:]
        if ":" in group[0] and not args:
            raise OnnxlrpError(f"rule {escape_terminal(label)!r}: parameters expected after ':'")
        params: dict[str, float] = {}
        positional = POSITIONAL.get(name, ())
        n_pos = 0
        for arg in args:
            key, eq, text = arg.partition("=")
            if eq:
                key = key.strip()
                if key not in PARAMETER_NAMES:
                    raise OnnxlrpError(f"rule {escape_terminal(label)!r}: unknown parameter {escape_terminal(key)!r}; "
                                       f"valid: {', '.join(PARAMETER_NAMES)}")
            else:
                text = arg
                if n_pos >= len(positional):
                    takes = ", ".join(positional) if positional else "no positional parameters (key=value only)"
                    raise OnnxlrpError(f"rule {escape_terminal(label)!r}: too many parameters; {name} takes {takes}")
                key = positional[n_pos]
                n_pos += 1
            value = parse_number(text.strip())
            if value is None:
                raise OnnxlrpError(f"rule {escape_terminal(label)!r}: {escape_terminal(text)!r} is not a number")
            if key in params:
                raise OnnxlrpError(f"rule {escape_terminal(label)!r}: {key} given twice")
            params[key] = value
        note = ""
        if name == "alpha-beta" and ("alpha" in params or "beta" in params):
            if not ("alpha" in params and "beta" in params):
                raise OnnxlrpError(f"rule {escape_terminal(label)!r}: give both alpha and beta (e.g. alpha-beta:2,-1)")
            params["alpha"], params["beta"], note = resolve_alpha_beta(params["alpha"], params["beta"], label)
        if any(r.label == label for r in out):
            raise OnnxlrpError(f"rule {escape_terminal(label)!r} is listed twice in --rules")
        out.append(RuleSpec(label, name, params, note))
    return out


def parse_percents(percent) -> list[float]:
    """``"1,5,10"`` (or a sequence) -> percentages in (0, 100]."""
    items = percent.split(",") if isinstance(percent, str) else list(percent)
    out = []
    for item in items:
        value = parse_number(str(item).strip())
        if value is None or not 0 < value <= 100:
            raise OnnxlrpError(f"--percent: {escape_terminal(str(item).strip())!r} is not a percentage in (0, 100]")
        out.append(int(value) if float(value).is_integer() else value)
    if not out:
        raise OnnxlrpError("--percent is empty")
    return out
