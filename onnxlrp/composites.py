"""Composites: which rule each rule-bearing node gets, by selectors; first match wins (Zennit's names and defaults).

Rule-bearing nodes are linear layers (Conv, Gemm, MatMul with a constant weight), joins (Add/Sum/Sub of several
relevance-carrying tensors), pools (average and max), resizes, element-wise Max/Min of several relevance-carrying
tensors, gates (a Mul of two relevance-carrying tensors), normalizations (LayerNormalization, GroupNormalization,
InstanceNormalization, RMSNormalization and their decomposed forms), and for transformers offsets, softmax and
matrix products of two activations (:mod:`onnxlrp.attention_rules`). An entry applies to a node when its selectors
match and its rule is one for the node's kind (:attr:`onnxlrp.rules.Rule.kinds`). A linear layer that no entry
selects is an error; any other node gets its kind's default (:data:`onnxlrp.node_rules.DEFAULTS`: Norm,
winner-take-all, value, linearized, recurrent-epsilon) with the composite's parameters (``--stabilizer`` reaches
joins, pools, resizes and normalizations, as Zennit passes it to its Norm rule).

A composite is propagated by a family: ``classic``, or ``rlrp`` when every entry's rule is ``rlrp`` (R-LRP is a
whole-sweep method and cannot be mixed per layer, see :mod:`onnxlrp.passes.rlrp`), or ``semiring`` when its rules
name one semiring (:mod:`onnxlrp.semirings`; its entries select per-layer thresholds, and nodes that none selects
get the semiring with ``--threshold``).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .attention_rules import ATTENTION_DEFAULTS, ATTENTION_RULES
from .errors import OnnxlrpError
from .node_rules import DEFAULTS as NODE_DEFAULTS
from .node_rules import NODE_RULES
from .rules import RULES, Rule, make_rule
from .semirings import BUILTIN, Semiring, check_threshold, semiring_from_table

ALL_RULES: dict[str, type[Rule]] = {**RULES, **NODE_RULES, **ATTENTION_RULES}
# the rule of a node kind that no entry selects (an ``offset`` has none: relevance passes it unchanged)
DEFAULTS: dict[str, type[Rule]] = {**NODE_DEFAULTS, **ATTENTION_DEFAULTS}

KINDS = ("linear", "join", "offset", "average_pool", "max_pool", "resize", "elementwise_max", "gate", "normalization",
         "softmax", "matmul", "recurrent")
CONV = ("Conv",)
DENSE = ("Gemm", "MatMul")

# Command-line parameter -> the rule field it sets.
PARAMETERS = {"epsilon": "epsilon", "gamma": "gamma", "alpha": "alpha", "beta": "beta", "low": "low",
              "high": "high", "stabilizer": "stabilizer", "threshold": "threshold"}
SEMIRING_KINDS = ("linear", "join", "average_pool", "max_pool")  # a semiring annotates every rule-bearing node


@dataclass
class Entry:
    """One selector -> rule line of a composite."""

    rule: str
    params: dict = field(default_factory=dict)
    ops: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None
    first: bool | None = None
    name: str | None = None
    position: tuple[int, int] | None = None

    def matches(self, node, n_of_kind: int, flat_layers: int) -> bool:
        """Whether the selectors select ``node`` (a :class:`onnxlrp.passes.families.PlanNode`): its op type, its
        kind, whether it lies within the first ``flat_layers`` linear layers from the input (``first``), a regex on
        its name, and its position among the ``n_of_kind`` nodes of its kind (negative positions count from the
        end). A virtual node of a recognized pattern has the op type ``Normalization`` (decomposed norms). A
        semiring (not a rule) annotates the kinds :data:`SEMIRING_KINDS`."""
        if node.kind not in (ALL_RULES[self.rule].kinds if self.rule in ALL_RULES else SEMIRING_KINDS):
            return False
        if self.ops is not None and node.op_type not in self.ops:
            return False
        if self.kinds is not None and node.kind not in self.kinds:
            return False
        if self.first is not None and (node.depth <= flat_layers) != self.first:
            return False
        if self.name is not None and not re.search(self.name, node.name):
            return False
        if self.position is not None:
            lo, hi = (p + n_of_kind if p < 0 else p for p in self.position)
            if not lo <= node.index <= hi:
                return False
        return True


@dataclass
class Composite:
    name: str
    entries: list[Entry]
    description: str = ""
    family: str = "classic"  # "rlrp", "semiring" or "taylor" (no rules: gradients, onnxlrp.passes.taylor)
    semiring: Semiring | None = None

    def rule_classes(self) -> list[type[Rule]]:
        """The rules this composite can give: its entries' and, for the classic family, the kinds' defaults."""
        classes = [ALL_RULES[e.rule] for e in self.entries]
        return classes + list(DEFAULTS.values()) if self.family == "classic" else classes

    def check_parameters(self, params: dict) -> None:
        """Refuse parameters that none of the composite's rules has (``--gamma`` with ``epsilon``), whatever the
        model: a parameter used only on some models (``--low``/``--high`` of a first-convolution z-box, on an MLP)
        is accepted (``inspect`` says which parameters a model leaves unused)."""
        if self.family in ("rlrp", "taylor"):
            unused = sorted(params)
        elif self.family == "semiring":
            unused = sorted(p for p in params if p != "threshold" or not self.semiring.uses_threshold)
        else:
            fields = {f for cls in self.rule_classes() for f in cls.__dataclass_fields__}
            unused = sorted(p for p in params if PARAMETERS[p] not in fields)
        if unused:
            raise OnnxlrpError(f"{self.name!r} does not use --{', --'.join(unused)}")

    def field_of(self, param: str) -> str:
        return PARAMETERS[param]

    def plan(self, nodes: list, params: dict, flat_layers: int = 1) -> dict[str, Rule]:
        """Rule per rule-bearing node name (``nodes``: :class:`onnxlrp.passes.families.PlanNode`, topological
        order). ``params`` (epsilon, gamma, ...) go to every rule that has the field."""
        self.check_parameters(params)
        per_kind: dict[str, int] = {}
        for node in nodes:
            per_kind[node.kind] = per_kind.get(node.kind, 0) + 1
        rules: dict[str, Rule] = {}
        for node in nodes:
            entry = next((e for e in self.entries if e.matches(node, per_kind[node.kind], flat_layers)), None)
            if entry is None and node.kind == "linear":
                raise OnnxlrpError(f"composite {self.name!r} has no entry for node {node.name!r} ({node.op_type})")
            if entry is None and node.kind not in DEFAULTS:
                continue
            name, fixed = (entry.rule, entry.params) if entry else (DEFAULTS[node.kind].name, {})
            fields = ALL_RULES[name].__dataclass_fields__
            given = {PARAMETERS[k]: v for k, v in params.items() if PARAMETERS[k] in fields}
            rules[node.name] = make_rule(name, ALL_RULES, **{**fixed, **given})
        return rules


def _single(rule: str) -> Composite:
    return Composite(rule, [Entry(rule)], RULES[rule].summary, family="rlrp" if rule == "rlrp" else "classic")


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
    "attnlrp": Composite(
        "attnlrp",
        [Entry("lxt-epsilon"), Entry("softmax-taylor"), Entry("uniform-epsilon"), Entry("uniform"), Entry("lxt-norm")],
        "AttnLRP (Achtibat et al. 2024, LXT's explicit rules): epsilon with z + eps (1e-8) on linear layers, joins "
        "and offsets, Prop. 3.1 on softmax, Prop. 3.3 on matrix products, uniform gates, LayerNorm's sigma constant, "
        "RMS norm identity"),
    "cp-lrp": Composite(
        "cp-lrp",
        [Entry("lxt-epsilon"), Entry("constant"), Entry("uniform-epsilon"), Entry("activation-gate"),
         Entry("lxt-norm")],
        "CP-LRP (Ali et al. 2022, as LXT computes it): AttnLRP with the attention probabilities, LayerNorm's sigma "
        "and the gates held constant"),
    "taylor": Composite(
        "taylor", [], "first-order Taylor decomposition at a baseline (--baseline): R = df/dx(x0) * (x - x0), "
        "with f(x0) and the residual f(x) - f(x0) - sum R as outputs (Bach et al.)", family="taylor"),
    "cmp": Composite(
        "cmp",
        [Entry("flat", first=True), Entry("alpha-beta", {"alpha": 2.0, "beta": 1.0}, ops=CONV),
         Entry("epsilon", ops=DENSE)],
        "LRP_CMP (Kohlbrenner et al.): flat on the first --flat-layers layers, alpha2-beta1 on convolutions, "
        "epsilon on dense layers"),
})


COMPOSITES.update({name: Composite(name, [Entry(name)], s.summary, family="semiring",
                                   semiring=s) for name, s in BUILTIN.items()})


def get_composite(name: str) -> Composite:
    if name not in COMPOSITES:
        raise OnnxlrpError(f"unknown rule {name!r}; valid rules and composites: {', '.join(COMPOSITES)}")
    return COMPOSITES[name]


def load_composite(path: str | Path) -> Composite:
    """A TOML composite: ``[[layer]]`` tables with selectors (op, kind, first, name, position) and a rule +
    params."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise OnnxlrpError(f"{path}: no such composite file") from err
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise OnnxlrpError(f"{path}: not a valid TOML composite: {err}") from err
    layers = data.get("layer")
    if "semiring" in data or (isinstance(layers, list) and any(
            isinstance(t, dict) and t.get("rule") in BUILTIN for t in layers)):
        return load_semiring_composite(path, data)
    if not isinstance(layers, list) or not layers:
        raise OnnxlrpError(f"{path}: a composite needs at least one [[layer]] table")
    entries = []
    for i, table in enumerate(layers):
        table = dict(table)
        rule = table.pop("rule", None)
        if rule not in ALL_RULES:
            raise OnnxlrpError(f"{path}: layer {i + 1}: unknown rule {rule!r}; valid rules: {', '.join(ALL_RULES)}")
        entry = Entry(rule, **selectors(table, f"{path}: layer {i + 1}"))
        entry.params = table
        make_rule(rule, ALL_RULES, **entry.params)  # validates parameter names now, with a clear message
        entries.append(entry)
    relative = [i for i, e in enumerate(entries) if e.rule == "rlrp"]
    if relative and len(relative) < len(entries):
        other = next(i for i, e in enumerate(entries) if e.rule != "rlrp")
        raise OnnxlrpError(f"{path}: layer {relative[0] + 1} is rlrp and layer {other + 1} is {entries[other].rule}: "
                           "R-LRP cannot be mixed per layer (its joins give each branch the full relevance and its "
                           "forks normalize them, Eq. 13; a layer under another rule breaks that); use rule = "
                           "\"rlrp\" in every [[layer]] table, or --rule rlrp")
    return Composite(str(data.get("name", path.stem)), entries, f"composite from {path.name}",
                     family="rlrp" if relative else "classic")


