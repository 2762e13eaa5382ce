"""Composites: which rule each linear layer gets, by selectors; first match wins (Zennit's names and defaults)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OnnxlrpError
from .rules import RULES, Rule, make_rule

CONV = ("Conv",)
DENSE = ("Gemm", "MatMul")

# Command-line parameter -> the rule field it sets.
PARAMETERS = {"epsilon": "epsilon", "gamma": "gamma", "alpha": "alpha", "beta": "beta", "low": "low",
              "high": "high", "stabilizer": "stabilizer"}


@dataclass(frozen=True)
class LinearNode:
    """What selectors see of a linear layer."""

    name: str
    op_type: str
    index: int  # position among the linear layers, topological order
    depth: int  # linear layers on the longest input path up to and including this one (first layer: 1)


@dataclass
class Entry:
    """One selector -> rule line of a composite."""

    rule: str
    params: dict = field(default_factory=dict)
    ops: tuple[str, ...] | None = None
    first: bool | None = None
    name: str | None = None
    position: tuple[int, int] | None = None

    def matches(self, layer: LinearNode, n_layers: int, flat_layers: int) -> bool:
        if self.ops is not None and layer.op_type not in self.ops:
            return False
        if self.first is not None and (layer.depth <= flat_layers) != self.first:
            return False
        if self.name is not None and not re.search(self.name, layer.name):
            return False
        if self.position is not None:
            lo, hi = (p + n_layers if p < 0 else p for p in self.position)
            if not lo <= layer.index <= hi:
                return False
        return True


@dataclass
class Composite:
    name: str
    entries: list[Entry]
    description: str = ""

    def plan(self, layers: list[LinearNode], params: dict, flat_layers: int = 1) -> dict[str, Rule]:
        """Rule per linear layer name. ``params`` (epsilon, gamma, ...) go to every rule that has the field."""
        used: set[str] = set()
        rules: dict[str, Rule] = {}
        for layer in layers:
            entry = next((e for e in self.entries if e.matches(layer, len(layers), flat_layers)), None)
            if entry is None:
                raise OnnxlrpError(f"composite {self.name!r} has no entry for node {layer.name!r} ({layer.op_type})")
            fields = RULES[entry.rule].__dataclass_fields__
            given = {k: v for k, v in params.items() if PARAMETERS[k] in fields}
            used |= set(given)
            rules[layer.name] = make_rule(entry.rule, **{**entry.params, **{PARAMETERS[k]: v for k, v in
                                                                            given.items()}})
        unused = sorted(set(params) - used)
        if unused and layers:
            raise OnnxlrpError(f"{self.name!r} does not use --{', --'.join(unused)}")
        return rules


def _single(rule: str) -> Composite:
    return Composite(rule, [Entry(rule)], RULES[rule].summary)


COMPOSITES: dict[str, Composite] = {name: _single(name) for name in RULES}
COMPOSITES.update({
    "epsilon-plus": Composite("epsilon-plus", [Entry("zplus", ops=CONV), Entry("epsilon", ops=DENSE)],
                              "z+ on convolutions, epsilon on dense layers"),
    "epsilon-plus-flat": Composite(
        "epsilon-plus-flat",
        [Entry("flat", first=True), Entry("zplus", ops=CONV), Entry("epsilon", ops=DENSE)],
        "flat on the first linear layer, z+ on convolutions, epsilon on dense layers"),
    "epsilon-gamma-box": Composite(
        "epsilon-gamma-box",
        [Entry("zbox", ops=CONV, first=True), Entry("gamma", ops=CONV), Entry("epsilon", ops=DENSE)],
        "z-box on the first convolution (--low/--high, default 0/1), gamma on convolutions, epsilon on dense"),
    "epsilon-alpha2-beta1": Composite(
        "epsilon-alpha2-beta1",
        [Entry("alpha-beta", {"alpha": 2.0, "beta": 1.0}, ops=CONV), Entry("epsilon", ops=DENSE)],
        "alpha2-beta1 on convolutions, epsilon on dense layers"),
    "epsilon-alpha2-beta1-flat": Composite(
        "epsilon-alpha2-beta1-flat",
        [Entry("flat", first=True), Entry("alpha-beta", {"alpha": 2.0, "beta": 1.0}, ops=CONV),
         Entry("epsilon", ops=DENSE)],
        "flat on the first linear layer, alpha2-beta1 on convolutions, epsilon on dense layers"),
    "cmp": Composite(
        "cmp",
        [Entry("flat", first=True), Entry("alpha-beta", {"alpha": 2.0, "beta": 1.0}, ops=CONV),
         Entry("epsilon", ops=DENSE)],
        "LRP_CMP (Kohlbrenner et al.): flat on the first --flat-layers layers, alpha2-beta1 on convolutions, "
        "epsilon on dense layers"),
})


def get_composite(name: str) -> Composite:
    if name not in COMPOSITES:
        raise OnnxlrpError(f"unknown rule {name!r}; valid rules and composites: {', '.join(COMPOSITES)}")
    return COMPOSITES[name]


def load_composite(path: str | Path) -> Composite:
    """A TOML composite: ``[[layer]]`` tables with selectors (op, first, name, position) and a rule + params."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise OnnxlrpError(f"{path}: no such composite file") from err
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise OnnxlrpError(f"{path}: not a valid TOML composite: {err}") from err
    layers = data.get("layer")
    if not isinstance(layers, list) or not layers:
        raise OnnxlrpError(f"{path}: a composite needs at least one [[layer]] table")
    entries = []
    for i, table in enumerate(layers):
        table = dict(table)
        rule = table.pop("rule", None)
        if rule not in RULES:
            raise OnnxlrpError(f"{path}: layer {i + 1}: unknown rule {rule!r}; valid rules: {', '.join(RULES)}")
        ops = table.pop("op", None)
        position = table.pop("position", None)
        entry = Entry(rule, ops=(ops,) if isinstance(ops, str) else tuple(ops) if ops else None,
                      first=table.pop("first", None), name=table.pop("name", None),
                      position=tuple(position) if position else None)
        entry.params = table
        make_rule(rule, **entry.params)  # validates parameter names now, with a clear message
        entries.append(entry)
    return Composite(str(data.get("name", path.stem)), entries, f"composite from {path.name}")
