"""The op registry: for each ONNX op type, its facts and its backward emitter, declared once (like JAX's
per-primitive rules).

An :class:`OpSpec` says what the engine needs to know about an op type:

- ``data_inputs``: the indices of the inputs through which relevance flows (``None``: all of them; ``()``: none, e.g.
  Shape, whose output is shape arithmetic). Shape and index inputs (a Reshape's shape, a Slice's starts) carry none.
- ``data_outputs``: the indices of the outputs that carry relevance (``None``: all of them). A MaxPool's Indices and
  the scale and zero point that DynamicQuantizeLinear computes from its input carry none.
- ``shape_only``: the output holds the input's values in another shape or type (Identity, Cast, Reshape, ...).
- ``nonnegative``: when the output is ``>= 0`` for every input: ``"always"`` (Relu, Sigmoid, ...), ``"first"``
  (when its first input is), ``"all"`` (when all its inputs are), or a function ``(is_nonneg, node, tensor) -> bool``.
- ``zero_preserving``: ``f(0) = 0`` element-wise or by re-indexing, so the relevance it sends back vanishes where its
  input vanishes if the relevance it received vanishes where its output vanishes (a function ``(ctx, node, index)``
  may refine it, e.g. a Clip whose bounds exclude 0).
- ``join``: with several relevance-carrying inputs, the node joins branches (Add, Sum, Sub, Concat, Max, Min): R-LRP
  normalizes them at their fork (Eq. 13). A join with one relevance-carrying input has no rule of its kind.
- ``kind``: the node kind whose rule a composite chooses (``"linear"``, ``"join"``, ``"average_pool"``,
  ``"max_pool"``, ``"resize"``, ``"elementwise_max"``, ``"softmax"``, ``"matmul"``, ``"gate"``, ``"normalization"``;
  a tuple for an op that has a rule of each, like the fused ``Attention``), or ``None`` for ops whose treatment is
  fixed.
- ``fusable_producer``: its output may be replaced by a stand-in ``y - others`` when it is an operand of a join behind
  a Relu (Conv, BatchNormalization: onnxruntime then keeps Conv + Add + Relu in one kernel).
- ``foldable``: canonicalization may evaluate the node when all its inputs are constant (not random or control flow).
- ``emit`` ``(ctx, node, r_out) -> {input index: relevance}`` and ``check`` ``(ctx, node) -> reason | None``: the
  backward emitter, and why a given node cannot be handled (before anything is emitted; for an op without an emitter,
  why it has none). Ops with facts but no emitter (Shape, ConstantOfShape, ...) carry no relevance.

Ops of the default domain are registered by op type; ops of another domain (onnxruntime's ``com.microsoft``) with
``domain=...``, so that an op type of one domain never takes the facts of another's. An op type that is not
registered for its domain has the default facts (every input carries data, nothing else known) and no emitter:
:func:`lookup` fails with the node's name and op type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from onnxlrp.errors import UnsupportedOpError


@dataclass(frozen=True)
class OpSpec:
    data_inputs: tuple[int, ...] | None = None
    data_outputs: tuple[int, ...] | None = None
    shape_only: bool = False
    nonnegative: str | Callable | None = None
    zero_preserving: bool | Callable = False
    join: bool = False
    kind: str | tuple[str, ...] | None = None
    fusable_producer: bool = False
    foldable: bool = True
    emit: Callable | None = None
    check: Callable | None = None


DEFAULT = OpSpec()
OPS: dict[str, OpSpec] = {}
FUSED_DOMAIN = "onnxlrp.fused"  # virtual nodes that stand for a recognized subgraph (onnxlrp.passes.patterns)
FUSED: dict[str, OpSpec] = {}
DOMAINS: dict[tuple[str, str], OpSpec] = {}  # (domain, op type) for ops outside the default domain


def _table(domain: str) -> tuple[dict, object]:
    """The registry for ``domain`` and the key maker of an op type in it."""
    if domain in ("", "ai.onnx"):
        return OPS, lambda op: op
    if domain == FUSED_DOMAIN:
        return FUSED, lambda op: op
    return DOMAINS, lambda op: (domain, op)


def declare(*op_types: str, domain: str = "", **facts) -> None:
    """Declare the facts of ``op_types`` of ``domain`` (ops without an emitter of their own)."""
    table, key = _table(domain)
    for op in op_types:
        table[key(op)] = OpSpec(**facts)


def backward(*op_types: str, fused: bool = False, domain: str = "", **facts):
    """Register an emitter ``fn(ctx, node, r_out) -> {input index: relevance}`` with the facts of ``op_types`` of
    ``domain`` (``fused``: virtual node types of :mod:`onnxlrp.passes.patterns`, domain :data:`FUSED_DOMAIN`)."""
    table, key = _table(FUSED_DOMAIN if fused else domain)

    def register(fn):
        for op in op_types:
            table[key(op)] = OpSpec(emit=fn, **facts)
        return fn
    return register


def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def spec(node: onnx.NodeProto) -> OpSpec:
    """The facts of ``node``'s op type in its domain (the defaults for unregistered ops)."""
    table, key = _table(node.domain)
    return table.get(key(node.op_type), DEFAULT)


def data_input_indices(node: onnx.NodeProto) -> tuple[int, ...]:
    """Indices of ``node``'s inputs through which relevance flows."""
    fixed = spec(node).data_inputs
    indices = range(len(node.input)) if fixed is None else fixed
    return tuple(i for i in indices if i < len(node.input) and node.input[i])


def data_output_indices(node: onnx.NodeProto) -> tuple[int, ...]:
    """Indices of ``node``'s outputs that carry relevance."""
    fixed = spec(node).data_outputs
    indices = range(len(node.output)) if fixed is None else fixed
    return tuple(i for i in indices if i < len(node.output) and node.output[i])


def unsupported_reason(ctx, node: onnx.NodeProto) -> str | None:
    """Why ``node`` cannot carry relevance, or None when it can."""
    entry = spec(node)
    reason = entry.check(ctx, node) if entry.check else None
    if entry.emit is None:
        return reason or "no relevance rule for this op"
    return reason


def lookup(ctx, node: onnx.NodeProto) -> Callable:
    """The emitter for ``node``; raises with the node's name and op type when there is none."""
    reason = unsupported_reason(ctx, node)
    if reason:
        raise UnsupportedOpError(f"node {node.name!r} ({node.op_type}): {reason}")
    return spec(node).emit
