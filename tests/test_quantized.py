"""Quantized models in the three forms onnxruntime's quantizer writes (static QDQ, static operator form, dynamic),
quantized here with ``onnxruntime.quantization`` from small torch CNNs and an MLP.

Each compiled model keeps the source's outputs bit for bit and the quantized kernels onnxruntime runs (counted in
the graph it optimizes); its relevance is float32 and matches the float64 graph reference of the dequantized network
(tests/quantized_reference.py) whose activations are those the backward sees: onnxruntime's integer tensors for the
operator form (read from a run that exposes them), the op-by-op float32 run of the QDQ graph (onnxruntime without
graph optimizations; see passes/forward_reads.py), the spec's DynamicQuantizeLinear for dynamic quantization.
"""

from __future__ import annotations

import copy
import io
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import quantized_reference as qr
from helpers import Session, check_against_graph_reference
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from onnxlrp.errors import OnnxlrpError
from onnxlrp.graph import GraphView

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")
nn = torch.nn

RULES = ("epsilon", "rlrp", "epsilon-plus-flat")
FORMATS = ("qdq", "qoperator", "qoperator-u8-per-channel", "dynamic")
#: onnxruntime kernels of quantized arithmetic (DequantizeLinear is left out: a weight's DequantizeLinear that the
#: backward reads is duplicated, which changes no kernel)
QUANTIZED_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
                     "QLinearGlobalAveragePool", "QLinearConcat", "NhwcMaxPool", "QuantizeLinear", "ConvInteger",
                     "MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


