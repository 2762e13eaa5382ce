"""The float reference of a quantized model: the network of its dequantized weights and activations, for
tests/graph_reference.py.

:func:`dequantized_network` writes a float model, independent of onnxlrp, in which

- every weight is ``(q - zero_point) * scale`` (a float initializer), an int32 bias ``B`` of scale ``s_x s_w`` is
  ``B s_x s_w``;
- every quantized operator node (QLinearConv, QGemm, QLinearAdd, QLinearAveragePool, ...) is its float op on the
  dequantized inputs, and every integer layer of dynamic quantization (ConvInteger/MatMulInteger, Cast, Mul by the
  scales, bias Add) is a float Conv or MatMul (+ Add);
- every quantization of an activation (a QuantizeLinear -> DequantizeLinear pair, the requantization of a quantized
  operator node's output, a DynamicQuantizeLinear) is one ``FakeQuant`` node (domain ``test.quantized``): the value
  ``DequantizeLinear(QuantizeLinear(t))``, computed in float64 from the ONNX spec's formulas (``mode="static"``, and
  ``"dynamic"``, whose scale and zero point come from ``t`` itself), or taken from onnxruntime's run of the source
  (``mode="oracle"``, keyed by the integer tensor: the tests use it for operator-form models, where onnxruntime's
  integer kernels round differently from the float formulas, e.g. QLinearAveragePool's ties).

:class:`QuantizedReference` is the graph reference of that model; ``FakeQuant`` passes relevance (it is an
activation).
"""

from __future__ import annotations

import numpy as np
import onnx
from graph_reference import GraphReference
from onnx import TensorProto, helper, numpy_helper
from onnx.reference.op_run import OpRun

DOMAIN = "test.quantized"
ORACLE: dict[str, np.ndarray] = {}  # integer tensor -> its dequantized value in onnxruntime's run (float64)


class FakeQuant(OpRun):
    """``(clip(round(t / scale) + zero_point, low, high) - zero_point) * scale`` in float64 (round half to even);
    ``dynamic``: scale and zero point from ``t`` as DynamicQuantizeLinear's spec computes them; ``oracle``: the
    value in :data:`ORACLE`."""

    op_domain = DOMAIN

    def _run(self, t, scale, zero_point, low=0, high=255, mode="static", key=""):
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "oracle":
            key = key.decode() if isinstance(key, bytes) else key
            assert ORACLE[key].shape == t.shape, key
            return (ORACLE[key].astype(t.dtype),)
        if mode == "dynamic":
            low_t, high_t = min(t.min(), 0.0), max(t.max(), 0.0)
            scale = (high_t - low_t) / 255.0
            if scale == 0:
                return (np.zeros_like(t),)
            zero_point = np.rint(np.clip(-low_t / scale, 0, 255))
        q = np.clip(np.rint(t / scale) + zero_point, low, high)
        return (((q - zero_point) * scale).astype(t.dtype),)


class QuantizedReference(GraphReference):
    """tests/graph_reference.py on :func:`dequantized_network`'s model, with ``FakeQuant`` as an activation."""

    extra_ops = (FakeQuant,)

    def backward(self, node, r, values):
        if node.op_type == "FakeQuant":
            return [(node.input[0], r, ())]
        return super().backward(node, r, values)


# ---------------------------------------------------------------- the dequantized network

class Writer:
    """The float model, node by node."""

    def __init__(self, model: onnx.ModelProto, mode: str):
        self.model, self.mode = model, mode
        self.values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.skipped: set[str] = set()  # source nodes that a rewritten node covers
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.producer = {o: n for n in model.graph.node for o in n.output}

    def constant(self, name: str, value) -> str:
        self.initializers[name] = np.asarray(value, np.float32)
        return name

    def dequantized(self, q: str, scale: str, zero_point: str, axis: int) -> np.ndarray:
        """``(q - zero_point) * scale`` of a constant, per channel along ``axis``."""
        value = self.values[q].astype(np.float64)

        def along(name):
            v = self.values[name].astype(np.float64)
            if v.size == 1:
                return v.reshape(())
            shape = [1] * value.ndim
            shape[axis] = -1
            return v.reshape(shape)
        return (value - (along(zero_point) if zero_point else 0.0)) * along(scale)

    def weight(self, q: str, scale: str, zero_point: str, axis: int) -> str:
        return self.constant(f"{q}/float", self.dequantized(q, scale, zero_point, axis))

    def bias(self, name: str, *scales: str) -> str:
        value = self.values[name].astype(np.float64)
        for s in scales:
            value = value * self.values[s].astype(np.float64).reshape(-1)
        return self.constant(f"{name}/float", value)

    def fake_quant(self, t: str, out: str, scale: str = "", zero_point: str = "", mode: str | None = None) -> None:
        """``out = DequantizeLinear(QuantizeLinear(t, scale, zero_point))`` (see :class:`FakeQuant`)."""
        mode = mode or self.mode
        info = np.iinfo(self.values[zero_point].dtype if zero_point else np.uint8)
        zp = self.values[zero_point].astype(np.float32) if zero_point else np.zeros((), np.float32)
        inputs = [t, self.constant(f"{out}/scale", self.values[scale] if scale else 1.0),
                  self.constant(f"{out}/zero_point", zp)]
        self.nodes.append(helper.make_node("FakeQuant", inputs, [out], name=f"{out}/fake_quant", domain=DOMAIN,
                                           low=int(info.min), high=int(info.max), mode=mode, key=out))

    def op(self, op_type: str, inputs: list[str], output: str, name: str, **attributes) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attributes))

    def finish(self) -> onnx.ModelProto:
        graph = self.model.graph
        live = {o.name for o in graph.output}
        kept = []
        for node in reversed(self.nodes):
            if any(o in live for o in node.output):
                kept.append(node)
                live |= set(node.input)
        inputs = [helper.make_tensor_value_info(v.name, TensorProto.FLOAT, [d.dim_value or d.dim_param for d in
                                                                           v.type.tensor_type.shape.dim])
                  for v in graph.input if v.name not in self.values]
        outputs = [helper.make_tensor_value_info(o.name, TensorProto.FLOAT, None) for o in graph.output]
        values = {**{k: v for k, v in self.values.items() if v.dtype in (np.float32, np.int64)}, **self.initializers}
        initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in values.items() if k in live]
        return helper.make_model(helper.make_graph(kept[::-1], "dequantized", inputs, outputs, initializers),
                                 opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def attrs(node, drop=()) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in drop}


