"""Quantized models, in the three forms onnxruntime's quantizer writes, as the rules see them: the network of the
dequantized weights and activations.

- **QDQ** (QuantizeLinear/DequantizeLinear around float ops): QuantizeLinear and DequantizeLinear pass relevance
  (:mod:`onnxlrp.passes.ops.quantized`); the float ops between them are the layers.
- **Operator form** (QLinearConv, QLinearMatMul, and onnxruntime's ``com.microsoft`` QGemm, QLinearAdd, QLinearMul,
  QLinearAveragePool, QLinearGlobalAveragePool, QLinearConcat, QLinearLeakyRelu, QLinearSigmoid; MaxPool on
  integer tensors): each node is seen as ``DequantizeLinear`` of its integer inputs, the float op, and
  ``QuantizeLinear`` to its output (:func:`standard_form`), so that the layers' rules apply as they are. The
  integer weights become virtual constants, ``(q - zero_point) * scale`` (:meth:`onnxlrp.weights.Weight.
  dequantized`), and an int32 bias ``B`` of scale ``s_x s_w`` becomes ``B s_x s_w``.
- **Dynamic** (``DynamicQuantizeLinear(x) -> (x_q, s_x, zp_x)``, then ``ConvInteger``/``MatMulInteger``, a Cast, a
  Mul by ``s_x s_w`` and a bias Add): the integer layer is seen as one float Conv (bias included) or MatMul on
  ``DequantizeLinear(x_q, s_x, zp_x)`` with the dequantized weight. The scale and zero point that
  DynamicQuantizeLinear computes carry no relevance (its ``data_outputs``).

The forward graph keeps its nodes: the rewritten nodes exist only in the analysis view the sweep works on, like the
fused nodes of :mod:`onnxlrp.passes.patterns`, and in the copy that shape inference runs on. What the rules read of
them is recomputed in the backward (:class:`onnxlrp.passes.forward_reads.ForwardReads`): a linear layer's ``z`` is
``W x + b`` on the dequantized ``x`` and ``W`` (the quantized output is an activation after it, which passes
relevance), a join's or a pool's output likewise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlrp.weights import Weight

MS = "com.microsoft"
INTEGER_TYPES = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
                 TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32}
#: integer ops that move or select values: they keep their input's scale and zero point
KEEPS_QUANTIZATION = {"MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice",
                      "Split", "Gather", "Pad", "Resize", "Identity", "DepthToSpace", "SpaceToDepth"}
#: of those, the ones whose rule reads values: seen as DequantizeLinear -> the float op -> QuantizeLinear
READS_VALUES = {"MaxPool", "GlobalMaxPool"}


@dataclass
class Expansion:
    """The analysis view of a quantized graph: its node list with the rewritten nodes, the virtual constants
    (float32 values; weights also as expressions over the integer initializer), the tensors no node of the model
    writes, and the tensors onnxruntime computes inside a fused kernel (never read by the backward)."""

    nodes: list[onnx.NodeProto]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, Weight] = field(default_factory=dict)
    virtual: set[str] = field(default_factory=set)
    hidden: set[str] = field(default_factory=set)
    unsupported: dict[str, str] = field(default_factory=dict)  # node name -> why it was not rewritten


EXPANDERS: dict[tuple[str, str], Callable] = {}


def expands(domain: str, *op_types: str):
    """Register ``fn(expander, node) -> bool`` (False, with ``expander.refuse(node, reason)``, leaves the node as it
    is) for ``op_types`` of ``domain``."""
    def register(fn):
        for op in op_types:
            EXPANDERS[(domain, op)] = fn
        return fn
    return register


def quant_range(zero_point: np.ndarray | None, elem_type: int | None = None) -> tuple[int, int]:
    """The integer range of a quantized tensor (from its zero point's type; uint8 without one, as the spec says)."""
    dtype = zero_point.dtype if zero_point is not None else INTEGER_TYPES.get(elem_type, np.uint8)
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def along_axis(values: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    """A per-axis scale or zero point shaped to broadcast against a tensor of ``rank`` along ``axis`` (a scalar as
    it is)."""
    values = np.asarray(values)
    if values.size == 1 or axis is None:
        return values.reshape(()) if values.size == 1 else values
    axis %= rank
    return values.reshape([-1] + [1] * (rank - 1 - axis))


class Expander:
    """Rewrites one node list (see :func:`standard_form`)."""

    def __init__(self, nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]):
        self.source, self.constants = nodes, constants
        self.producer = {o: n for n in nodes for o in n.output if o}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in nodes:
            for i in n.input:
                if i:
                    self.readers.setdefault(i, []).append(n)
        self.result = Expansion([])
        self.quantization: dict[str, tuple[str, str, int | None]] = {}  # integer tensor -> (scale, zero point, axis)
        self._dequantized: dict[tuple, str] = {}
        self.skip: set[int] = set()

    # ------------------------------------------------------------ building blocks

    def emit(self, op_type: str, inputs: list[str], output: str, name: str, **attrs) -> None:
        self.result.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))

    def virtual(self, name: str) -> str:
        self.result.virtual.add(name)
        return name

    def refuse(self, node: onnx.NodeProto, reason: str) -> bool:
        self.result.unsupported[node.name] = reason
        return False

    def dequantized(self, node: onnx.NodeProto, x: str, scale: str, zero_point: str, axis: int | None = None) -> str:
        """The float tensor ``(x - zero_point) * scale``: a virtual constant when ``x`` is constant (weights,
        a constant operand), else a virtual DequantizeLinear node (one per tensor and quantization)."""
        key = (x, scale, zero_point, axis)
        if key in self._dequantized:
            return self._dequantized[key]
        name = self.virtual(f"{x}@dequantized" if not any(k[0] == x for k in self._dequantized) else
                            f"{x}@dequantized{len(self._dequantized)}")
        self._dequantized[key] = name
        if x in self.constants:
            q = self.constants[x]
            rank = q.ndim
            s = along_axis(self.constants[scale], axis if axis is not None else 1, rank).astype(np.float32)
            zp = along_axis(self.constants[zero_point], axis if axis is not None else 1, rank) if zero_point else \
                np.zeros((), np.float32)
            self.result.constants[name] = ((q.astype(np.float32) - zp.astype(np.float32)) * s).astype(np.float32)
            self.result.weights[name] = Weight.dequantized(x, q, s, zp.astype(np.float32))
            return name
        attrs = {} if axis is None else {"axis": axis}
        self.emit("DequantizeLinear", [x, scale] + ([zero_point] if zero_point else []), name,
                  f"{node.name}/dequantize_{x}", **attrs)
        if x not in self.quantization:
            self.quantization[x] = (scale, zero_point, axis)
        return name

    def requantized(self, node: onnx.NodeProto, value: str, scale: str, zero_point: str, output: str) -> None:
        """``output = QuantizeLinear(value, scale, zero_point)`` (the node's integer output)."""
        self.emit("QuantizeLinear", [value, scale] + ([zero_point] if zero_point else []), output,
                  f"{node.name}/quantize")
        self.quantization[output] = (scale, zero_point, None)

    def float_op(self, node: onnx.NodeProto, op_type: str, inputs: list[str], output: str, **attrs) -> None:
        """The float op that ``node`` stands for; it takes ``node``'s name (the rule plan names it)."""
        self.emit(op_type, inputs, output, node.name, **attrs)

    def constant_bias(self, bias: str | None, *scales: np.ndarray) -> str | None:
        """An int32 bias of scale ``prod(scales)`` (per output channel) as a virtual float constant."""
        if not bias:
            return None
        value = self.constants[bias].astype(np.float64)
        for s in scales:
            value = value * np.asarray(s, np.float64).reshape(-1)
        name = self.virtual(f"{bias}@dequantized")
        self.result.constants[name] = value.astype(np.float32)
        return name

    # ------------------------------------------------------------ the pass

    def run(self) -> Expansion:
        for index, node in enumerate(self.source):
            if index in self.skip:
                continue
            expand = EXPANDERS.get((node.domain or "", node.op_type)) if node.domain != "ai.onnx" else \
                EXPANDERS.get(("", node.op_type))
            if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx"):
                self.quantization[node.output[0]] = (node.input[1], node.input[2] if len(node.input) > 2 else "",
                                                     _axis(node))
            if expand is None or not expand(self, node):
                self.result.nodes.append(node)
                self.propagate(node)
        return self.result

    def propagate(self, node: onnx.NodeProto) -> None:
        if node.op_type in KEEPS_QUANTIZATION and node.input and node.input[0] in self.quantization:
            for out in node.output:
                if out:
                    self.quantization[out] = self.quantization[node.input[0]]