def selectors(table: dict, where: str) -> dict:
    """The selectors of a ``[[layer]]`` table (removed from it): op, kind, first, name, position."""
    ops = table.pop("op", None)
    given_kinds = table.pop("kind", None)
    kinds = (given_kinds,) if isinstance(given_kinds, str) else given_kinds
    if kinds is not None and (not isinstance(kinds, list | tuple) or any(k not in KINDS for k in kinds)):
        raise OnnxlrpError(f"{where}: unknown kind {given_kinds!r}; valid kinds: {', '.join(KINDS)}")
    position = table.pop("position", None)
    return dict(ops=(ops,) if isinstance(ops, str) else tuple(ops) if ops else None,
                kinds=tuple(kinds) if kinds else None, first=table.pop("first", None),
                name=table.pop("name", None), position=tuple(position) if position else None)


def load_semiring_composite(path: Path, data: dict) -> Composite:
    """A semiring composite: a user-defined ``[semiring]`` table or ``rule = "<built-in semiring>"`` entries, and
    ``[[layer]]`` tables with selectors and a ``threshold`` (Sec. 4.3: one per layer). One semiring for the whole
    sweep: mixing it with other rules or semirings is refused."""
    table = data.get("semiring")
    if table is not None and not isinstance(table, dict):
        raise OnnxlrpError(f"{path}: [semiring] must be a table")
    semiring = semiring_from_table(table, str(path), path.stem) if table is not None else None
    layers = data.get("layer", [])
    if not isinstance(layers, list):
        raise OnnxlrpError(f"{path}: [[layer]] must be an array of tables")
    entries = []
    for i, layer in enumerate(layers):
        layer = dict(layer)
        where = f"{path}: layer {i + 1}"
        rule = layer.pop("rule", semiring.name if semiring else None)
        if semiring is not None and rule in BUILTIN and rule != semiring.name:
            raise OnnxlrpError(f"{where}: semiring {rule!r} after {semiring.name!r}: one semiring per composite "
                               "(one algebra for the whole sweep)")
        if rule != (semiring.name if semiring else rule) or (semiring is None and rule not in BUILTIN):
            raise OnnxlrpError(f"{where}: rule {rule!r}: semiring LRP cannot be mixed per layer with other rules "
                               "(one algebra for the whole sweep); use the semiring's name or leave rule out")
        semiring = semiring or BUILTIN[rule]
        params = {}
        if "threshold" in layer:
            if not semiring.uses_threshold:
                raise OnnxlrpError(f"{where}: {semiring.name!r} has no threshold (annotation "
                                   f"{semiring.annotation})")
            params["threshold"] = check_threshold(layer.pop("threshold"), where)
        entry = Entry(rule, params, **selectors(layer, where))
        if layer:
            raise OnnxlrpError(f"{where}: unknown key(s) {', '.join(sorted(layer))}; valid: rule, threshold, op, "
                               "first, name, position")
        entries.append(entry)
    return Composite(str(data.get("name", path.stem)), entries or [Entry(semiring.name)],
                     semiring.summary, family="semiring", semiring=semiring)