def axis_of(node, default=1) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), default)


def dequantized_network(model: onnx.ModelProto, oracle: bool = False) -> onnx.ModelProto:
    """The float network of ``model``'s dequantized weights and activations (see the module docstring);
    ``oracle``: every quantized activation of an operator-form model takes its value from :data:`ORACLE`."""
    w = Writer(model, "oracle" if oracle else "static")
    for node in model.graph.node:
        if node.name in w.skipped:
            continue
        op, i, out = node.op_type, list(node.input) + [""] * 9, node.output[0]
        if op == "DequantizeLinear" and i[0] in w.values:  # a weight or bias
            w.constant(out, w.dequantized(i[0], i[1], i[2], axis_of(node)))
        elif op == "QuantizeLinear":
            readers = w.readers.get(out, [])
            if readers and all(r.op_type == "DequantizeLinear" for r in readers):  # a QDQ pair
                for r in readers:
                    w.fake_quant(i[0], r.output[0], i[1], i[2])
                    w.skipped.add(r.name)
            else:
                w.fake_quant(i[0], out, i[1], i[2])
        elif op == "DequantizeLinear":  # the output of an operator-form node: its input holds the value already
            w.op("Identity", [i[0]], out, node.name)
        elif op == "QLinearConv":
            inputs = [i[0], w.weight(i[3], i[4], i[5], 0)] + ([w.bias(i[8], i[1], i[4])] if i[8] else [])
            w.op("Conv", inputs, f"{out}/float", node.name, **attrs(node))
            w.fake_quant(f"{out}/float", out, i[6], i[7])
        elif op == "QLinearMatMul":
            w.op("MatMul", [i[0], w.weight(i[3], i[4], i[5], -1)], f"{out}/float", node.name)
            w.fake_quant(f"{out}/float", out, i[6], i[7])
        elif op == "QGemm":
            a = attrs(node)
            inputs = [i[0], w.weight(i[3], i[4], i[5], 0 if a.get("transB", 0) else 1)] + \
                ([w.bias(i[6], i[1], i[4])] if i[6] else [])
            gemm = {k: v for k, v in a.items() if k in ("alpha", "transA", "transB")}
            w.op("Gemm", inputs, f"{out}/float" if i[7] else out, node.name, **gemm)
            if i[7]:
                w.fake_quant(f"{out}/float", out, i[7], i[8])
        elif op in ("QLinearAdd", "QLinearMul"):
            w.op(op[len("QLinear"):], [i[0], i[3]], f"{out}/float", node.name)
            w.fake_quant(f"{out}/float", out, i[6], i[7])
        elif op in ("QLinearAveragePool", "QLinearGlobalAveragePool"):
            w.op(op[len("QLinear"):], [i[0]], f"{out}/float", node.name, **attrs(node, ("channels_last",)))
            w.fake_quant(f"{out}/float", out, i[3], i[4])
        elif op == "DynamicQuantizeLinear":
            w.fake_quant(i[0], out, mode="dynamic")
        elif op in ("ConvInteger", "MatMulInteger"):
            integer_layer(w, node)
        elif node.domain not in ("", "ai.onnx"):
            raise NotImplementedError(f"{node.name}: {node.domain}.{op}")
        else:
            w.nodes.append(node)
    return w.finish()


def integer_layer(w: Writer, node) -> None:
    """``ConvInteger/MatMulInteger -> Cast -> Mul(s_x s_w) [-> Add(bias)]``: a Conv (with the bias) or a MatMul
    (the graph reference folds the bias Add after it) of the dequantized input (the DynamicQuantizeLinear's output,
    already fake-quantized) and the dequantized weight."""
    x, q, _, zero_point = (list(node.input) + [""] * 4)[:4]
    cast = w.readers[node.output[0]][0]
    scaled = w.readers[cast.output[0]][0]
    scales = w.producer[next(i for i in scaled.input if i != cast.output[0])]
    w_scale = next(i for i in scales.input if i in w.values)
    w.skipped |= {cast.name, scaled.name}
    if node.op_type == "MatMulInteger":
        w.op("MatMul", [x, w.weight(q, w_scale, zero_point, -1)], scaled.output[0], node.name)
        return
    inputs, output = [x, w.weight(q, w_scale, zero_point, 0)], scaled.output[0]
    add = w.readers.get(scaled.output[0], [None])[0]
    if add is not None and add.op_type == "Add":
        bias = next(b for b in add.input if b != scaled.output[0])
        reshaped = w.producer.get(bias)
        value = w.values.get(bias, w.values.get(reshaped.input[0]) if reshaped is not None else None)
        if value is not None:
            inputs.append(w.constant(f"{bias}/float", value.reshape(-1)))
            output = add.output[0]
            w.skipped.add(add.name)
    w.op("Conv", inputs, output, node.name, **attrs(node))