def _axis(node: onnx.NodeProto) -> int | None:
    for a in node.attribute:
        if a.name == "axis":
            return a.i
    return None


def _attrs(node: onnx.NodeProto, drop: tuple[str, ...] = ()) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in drop}


def has_quantized_operators(nodes) -> bool:
    """Whether ``nodes`` hold operator-form or dynamic quantized nodes (which :func:`standard_form` rewrites)."""
    return any(((n.domain if n.domain != "ai.onnx" else ""), n.op_type) in EXPANDERS and n.op_type not in READS_VALUES
               for n in nodes)


def standard_form(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]) -> Expansion:
    """``nodes`` (topologically sorted) with every quantized operator node replaced by standard ops on dequantized
    tensors (see the module docstring); nodes that are not quantized are kept as they are."""
    return Expander(nodes, constants).run()


# ---------------------------------------------------------------- operator form

def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if i < len(node.input) else ""


@expands("", "QLinearConv")
def qlinear_conv(e: Expander, node) -> bool:
    x, xs, xzp, w, ws, wzp, ys, yzp = (_input(node, i) for i in range(8))
    if w not in e.constants or ws not in e.constants:
        return e.refuse(node, "only supported with a constant weight")
    bias = e.constant_bias(_input(node, 8), e.constants[xs], e.constants[ws]) if _input(node, 8) in e.constants \
        else None
    if _input(node, 8) and bias is None:
        return e.refuse(node, "only supported with a constant bias")
    inputs = [e.dequantized(node, x, xs, xzp), e.dequantized(node, w, ws, wzp, axis=0)] + ([bias] if bias else [])
    z = e.virtual(f"{node.output[0]}@float")
    e.float_op(node, "Conv", inputs, z, **_attrs(node))
    e.requantized(node, z, ys, yzp, node.output[0])
    return True


