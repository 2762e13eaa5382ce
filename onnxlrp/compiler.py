"""``compile``: an ONNX model in, an ONNX model out that computes the forward pass and LRP relevance."""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from onnxlrp.passes.canonicalize import canonicalize
from onnxlrp.passes.families import ClassicFamily, Family
from onnxlrp.passes.folding import FoldedConstants, restore_folded
from onnxlrp.passes.relevance import RelevancePass, rule_table
from onnxlrp.passes.rlrp import RLRPFamily
from onnxlrp.passes.semiring import SemiringFamily
from onnxlrp.passes.taylor import ROOT, TaylorFamily, baselines, describe_baseline, with_root_copy

from . import __version__
from .attributes import make_explicit
from .composites import Composite, get_composite, load_composite
from .errors import OnnxlrpError
from .io import clamp_ir_version, read_model
from .io.load import IN_MEMORY
from .messages import show

PARAMETER_NAMES = ("epsilon", "gamma", "alpha", "beta", "low", "high", "stabilizer", "threshold")


@dataclass
class Plan:
    """What ``inspect`` shows: the family, the rule per rule-bearing node, every node on the path that has no rule,
    the given rule parameters that no node of this model uses, and the recognized patterns and gates."""

    rules: dict[str, str]
    unsupported: list[str]
    explained: str
    inputs: list[str]
    family: str = "classic"
    unused_parameters: list[str] = field(default_factory=list)
    explained_why: str = ""  # what the explained tensor is and why it was chosen
    patterns: list[str] = field(default_factory=list)


