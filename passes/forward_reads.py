"""What the backward reads of the forward pass, without changing how onnxruntime runs the forward pass.

onnxruntime runs a quantized model through fused integer kernels: in a QDQ model each ``DequantizeLinear -> op ->
QuantizeLinear`` group becomes one QLinearConv, QLinearAdd, QGemm, QLinearAveragePool, ...; in a dynamically
quantized one, ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add`` becomes one DynamicQuantizeMatMul.
Whether it fuses a group depends on who else reads the tensors around it. Measured with onnxruntime 1.31 on a small
QDQ CNN: one more reader of a DequantizeLinear's output, of a QuantizeLinear's output, or even of the DequantizeLinear
output that is the graph's output, and onnxruntime runs other kernels, and the outputs of the QDQ CNN changed (its
QLinearAveragePool became a float AveragePool); a reader of DynamicQuantizeLinear's outputs turns DynamicQuantizeMatMul
into MatMulIntegerToFloat. The compiled model must keep the source's outputs bit for bit, so the backward never reads
those tensors. A forward tensor is *readable* unless

- the model is in QDQ form (a DequantizeLinear reads a QuantizeLinear's output): then only the graph inputs and the
  constants (the weights, folded from their DequantizeLinear nodes) are;
- a DequantizeLinear or a DynamicQuantizeLinear writes it, or it lies inside a dynamic integer layer
  (:class:`onnxlrp.passes.quantized.Expansion`'s ``hidden``);
- only the analysis view has it (a rewritten operator-form node's dequantized inputs and float output).

What the rules need of an unreadable tensor is recomputed from readable ones by the node that writes it in the
analysis view (:meth:`ForwardReads.read`): a DequantizeLinear as ``(Cast(q) - zero_point) * scale`` (bit for bit
what it computes); a QuantizeLinear as ``Clip(Round(x / scale) + zero_point, q_min, q_max)`` and a
DynamicQuantizeLinear as the spec's formulas (float tensors holding the integers); any other node as a copy on the
recomputed inputs. These ops are plain float arithmetic, which no onnxruntime fusion takes for a quantized group, and
never an exact copy of a forward node, which its common-subexpression elimination would merge into the forward.

In a QDQ model the backward thus runs the float network of the dequantized weights, with each QuantizeLinear ->
DequantizeLinear pair as the spec defines it. onnxruntime's fused integer kernels round their results once (an integer
accumulator times ``s_x s_w / s_y``) where the float network rounds each op, and some (QLinearAveragePool) break ties
otherwise: the activations the rules see can differ from the forward's by one quantization step where a value lies
at, or within float32 rounding of, a rounding boundary. Operator-form models are read as they run: their integer
tensors are readable.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from onnxlrp.errors import OnnxlrpError
from onnxlrp.weights import Weight

from .quantized import Expansion, along_axis, quant_range

FLOAT = TensorProto.FLOAT


class ForwardReads:
    """Readable names for the forward values the backward needs (see the module docstring)."""

    def __init__(self, ctx, expansion: Expansion):
        self.ctx, self.expansion = ctx, expansion
        graph = ctx.graph
        self.initializers = {t.name for t in graph.initializer}
        self.inputs = {v.name for v in graph.input}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.qdq = any(n.op_type == "DequantizeLinear" and n.input[0] in self.producer and
                       self.producer[n.input[0]].op_type == "QuantizeLinear" for n in graph.node)
        self.cache: dict[str, str] = {}
        self.float_valued: set[str] = set()  # integer tensors recomputed as float tensors holding the integers
        self.position = {id(n): i for i, n in enumerate(ctx.view.nodes)}

    def readable(self, name: str) -> bool:
        if name in self.initializers or name in self.inputs:
            return True
        if self.qdq or name in self.expansion.virtual or name in self.expansion.hidden or name not in self.producer:
            return False
        return self.producer[name].op_type not in ("DequantizeLinear", "DynamicQuantizeLinear")

    def read(self, name: str) -> str:
        """A tensor of the compiled graph that holds ``name``'s forward value: ``name`` itself when readable, else
        its recomputation (integer tensors as float tensors holding the integers, see :attr:`float_valued`)."""
        if self.readable(name):
            return name
        if name not in self.cache:
            self.recompute(name)
        return self.cache[name]

    def shape(self, name: str) -> str:
        """``Shape(name)`` without reading an unreadable tensor: its static shape, or the shape of its
        recomputation."""
        b = self.ctx.b
        if self.readable(name):
            return b.op("Shape", [name])
        shape = self.ctx.shapes.get(name)
        if shape and all(isinstance(d, int) for d in shape):
            return b.const(shape, "shape", np.int64)
        return b.op("Shape", [self.read(name)])

    # ------------------------------------------------------------ recomputation

    def recompute(self, name: str) -> None:
        """Emit the nodes that recompute ``name`` and the unreadable tensors it needs, in graph order."""
        view = self.ctx.view
        pending, stack = {}, [name]
        while stack:
            tensor = stack.pop()
            if tensor in self.cache or self.readable(tensor) or tensor in self.expansion.constants or not tensor:
                continue
            node = view.producer.get(tensor)
            if node is None:
                raise OnnxlrpError(f"the relevance pass needs tensor {tensor!r}, which no node writes")
            if id(node) not in pending:
                pending[id(node)] = node
                stack.extend(self.needs(node))
        scope = self.ctx.b.scope
        self.ctx.b.scope = "forward"
        for node in sorted(pending.values(), key=lambda n: self.position[id(n)]):
            self.emit(node)
        self.ctx.b.scope = scope

    def fused_quantizer(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """The QuantizeLinear whose unreadable output a DequantizeLinear ``node`` reads (recomputed as one pair)."""
        q = node.input[0]
        producer = self.ctx.view.producer.get(q)
        if producer is not None and producer.op_type == "QuantizeLinear" and not self.readable(q) and \
                q not in self.cache:
            return producer
        return None

    def needs(self, node: onnx.NodeProto) -> list[str]:
        if node.op_type == "DequantizeLinear" and (quantizer := self.fused_quantizer(node)) is not None:
            return list(quantizer.input) + list(node.input[1:])
        return list(node.input)

    def emit(self, node: onnx.NodeProto) -> None:
        if node.op_type == "DequantizeLinear":
            self.cache[node.output[0]] = self.dequantize(node)
        elif node.op_type == "QuantizeLinear":
            self.cache[node.output[0]] = self.quantize(node)
            self.float_valued.add(node.output[0])
        elif node.op_type == "DynamicQuantizeLinear":
            self.dynamic_quantize(node)
        else:
            self.copy(node)

    def operand(self, name: str) -> str:
        """An input of a recomputed node: a (virtual) constant, or a forward value."""
        if name in self.expansion.constants and name not in self.initializers:
            if name not in self.cache:
                weight = self.expansion.weights.get(name)
                self.cache[name] = weight.emit(self.ctx.b, "W") if isinstance(weight, Weight) else \
                    self.ctx.b.const(self.expansion.constants[name], "constant")
            return self.cache[name]
        return self.read(name)

    def parameter(self, name: str, axis: int | None, rank: int | None) -> str | np.ndarray | None:
        """A scale or zero point: a float32 array shaped along ``axis`` when constant, else its forward value."""
        if not name:
            return None
        if name in self.ctx.constants:
            value = np.asarray(self.ctx.constants[name])
            return along_axis(value, axis, rank or 1).astype(np.float32) if value.size > 1 else \
                value.astype(np.float32).reshape(())
        return self.as_float(name)

    def as_float(self, name: str) -> str:
        value = self.read(name)
        if name in self.float_valued or self.ctx.elem_type(name) == FLOAT:
            return value
        return self.ctx.b.op("Cast", [value], "as_float", to=FLOAT)

    def arith(self, op: str, a: str, c) -> str:
        b = self.ctx.b
        return b.op(op, [a, b.const(c, op.lower()) if isinstance(c, np.ndarray) else c], op.lower())

    def dequantize(self, node: onnx.NodeProto) -> str:
        """``(q - zero_point) * scale``; after a QuantizeLinear that is recomputed too, the pair as one
        fake quantization of its float input."""
        axis, rank = _axis(node), self.rank(node.input[0])
        scale = self.parameter(node.input[1], axis, rank)
        zero_point = self.parameter(node.input[2] if len(node.input) > 2 else "", axis, rank)
        quantizer = self.fused_quantizer(node)
        if quantizer is not None:
            q = self.quantize(quantizer)
        else:
            q = self.as_float(node.input[0])
        if zero_point is not None and not (isinstance(zero_point, np.ndarray) and not zero_point.any()):
            q = self.arith("Sub", q, zero_point)
        return self.arith("Mul", q, scale)

    def quantize(self, node: onnx.NodeProto) -> str:
        """``Clip(Round(x / scale) + zero_point, q_min, q_max)`` as a float tensor."""
        b = self.ctx.b
        axis, rank = _axis(node), self.rank(node.input[0])
        zero_name = node.input[2] if len(node.input) > 2 else ""
        zero = self.ctx.constants.get(zero_name) if zero_name else None
        out_type = next((a.i for a in node.attribute if a.name == "output_dtype"), None)
        low, high = quant_range(np.asarray(zero) if zero is not None else None, out_type)
        scaled = b.op("Round", [self.arith("Div", self.as_float(node.input[0]), self.parameter(node.input[1], axis,
                                                                                               rank))], "rounded")
        zero_point = self.parameter(zero_name, axis, rank)
        if zero_point is not None and not (isinstance(zero_point, np.ndarray) and not zero_point.any()):
            scaled = self.arith("Add", scaled, zero_point)
        return b.op("Clip", [scaled, b.const(float(low), "q_min"), b.const(float(high), "q_max")], "quantized")

    def dynamic_quantize(self, node: onnx.NodeProto) -> None:
        """DynamicQuantizeLinear's spec: ``scale = (max(x, 0) - min(x, 0)) / 255``, ``zero_point =
        round(clip(-min(x, 0) / scale, 0, 255))``, ``q = clip(round(x / scale) + zero_point, 0, 255)`` (a zero
        scale, for an all-zero ``x``, divides as 1: ``q`` and the zero point are then 0)."""
        b = self.ctx.b
        x = self.as_float(node.input[0])
        zero, one = b.const(0.0, "zero"), b.const(1.0, "one")
        low = b.op("Min", [b.op("ReduceMin", [x], "min", keepdims=0), zero], "low")
        high = b.op("Max", [b.op("ReduceMax", [x], "max", keepdims=0), zero], "high")
        scale = b.op("Div", [b.op("Sub", [high, low]), b.const(255.0, "q_span")], "scale")
        divisor = b.op("Where", [b.op("Equal", [scale, zero]), one, scale], "divisor")
        q_max = b.const(255.0, "q_max")
        zero_point = b.op("Round", [b.op("Clip", [b.op("Neg", [b.op("Div", [low, divisor])]), zero, q_max])],
                          "zero_point")
        q = b.op("Clip", [b.op("Add", [b.op("Round", [b.op("Div", [x, divisor])]), zero_point]), zero, q_max],
                 "quantized")
        for name, value in zip(node.output, (q, scale, zero_point), strict=False):
            if name:
                self.cache[name] = value
        self.float_valued.update(n for n in (node.output[0], node.output[2] if len(node.output) > 2 else "") if n)

    def copy(self, node: onnx.NodeProto) -> None:
        """``node`` on recomputed inputs, under fresh names (a node with subgraphs cannot be recomputed)."""
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise OnnxlrpError(f"node {node.name!r} ({node.op_type}) holds subgraphs; the relevance pass cannot "
                               "recompute it in a quantized model")
        b = self.ctx.b
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        del clone.input[:]
        clone.input.extend(self.operand(i) if i else "" for i in node.input)
        del clone.output[:]
        clone.output.extend(b.fresh(f"{node.op_type}") if o else "" for o in node.output)
        clone.name = b.fresh(f"{node.op_type}_node")
        b.nodes.append(clone)
        carries_integers = any(i in self.float_valued for i in node.input)
        for original, name in zip(node.output, clone.output, strict=True):
            if original:
                self.cache[original] = name
                if carries_integers and self.ctx.elem_type(original) != FLOAT:
                    self.float_valued.add(original)

    def rank(self, name: str) -> int | None:
        shape = self.ctx.shapes.get(name)
        return len(shape) if shape is not None else None


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)