@expands("", "QLinearMatMul")
def qlinear_matmul(e: Expander, node) -> bool:
    a, as_, azp, b, bs, bzp, ys, yzp = (_input(node, i) for i in range(8))
    z = e.virtual(f"{node.output[0]}@float")
    e.float_op(node, "MatMul", [e.dequantized(node, a, as_, azp), e.dequantized(node, b, bs, bzp, axis=-1)], z)
    e.requantized(node, z, ys, yzp, node.output[0])
    return True


@expands(MS, "QGemm")
def qgemm(e: Expander, node) -> bool:
    a, as_, azp, b, bs, bzp, c, ys, yzp = (_input(node, i) for i in range(9))
    attrs = _attrs(node)
    if b not in e.constants:
        return e.refuse(node, "only supported with a constant weight")
    axis = 0 if attrs.get("transB", 0) else 1
    bias = e.constant_bias(c, e.constants[as_], e.constants[bs]) if c else None
    inputs = [e.dequantized(node, a, as_, azp), e.dequantized(node, b, bs, bzp, axis=axis)] + ([bias] if bias else [])
    gemm = {k: v for k, v in attrs.items() if k in ("alpha", "transA", "transB")}
    if ys:
        z = e.virtual(f"{node.output[0]}@float")
        e.float_op(node, "Gemm", inputs, z, **gemm)
        e.requantized(node, z, ys, yzp, node.output[0])
    else:  # a float output
        e.float_op(node, "Gemm", inputs, node.output[0], **gemm)
    return True