@contextmanager
def naming_the_model(model_or_path):
    """Prefix the one-line error of everything that reads the model's graph with the model's file (or ``model`` for
    an in-memory model), unless it names it already."""
    label = show(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else IN_MEMORY
    try:
        yield
    except OnnxlrpError as err:
        text = str(err)
        if not text.startswith(f"{label}: "):
            err.args = (f"{label}: {text}",)
        raise


def choose_composite(rule: str, composite: str | Path | None) -> Composite:
    return load_composite(composite) if composite else get_composite(rule)


def family_of(composite: Composite, params: dict, flat_layers: int) -> Family:
    """The propagation family of a composite: R-LRP, a semiring, or the classic rules (never chosen by the
    composite's name)."""
    if composite.family == "rlrp":
        composite.check_parameters(params)
        return RLRPFamily()
    if composite.family == "semiring":
        composite.check_parameters(params)
        return SemiringFamily(composite, params)
    return ClassicFamily(composite, params, flat_layers)


def _pass(model: onnx.ModelProto, composite: Composite, *, params: dict, flat_layers: int, output, node_output,
          opset, input_shapes, precision=None, source=None, node_input=None, relevance_at=(), position=None,
          baseline=None, baseline_data=None
          ) -> tuple[RelevancePass, FoldedConstants]:
    unknown = set(params) - set(PARAMETER_NAMES)
    if unknown:
        raise OnnxlrpError(f"unknown parameter(s) {', '.join(sorted(unknown))}; valid: {', '.join(PARAMETER_NAMES)}")
    params = {k: float(v) for k, v in params.items() if v is not None}
    if flat_layers < 1:
        raise OnnxlrpError("--flat-layers must be at least 1")
    if composite.family == "taylor":
        composite.check_parameters(params)
        return _taylor_pass(model, output=output, node_output=node_output, opset=opset, input_shapes=input_shapes,
                            precision=precision, source=source, node_input=node_input,
                            baseline="zeros" if baseline is None else baseline, baseline_data=baseline_data)
    if baseline is not None or baseline_data is not None:
        raise OnnxlrpError("--baseline and --baseline-data are for --rule taylor")
    family = family_of(composite, params, flat_layers)
    composite.check_parameters(params)
    node_inputs = [node_input] if isinstance(node_input, str) else list(node_input) if node_input else None
    with naming_the_model(source):
        canonical, shapes, folded = canonicalize(model, opset=opset, input_shapes=input_shapes, precision=precision)
        return RelevancePass(canonical, shapes, family, output=output, node_output=node_output,
                             node_inputs=node_inputs, relevance_at=tuple(relevance_at or ()), folded=folded,
                             position=position), folded


def _taylor_pass(model, *, output, node_output, opset, input_shapes, precision, source, node_input, baseline,
                 baseline_data) -> tuple[RelevancePass, FoldedConstants]:
    """The Taylor family's pass (:mod:`onnxlrp.passes.taylor`): the canonical graph with its forward pass at the
    baseline appended, swept from the baseline's copy of the explained tensor."""
    if node_input:
        raise OnnxlrpError("--rule taylor explains the graph inputs; --node-input is not supported with it")
    with naming_the_model(source):
        canonical, shapes, folded = canonicalize(model, opset=opset, input_shapes=input_shapes, precision=precision)
        probe = RelevancePass(canonical, shapes, TaylorFamily({}), output=output, node_output=node_output)
        points = baselines(baseline, baseline_data, probe.sources, shapes)
        node_names = {ROOT + n.name: n.name for n in canonical.graph.node}
        shapes, roots = with_root_copy(canonical, shapes, probe.sources, probe.target, points)
        family = TaylorFamily(roots, describe_baseline(baseline, baseline_data, points))
        rp = RelevancePass(canonical, shapes, family, node_output=ROOT + probe.target,
                           node_inputs=list(roots), predicted_from=probe.target,
                           labels=roots | node_names | {ROOT + probe.target: probe.target})
        rp.explained_why = probe.explained_why
        return rp, folded


def compile(model_or_path, rule: str = "epsilon", *, composite: str | Path | None = None, output: str | None = None,
            node_output: str | None = None, node_input: str | list[str] | None = None, opset: int | None = None,
            input_shapes: dict[str, list[int]] | None = None, flat_layers: int = 1, precision: str | None = None,
            relevance_at: list[str] | tuple[str, ...] = (), position: int | None = None,
            baseline: str | Path | None = None, baseline_data: str | Path | None = None, **params) -> onnx.ModelProto:
    """Compile ``model_or_path`` (a ModelProto or a file) with ``rule`` (a rule, composite or semiring name, see
    ``onnxlrp rules``) or a TOML ``composite``. Parameters: epsilon, gamma, alpha, beta, low, high, stabilizer,
    threshold (semirings). ``precision="fp16"`` makes the forward pass float16 (relevance is always computed in
    float32). ``node_input``: one intermediate tensor (or several) explained instead of the float graph inputs, e.g.
    a spectrogram behind an STFT or an embedding behind a token lookup; the nodes before it need no rule.
    ``relevance_at``: inner tensors whose relevance is output too (``relevance@TENSOR``). ``position``: the position
    explained along the sequence axis of a ``[batch, tokens, classes]`` output (default: the last).
    ``baseline`` (rule ``taylor`` only): the root point ``x0``, ``"zeros"`` (default), ``"mean"`` (the mean sample of
    ``baseline_data``, an .npy/.npz of samples) or an .npy file holding ``x0``; the model then also outputs
    ``taylor_root_value`` (``f(x0)``) and ``taylor_residual`` (``f(x) - f(x0) - sum R``).

    The result keeps every original input and output and adds the input ``target`` (int64 [batch], -1: explain
    the predicted class) and the outputs ``relevance`` (``relevance.<name>`` per input or node input when there
    are several) and ``explained_class``.
    """
    model, digest = read_model(model_or_path)
    comp = choose_composite(rule, composite)
    rp, folded = _pass(model, comp, params=params, flat_layers=flat_layers, output=output, node_output=node_output,
                       opset=opset, input_shapes=input_shapes, precision=precision, source=model_or_path,
                       node_input=node_input, relevance_at=relevance_at, position=position, baseline=baseline,
                       baseline_data=baseline_data)
    with naming_the_model(model_or_path):
        relevance = rp.run()
        outputs = rp.finish(relevance)
    compiled = rp.model
    restore_folded(compiled.graph, folded)
    make_explicit(compiled.graph, rp.opset)  # no attribute left to a backend's defaults
    compiled.producer_name, compiled.producer_version = "onnxlrp", __version__
    meta = {
        "onnxlrp.version": __version__,
        "onnxlrp.rule": comp.name,
        "onnxlrp.plan": json.dumps(_table(rp, rp.plan)),
        "onnxlrp.explained": rp.label(rp.target),
        "onnxlrp.explained_why": rp.explained_why,
        "onnxlrp.relevance_of": json.dumps(dict(zip(outputs, map(rp.label, rp.explained_inputs), strict=True))),
        "onnxlrp.source_sha256": digest,
    }
    if comp.semiring is not None:
        meta["onnxlrp.semiring"] = json.dumps(dataclasses.asdict(comp.semiring))
    if isinstance(rp.family, TaylorFamily):
        meta["onnxlrp.baseline"] = rp.family.baseline
    kept = [p for p in compiled.metadata_props if not p.key.startswith("onnxlrp.")]
    del compiled.metadata_props[:]
    compiled.metadata_props.extend(kept)
    for key, value in meta.items():
        compiled.metadata_props.append(helper.make_metadata_prop(key, value) if hasattr(helper, "make_metadata_prop")
                                       else onnx.StringStringEntryProto(key=key, value=value))
    clamp_ir_version(compiled)
    return compiled


def inspect(model_or_path, rule: str = "epsilon", *, composite=None, output=None, node_output=None, node_input=None,
            opset=None, input_shapes=None, flat_layers: int = 1, precision=None, relevance_at=(), position=None,
            baseline=None, baseline_data=None,
            **params) -> Plan:
    """The rule plan and the unsupported nodes on the relevance path, without emitting anything."""
    model, _ = read_model(model_or_path)
    rp, _ = _pass(model, choose_composite(rule, composite), params=params, flat_layers=flat_layers, output=output,
                  node_output=node_output, opset=opset, input_shapes=input_shapes, precision=precision,
                  source=model_or_path, node_input=node_input, relevance_at=relevance_at, position=position,
                  baseline=baseline, baseline_data=baseline_data)
    with naming_the_model(model_or_path):
        problems = rp.unsupported()
        plan = {} if problems else rp.family.plan(rp.plan_nodes())
        patterns = rp.pattern_lines()
    return Plan(_table(rp, plan), problems, rp.label(rp.target), [rp.label(s) for s in rp.explained_inputs],
                rp.family.name, rp.family.parameters_unused(plan), rp.explained_why, patterns)


def _table(rp: RelevancePass, plan: dict) -> dict[str, str]:
    """The rule per node under the names the user knows (:meth:`RelevancePass.label`)."""
    return {rp.label(name): rule for name, rule in rule_table(plan).items()}


def is_compiled(model: onnx.ModelProto) -> bool:
    return any(p.key == "onnxlrp.rule" for p in model.metadata_props)