class CNN(nn.Module):
    """Conv-ReLU, max pool, a residual block, average pool, dense."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1), \
            nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        y = torch.relu(self.c2(x))
        y = nn.functional.avg_pool2d(torch.relu(self.c3(y) + y), 2)
        return self.fc(y.flatten(1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.layers(x)


ARCHS = {"cnn": (CNN, (1, 16, 16)), "mlp": (MLP, (20,))}


def inputs(arch: str, seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *ARCHS[arch][1])).astype(np.float32)


class Calibration(quantization.CalibrationDataReader):
    def __init__(self, arch):
        self.batches = iter([{"x": inputs(arch, 100 + i)} for i in range(4)])

    def get_next(self):
        return next(self.batches, None)


def quantized_model(arch: str, fmt: str, tmp) -> onnx.ModelProto:
    torch.manual_seed(0)
    module = ARCHS[arch][0]().eval()
    buffer = io.BytesIO()
    dynamic = {"x": {0: "batch"}, "logits": {0: "batch"}} if arch == "mlp" else None  # a dynamic batch too
    torch.onnx.export(module, (torch.from_numpy(inputs(arch, 0)),), buffer, input_names=["x"],
                      output_names=["logits"], opset_version=17, dynamo=False, dynamic_axes=dynamic)
    source, target = tmp / f"{arch}.onnx", tmp / f"{arch}-{fmt}.onnx"
    source.write_bytes(buffer.getvalue())
    if fmt == "dynamic":
        quantization.quantize_dynamic(str(source), str(target))
    else:
        options = {"quant_format": quantization.QuantFormat.QDQ if fmt == "qdq" else quantization.QuantFormat.QOperator}
        if fmt == "qoperator-u8-per-channel":
            options.update(activation_type=quantization.QuantType.QUInt8, per_channel=True)
        quantization.quantize_static(str(source), str(target), Calibration(arch), **options)
    return onnx.load(str(target))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantized")
    return {(arch, fmt): quantized_model(arch, fmt, tmp) for arch in ARCHS for fmt in FORMATS}


def run(model: onnx.ModelProto, feeds: dict, optimized: str | None = None, level=None) -> dict:
    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = optimized
    if level is not None:
        options.graph_optimization_level = level
    session = Session(model, options)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def kernels(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in QUANTIZED_KERNELS)


def exposed(model: onnx.ModelProto, tensors: dict[str, int]) -> onnx.ModelProto:
    copy_ = copy.deepcopy(model)
    copy_.graph.output.extend(helper.make_tensor_value_info(t, elem, None) for t, elem in tensors.items())
    return copy_


def oracle(model: onnx.ModelProto, fmt: str, x: np.ndarray, source_logits: np.ndarray) -> bool:
    """Fill ``qr.ORACLE`` with the activations the backward sees; returns whether the reference is to use them."""
    qr.ORACLE.clear()
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if fmt == "dynamic":
        return False
    if fmt == "qdq":  # the op-by-op float32 run: every DequantizeLinear of an activation
        tensors = {n.output[0]: TensorProto.FLOAT for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] not in values and n.output[0] != "logits"}
        out = run(exposed(model, tensors), {"x": x}, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        qr.ORACLE.update({t: out[t].astype(np.float64) for t in tensors})
        qr.ORACLE["logits"] = out["logits"].astype(np.float64)
        return True
    quantized = {}  # integer tensor -> (scale, zero point)
    for n in model.graph.node:
        i = list(n.input) + [""] * 9
        params = {"QuantizeLinear": (i[1], i[2]), "QLinearConv": (i[6], i[7]), "QLinearMatMul": (i[6], i[7]),
                  "QLinearAdd": (i[6], i[7]), "QLinearMul": (i[6], i[7]), "QLinearAveragePool": (i[3], i[4]),
                  "QLinearGlobalAveragePool": (i[3], i[4]), "QGemm": (i[7], i[8])}.get(n.op_type)
        if params and params[0]:
            quantized[n.output[0]] = params
    types = {t: helper.np_dtype_to_tensor_dtype(values[zp].dtype) for t, (_, zp) in quantized.items()}
    out = run(exposed(model, types), {"x": x})
    assert np.array_equal(out["logits"], source_logits)  # reading the integer tensors changes nothing
    for t, (scale, zp) in quantized.items():
        qr.ORACLE[t] = (out[t].astype(np.float64) - values[zp].astype(np.float64)) * values[scale].astype(np.float64)
    return True


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_models(models, arch, fmt, tmp_path):
    """Every rule: outputs bit for bit, the same quantized kernels, relevance against the dequantized network."""
    source = models[(arch, fmt)]
    x = inputs(arch, 7)
    expected = run(source, {"x": x}, optimized=str(tmp_path / "source.onnx"))
    uses_oracle = oracle(source, fmt, x, expected["logits"])
    reference = qr.QuantizedReference(qr.dequantized_network(source, oracle=uses_oracle), "logits", "x")
    for rule in RULES:
        compiled = onnxlrp.compile(source, rule)
        out = run(compiled, {"x": x}, optimized=str(tmp_path / f"{rule}.onnx"))
        assert np.array_equal(out["logits"], expected["logits"]), rule
        assert kernels(tmp_path / f"{rule}.onnx") == kernels(tmp_path / "source.onnx"), rule
        assert out["relevance"].dtype == np.float32 and np.all(np.isfinite(out["relevance"]))
        check_against_graph_reference(reference, compiled, x, out, rule)


def test_forms_are_what_the_quantizer_writes(models):
    """The cases cover the quantized node types this module claims: QDQ pairs around float ops, QLinearConv,
    QGemm, QLinearAdd, QLinearAveragePool and an integer MaxPool, DynamicQuantizeLinear with ConvInteger and
    MatMulInteger."""
    ops = {fmt: {n.op_type for arch in ARCHS for n in models[(arch, fmt)].graph.node} for fmt in FORMATS}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MaxPool", "AveragePool", "Add"} <= ops["qdq"]
    assert {"QLinearConv", "QGemm", "QLinearAdd", "QLinearAveragePool", "MaxPool"} <= ops["qoperator"]
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"} <= ops["dynamic"]
    per_channel = [t for t in models[("cnn", "qoperator-u8-per-channel")].graph.initializer
                   if t.name.endswith("weight_scale")]
    assert per_channel and all(len(t.dims) == 1 and t.dims[0] > 1 for t in per_channel)


def test_dynamic_scale_carries_no_relevance(models):
    """DynamicQuantizeLinear's scale and zero point are computed from its input but carry no relevance: the
    data-flow view has no edge to them (``data_outputs``), and neither does a MaxPool's Indices output."""
    graph = models[("mlp", "dynamic")].graph
    quantizer = next(n for n in graph.node if n.op_type == "DynamicQuantizeLinear")
    flow = GraphView.of(graph).flow
    assert flow.has_edge(quantizer.input[0], quantizer.output[0])
    assert not flow.has_edge(quantizer.input[0], quantizer.output[1])
    assert not flow.has_edge(quantizer.input[0], quantizer.output[2])
    pool = helper.make_node("MaxPool", ["a"], ["y", "indices"], kernel_shape=[2, 2])
    flow = GraphView.of(helper.make_graph([pool], "g", [], [])).flow
    assert flow.has_edge("a", "y") and not flow.has_edge("a", "indices")


def test_channels_last_pool_is_refused():
    """An operator-form node that is not rewritten names itself and the reason in the one-line error."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 2])
    init = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("QLinearGlobalAveragePool", ["xq", "s", "z", "s", "z"], ["yq"], name="gap",
                              domain="com.microsoft", channels_last=1),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], init),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(OnnxlrpError, match="gap.*channels-last layout is not supported"):
        onnxlrp.compile(model, "epsilon")