@expands(MS, "QLinearAdd", "QLinearMul")
def qlinear_binary(e: Expander, node) -> bool:
    a, as_, azp, b, bs, bzp, ys, yzp = (_input(node, i) for i in range(8))
    z = e.virtual(f"{node.output[0]}@float")
    e.float_op(node, node.op_type[len("QLinear"):], [e.dequantized(node, a, as_, azp),
                                                      e.dequantized(node, b, bs, bzp)], z)
    e.requantized(node, z, ys, yzp, node.output[0])
    return True


def _unary(op_type: str, drop: tuple[str, ...] = ()):
    def expand(e: Expander, node) -> bool:
        x, xs, xzp, ys, yzp = (_input(node, i) for i in range(5))
        attrs = _attrs(node, drop=("channels_last",) + drop)
        if _attrs(node).get("channels_last", 0):
            return e.refuse(node, "the channels-last layout is not supported")
        z = e.virtual(f"{node.output[0]}@float")
        e.float_op(node, op_type, [e.dequantized(node, x, xs, xzp)], z, **attrs)
        e.requantized(node, z, ys, yzp, node.output[0])
        return True
    return expand


expands(MS, "QLinearAveragePool")(_unary("AveragePool"))
expands(MS, "QLinearGlobalAveragePool")(_unary("GlobalAveragePool"))
expands(MS, "QLinearLeakyRelu")(_unary("LeakyRelu"))
expands(MS, "QLinearSigmoid")(_unary("Sigmoid"))


@expands(MS, "QLinearConcat")
def qlinear_concat(e: Expander, node) -> bool:
    ys, yzp = node.input[0], node.input[1]
    parts = [e.dequantized(node, *node.input[k:k + 3]) for k in range(2, len(node.input), 3)]
    z = e.virtual(f"{node.output[0]}@float")
    e.float_op(node, "Concat", parts, z, **_attrs(node))
    e.requantized(node, z, ys, yzp, node.output[0])
    return True


def integer_pool(e: Expander, node) -> bool:
    """A max pool on an integer tensor of known quantization: the same max pool on the dequantized tensor (the
    routing is the same: dequantization is increasing)."""
    x = node.input[0]
    if x not in e.quantization or len(node.output) > 1 and node.output[1]:
        return False
    scale, zero_point, axis = e.quantization[x]
    z = e.virtual(f"{node.output[0]}@float")
    e.float_op(node, node.op_type, [e.dequantized(node, x, scale, zero_point, axis)], z, **_attrs(node))
    e.requantized(node, z, scale, zero_point, node.output[0])
    return True


expands("", *READS_VALUES)(integer_pool)


# ---------------------------------------------------------------- dynamic quantization

def _sole_reader(e: Expander, tensor: str, op_type: str) -> onnx.NodeProto | None:
    readers = e.readers.get(tensor, [])
    return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None


@expands("", "ConvInteger", "MatMulInteger")
def integer_layer(e: Expander, node) -> bool:
    """``ConvInteger/MatMulInteger(x_q, w_q, zp_x, zp_w) -> Cast -> Mul(s_x s_w) [-> Add(bias)]`` with ``x_q, s_x,
    zp_x`` from one DynamicQuantizeLinear: a Conv (with the bias) or a MatMul (whose bias Add the linear layer folds
    itself) on ``DequantizeLinear(x_q, s_x, zp_x)`` and the dequantized weight."""
    x, w, xzp, wzp = (_input(node, i) for i in range(4))
    quantizer = e.producer.get(x)
    if quantizer is None or quantizer.op_type != "DynamicQuantizeLinear" or xzp != quantizer.output[2] or \
            w not in e.constants or (wzp and wzp not in e.constants):
        return e.refuse(node, "only the layers that onnxruntime's dynamic quantization writes (DynamicQuantizeLinear, "
                              "a constant weight, a Cast and a Mul by the scales) are supported")
    cast = _sole_reader(e, node.output[0], "Cast")
    scaled = _sole_reader(e, cast.output[0], "Mul") if cast is not None else None
    if scaled is None:
        return e.refuse(node, "its integer result is not Cast and scaled by one Mul")
    scales = e.producer.get(next((i for i in scaled.input if i != cast.output[0]), ""))
    w_scale = next((i for i in scales.input if i != quantizer.output[1]), None) if scales is not None and \
        scales.op_type == "Mul" and quantizer.output[1] in scales.input else None
    if w_scale not in e.constants:
        return e.refuse(node, "its Mul does not scale by the input's and a constant weight scale")
    q = e.constants[w]
    conv = node.op_type == "ConvInteger"
    channels = q.shape[0] if conv else q.shape[-1]
    scale = np.asarray(e.constants[w_scale], np.float32).reshape(-1)
    zero_point = np.asarray(e.constants[wzp] if wzp else np.zeros(1), np.float32).reshape(-1)
    if scale.size not in (1, channels) or zero_point.size not in (1, channels):
        return e.refuse(node, "its weight scale is neither per tensor nor per output channel")
    shape = [-1] + [1] * (q.ndim - 1) if conv else [-1]
    name = e.virtual(f"{w}@dequantized")
    scale, zero_point = scale.reshape(shape if scale.size > 1 else ()), zero_point.reshape(
        shape if zero_point.size > 1 else ())
    e.result.constants[name] = (q.astype(np.float32) - zero_point) * scale
    e.result.weights[name] = Weight.dequantized(w, q, scale, zero_point)
    x_float = e.dequantized(node, x, quantizer.output[1], quantizer.output[2])
    hidden = [node.output[0], cast.output[0]]
    if conv:
        add = _sole_reader(e, scaled.output[0], "Add")
        bias = next((i for i in add.input if i != scaled.output[0]), None) if add is not None else None
        inputs = [x_float, name]
        output = scaled.output[0]
        if bias in e.constants and e.constants[bias].size == channels:
            bias_name = e.virtual(f"{bias}@bias")
            e.result.constants[bias_name] = np.asarray(e.constants[bias], np.float32).reshape(-1)
            inputs.append(bias_name)
            hidden.append(scaled.output[0])
            output = add.output[0]
            e.skip.add(e.source.index(add))
        e.float_op(node, "Conv", inputs, output, **_attrs(node))
    else:
        e.float_op(node, "MatMul", [x_float, name], scaled.output[0])
        if _sole_reader(e, scaled.output[0], "Add") is not None:
            hidden.append(scaled.output[0])  # inside onnxruntime's DynamicQuantizeMatMul (bias included)
    e.skip.update(e.source.index(n) for n in (cast, scaled))
    e.result.hidden.update(hidden)
    return True


# ---------------------------------------------------------------- QDQ weights

def folded_dequantization(folded, name: str) -> Weight | None:
    """A QDQ model's weight ``name``, folded at canonicalization from ``DequantizeLinear(q, scale, zero_point)`` of
    constants (:class:`onnxlrp.passes.folding.FoldedConstants`), as the expression over the integer ``q``: its
    ops fold when onnxruntime creates the session, where ops on the DequantizeLinear's output would run on every
    call (onnxruntime keeps DequantizeLinear nodes for its quantized kernels)."""
    node = next((n for n in folded.nodes if name in n.output), None) if folded is not None else None
    if node is None or node.op_type != "DequantizeLinear" or any(a.name == "block_size" for a in node.attribute):
        return None
    leaves = [node.input[i] if i < len(node.input) else "" for i in range(3)]
    if any(n and n not in folded.leaves for n in leaves):
        return None
    q, scale = (numpy_helper.to_array(folded.leaves[n]) for n in leaves[:2])
    zero_point = numpy_helper.to_array(folded.leaves[leaves[2]]) if leaves[2] else np.zeros((), np.float32)
    axis = _axis(node)
    axis = 1 if axis is None else axis
    s, zp = (along_axis(a, axis, q.ndim).astype(np.float32) for a in (scale, zero_point))
    return Weight.dequantized(leaves[0], q, s, zp)
