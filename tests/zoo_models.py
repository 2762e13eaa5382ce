"""Tiny stand-ins for classic ONNX model-zoo classifiers, written the way the old converters wrote them.

Each builder returns a :class:`ZooModel`: an ``onnx.ModelProto`` at opset 7-9 (IR version 3 where the zoo files
were IR 3: every initializer is also listed as a graph input), random seeded weights, tiny channel counts and
small inputs. The old-converter idioms covered:

* Conv/Relu/LRN/MaxPool/Dropout (with its mask output named)/Gemm(transB=1)/Softmax (AlexNet, ZFNet, VGG19);
* ``BatchNormalization`` with the opset-7 ``spatial`` attribute, residual joins written as ``Sum``, bottleneck
  blocks and projection shortcuts (ResNet50-v1);
* BatchNorm written out as ``Mul``/``Add`` by ``[C, 1, 1]`` constants made by ``Unsqueeze`` of 1-D parameters,
  dense ``Concat`` joins (DenseNet121);
* parallel branches joined by ``Concat``, LRN, ``AveragePool`` with and without padding (Inception v1/v2);
* Fire modules, ``GlobalAveragePool`` then ``Softmax`` on a 4-D tensor (SqueezeNet);
* channel shuffle by ``Reshape``/``Transpose``/``Reshape``, group and depthwise convolutions (ShuffleNet);
* weights made by constant subgraphs: ``Constant`` -> ``Cast``/``Transpose``/``Reshape``, ``ConstantOfShape``
  biases (ZFNet, VGG19).

``bias=False`` builds a variant whose every linear bias (and BatchNorm shift) is exactly zero, so that LRP-0 and
LRP-epsilon conserve relevance: ``sum(R) == explained logit``.

``ZOO`` maps a name to its builder; ``BIAS_FREE`` names the architectures whose bias-free variant is checked for
conservation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxlrp.runtime import with_target

CLASSES = 10


@dataclass
class ZooModel:
    name: str
    model: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]  # the shape the tests feed (batch included)
    output_name: str  # the probability output
    logits: str  # the tensor the Softmax reads (what is explained)
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def sample(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).uniform(0.0, 1.0, self.input_shape).astype(np.float32)


class OldGraph:
    """A tape that writes nodes and initializers in the style of the early (2017-2018) ONNX exporters."""

    def __init__(self, name: str, *, opset: int, ir_version: int, seed: int, bias: bool = True):
        self.name = name
        self.opset = opset
        self.ir_version = ir_version
        self.rng = np.random.default_rng(seed)
        self.bias = bias
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.counter = 0

    # ------------------------------------------------------------ plumbing

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def init(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, n_out: int = 1, **attrs) -> str | list[str]:
        outputs = [self.fresh(hint or op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.fresh(f"{op}_node"), **attrs))
        return outputs[0] if n_out == 1 else outputs

    def constant(self, value: np.ndarray, hint: str = "const") -> str:
        """A ``Constant`` node (not an initializer)."""
        out = self.fresh(hint)
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.fresh("Constant_node"),
                                           value=numpy_helper.from_array(np.asarray(value), out + "_value")))
        return out

    def weight(self, shape, fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bias_value(self, n: int) -> np.ndarray:
        if not self.bias:
            return np.zeros(n, np.float32)
        return (self.rng.standard_normal(n) * 0.05).astype(np.float32)

    # ------------------------------------------------------------ layers

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0, group: int = 1,
             weights: str = "init") -> str:
        """``weights``: "init" (initializers), "cast_transpose" (a float64 Constant of W transposed to
        [k, k, cin, cout] -> Cast -> Transpose) or "reshape" (flat Constant -> Reshape, bias by ConstantOfShape)."""
        w = self.weight((cout, cin // group, k, k), cin // group * k * k)
        b = self.bias_value(cout)
        if weights == "init":
            w_name = self.init("conv_W", w)
            inputs = [x, w_name] + ([self.init("conv_B", b)] if self.bias else [])
        elif weights == "cast_transpose":
            src = self.constant(w.transpose(2, 3, 1, 0).astype(np.float64), "conv_W_hwio")
            cast = self.node("Cast", [src], "conv_W_f32", to=TensorProto.FLOAT)
            w_name = self.node("Transpose", [cast], "conv_W", perm=[3, 2, 0, 1])
            inputs = [x, w_name, self.init("conv_B", b)]
        elif weights == "reshape":
            flat = self.constant(w.reshape(-1), "conv_W_flat")
            shape = self.constant(np.array(w.shape, np.int64), "conv_W_shape")
            w_name = self.node("Reshape", [flat, shape], "conv_W")
            if self.bias:
                fill = float(self.rng.uniform(0.01, 0.05))
                bias = self.node("ConstantOfShape", [self.constant(np.array([cout], np.int64), "bias_shape")],
                                 "conv_B", value=helper.make_tensor("value", TensorProto.FLOAT, [1], [fill]))
                inputs = [x, w_name, bias]
            else:
                inputs = [x, w_name]
        else:
            raise ValueError(weights)
        return self.node("Conv", inputs, "conv", kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad] * 4, group=group)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], "relu")

    def lrn(self, x: str) -> str:
        return self.node("LRN", [x], "norm", size=5, alpha=1e-4, beta=0.75, bias=1.0)

    def maxpool(self, x: str, k: int, stride: int, pad: int = 0) -> str:
        return self.node("MaxPool", [x], "pool", kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)

    def avgpool(self, x: str, k: int, stride: int, pad: int = 0, count_include_pad: int | None = None) -> str:
        attrs = {"count_include_pad": count_include_pad} if count_include_pad is not None else {}
        return self.node("AveragePool", [x], "pool", kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                         **attrs)

    def batchnorm(self, x: str, c: int) -> str:
        """``BatchNormalization`` (opset 7: with ``spatial=1``, as the zoo files have it)."""
        scale = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        if self.bias:
            beta = (self.rng.standard_normal(c) * 0.1).astype(np.float32)
            mean = (self.rng.standard_normal(c) * 0.1).astype(np.float32)
        else:
            beta = mean = np.zeros(c, np.float32)
        attrs = {"epsilon": 1e-5}
        if self.opset < 9:
            attrs["spatial"] = 1
        params = [self.init(n, v) for n, v in (("bn_scale", scale), ("bn_B", beta), ("bn_mean", mean),
                                                ("bn_var", var))]
        return self.node("BatchNormalization", [x, *params], "bn", **attrs)

    def affine_bn(self, x: str, c: int) -> str:
        """BatchNorm written out as ``x * Unsqueeze(scale) + Unsqueeze(shift)`` (DenseNet-style exports)."""
        scale = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        shift = (self.rng.standard_normal(c) * 0.1).astype(np.float32) if self.bias else np.zeros(c, np.float32)
        s = self.node("Unsqueeze", [self.init("bn_scale_1d", scale)], "bn_scale", axes=[1, 2])
        t = self.node("Unsqueeze", [self.init("bn_shift_1d", shift)], "bn_shift", axes=[1, 2])
        return self.node("Add", [self.node("Mul", [x, s], "bn_mul"), t], "bn_add")

    def dropout(self, x: str, with_mask: bool = True) -> str:
        out = self.node("Dropout", [x], "drop", n_out=2 if with_mask else 1, ratio=0.5)
        return out[0] if with_mask else out

    def flatten(self, x: str) -> str:
        return self.node("Flatten", [x], "flatten", axis=1)

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.node("Reshape", [x, self.init("reshape_shape", np.array(shape, np.int64))], "reshape")

    def gemm(self, x: str, fin: int, fout: int, weights: str = "init") -> str:
        """Gemm with ``transB=1`` (W is [out, in]). opset < 11 requires C, so a bias-free layer gets zeros.
        ``weights="cast_transpose"``: W comes from a float64 Constant of W^T -> Cast -> Transpose."""
        w = self.weight((fout, fin), fin)
        if weights == "cast_transpose":
            src = self.constant(w.T.astype(np.float64), "fc_W_T")
            w_name = self.node("Transpose", [self.node("Cast", [src], "fc_W_T32", to=TensorProto.FLOAT)], "fc_W",
                               perm=[1, 0])
        else:
            w_name = self.init("fc_W", w)
        return self.node("Gemm", [x, w_name, self.init("fc_B", self.bias_value(fout))], "fc", transB=1,
                         alpha=1.0, beta=1.0)

    def softmax(self, x: str, name: str = "prob") -> str:
        self.nodes.append(helper.make_node("Softmax", [x], [name], name=self.fresh("Softmax_node"), axis=1))
        self.logits = x
        return name

    # ------------------------------------------------------------ the model

    def zoo(self, x: str, input_shape: list, out: str, output_shape: list, feed: tuple, notes: str) -> ZooModel:
        return ZooModel(self.name, self.build(x, input_shape, out, output_shape), x, feed, out, self.logits, notes)

    def build(self, input_name: str, input_shape: list, output: str, output_shape: list) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)]
        if self.ir_version < 4:  # IR 3: every initializer must also be a graph input
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.initializers]
        graph = helper.make_graph(self.nodes, self.name, inputs,
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
                                  initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="zoo-style", ir_version=self.ir_version)
        onnx.checker.check_model(model)
        return model


# ---------------------------------------------------------------- architectures


def alexnet(seed: int = 0, bias: bool = True) -> ZooModel:
    """bvlc_alexnet as Caffe2 exported it: opset 7, IR 3, LRN after conv1/conv2, Dropout, Gemm(transB)."""
    g = OldGraph("alexnet", opset=7, ir_version=3, seed=seed, bias=bias)
    x = "data_0"
    h = g.relu(g.conv(x, 3, 8, 5, stride=2, pad=2))  # 32 -> 16
    h = g.maxpool(g.lrn(h), 3, 2)  # 16 -> 7
    h = g.relu(g.conv(h, 8, 12, 3, pad=1, group=2))
    h = g.maxpool(g.lrn(h), 3, 2)  # 7 -> 3
    h = g.relu(g.conv(h, 12, 16, 3, pad=1))
    h = g.relu(g.conv(h, 16, 16, 3, pad=1, group=2))
    h = g.relu(g.conv(h, 16, 12, 3, pad=1, group=2))
    h = g.maxpool(h, 3, 2, pad=1)  # 3 -> 2
    h = g.reshape(h, [1, -1])  # the zoo file hard-codes batch 1
    h = g.dropout(g.relu(g.gemm(h, 48, 32)))
    h = g.dropout(g.relu(g.gemm(h, 32, 32)))
    out = g.softmax(g.gemm(h, 32, CLASSES))
    return g.zoo(x, [1, 3, 32, 32], out, [1, CLASSES], (1, 3, 32, 32),
                 "opset 7, IR 3, LRN, Dropout(mask), Reshape [1,-1], group conv")


def zfnet(seed: int = 1, bias: bool = True) -> ZooModel:
    """zfnet512: opset 8, IR 3; weights from float64 Constants through Cast and Transpose."""
    g = OldGraph("zfnet", opset=8, ir_version=3, seed=seed, bias=bias)
    x = "gpu_0/data_0"
    h = g.relu(g.conv(x, 3, 8, 7, stride=2, pad=1, weights="cast_transpose"))  # 32 -> 14
    h = g.lrn(g.maxpool(h, 3, 2, pad=1))  # 14 -> 7
    h = g.relu(g.conv(h, 8, 12, 3, pad=1, weights="cast_transpose"))
    h = g.lrn(g.maxpool(h, 3, 2, pad=1))  # 7 -> 4
    h = g.relu(g.conv(h, 12, 16, 3, pad=1))
    h = g.relu(g.conv(h, 16, 16, 3, pad=1))
    h = g.maxpool(g.relu(g.conv(h, 16, 8, 3, pad=1)), 2, 2)  # 4 -> 2
    h = g.flatten(h)
    h = g.dropout(g.relu(g.gemm(h, 32, 24, weights="cast_transpose")))
    h = g.dropout(g.relu(g.gemm(h, 24, 24)), with_mask=False)
    out = g.softmax(g.gemm(h, 24, CLASSES), "gpu_0/softmax_1")
    return g.zoo(x, ["N", 3, 32, 32], out, ["N", CLASSES], (2, 3, 32, 32),
                 "opset 8, IR 3, Constant(f64) -> Cast -> Transpose weights")


def vgg19(seed: int = 2, bias: bool = True) -> ZooModel:
    """vgg19: opset 9, IR 4; 16 convolutions in 5 blocks, weights from Constant -> Reshape, ConstantOfShape bias."""
    g = OldGraph("vgg19", opset=9, ir_version=4, seed=seed, bias=bias)
    x = "data"
    h, cin = x, 3
    for block, (reps, cout) in enumerate(((2, 4), (2, 6), (4, 8), (4, 8), (4, 8))):
        for i in range(reps):
            h = g.relu(g.conv(h, cin, cout, 3, pad=1, weights="reshape" if (block + i) % 2 == 0 else "init"))
            cin = cout
        h = g.maxpool(h, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 2 -> 1
    h = g.flatten(h)
    h = g.dropout(g.relu(g.gemm(h, 8, 24)))
    h = g.dropout(g.relu(g.gemm(h, 24, 24)))
    out = g.softmax(g.gemm(h, 24, CLASSES), "vgg0_dense2_fwd_softmax")
    return g.zoo(x, ["N", 3, 32, 32], out, ["N", CLASSES], (2, 3, 32, 32),
                 "opset 9, 16 convs, Constant -> Reshape weights, ConstantOfShape biases")


def resnet50_v1(seed: int = 3, bias: bool = True) -> ZooModel:
    """resnet50 v1 (Caffe2): opset 7, IR 3, BatchNormalization(spatial=1), bottlenecks, projection, Sum joins."""
    g = OldGraph("resnet50_v1", opset=7, ir_version=3, seed=seed, bias=bias)
    x = "gpu_0/data_0"

    def conv_bn(h, cin, cout, k, stride=1, pad=0, relu=True):
        h = g.batchnorm(g.conv(h, cin, cout, k, stride, pad), cout)
        return g.relu(h) if relu else h

    def bottleneck(h, cin, mid, cout, stride):
        r = conv_bn(h, cin, mid, 1, stride)
        r = conv_bn(r, mid, mid, 3, 1, 1)
        r = conv_bn(r, mid, cout, 1, relu=False)
        short = conv_bn(h, cin, cout, 1, stride, relu=False) if (cin != cout or stride != 1) else h
        return g.relu(g.node("Sum", [r, short], "res"))

    h = conv_bn(x, 3, 8, 7, 2, 3)  # 32 -> 16
    h = g.maxpool(h, 3, 2, pad=1)  # 16 -> 8
    h = bottleneck(h, 8, 4, 16, 1)  # projection (channels)
    h = bottleneck(h, 16, 4, 16, 1)  # identity
    h = bottleneck(h, 16, 8, 24, 2)  # projection (stride) 8 -> 4
    h = bottleneck(h, 24, 8, 24, 1)
    h = g.node("GlobalAveragePool", [h], "pool5")
    h = g.reshape(h, [1, 24])
    out = g.softmax(g.gemm(h, 24, CLASSES), "gpu_0/softmax_1")
    return g.zoo(x, [1, 3, 32, 32], out, [1, CLASSES], (1, 3, 32, 32),
                 "opset 7, IR 3, BatchNormalization(spatial), Sum joins, projections")


def densenet121(seed: int = 4, bias: bool = True) -> ZooModel:
    """densenet121: opset 9, IR 3, BN as Mul/Add by Unsqueeze'd constants, dense Concat, transition AveragePool."""
    g = OldGraph("densenet121", opset=9, ir_version=3, seed=seed, bias=bias)
    x = "data_0"
    growth = 4
    h = g.conv(x, 3, 8, 7, stride=2, pad=3)  # 32 -> 16
    h = g.maxpool(g.relu(g.affine_bn(h, 8)), 3, 2, pad=1)  # 16 -> 8
    c = 8
    for block in range(2):
        for _ in range(3):
            y = g.conv(g.relu(g.affine_bn(h, c)), c, 2 * growth, 1)
            y = g.conv(g.relu(g.affine_bn(y, 2 * growth)), 2 * growth, growth, 3, pad=1)
            h = g.node("Concat", [h, y], "concat", axis=1)
            c += growth
        if block == 0:  # transition
            h = g.conv(g.relu(g.affine_bn(h, c)), c, c // 2, 1)
            c //= 2
            h = g.avgpool(h, 2, 2)  # 8 -> 4
    h = g.relu(g.affine_bn(h, c))
    h = g.node("GlobalAveragePool", [h], "pool")
    h = g.conv(h, c, CLASSES, 1)  # the zoo file's classifier is a 1x1 convolution
    h = g.reshape(h, [0, -1])
    out = g.softmax(h, "fc6_1")
    return g.zoo(x, ["N", 3, 32, 32], out, ["N", CLASSES], (2, 3, 32, 32),
                 "opset 9, IR 3, Unsqueeze(1-D) -> Mul/Add BatchNorm, Concat, 1x1-conv classifier")


def inception_v1(seed: int = 5, bias: bool = True) -> ZooModel:
    """bvlc_googlenet: opset 7, IR 3, LRN, four-branch modules joined by Concat, AveragePool, Dropout."""
    g = OldGraph("inception_v1", opset=7, ir_version=3, seed=seed, bias=bias)
    x = "data_0"

    def module(h, cin, c1, c3r, c3, c5r, c5, cp):
        b1 = g.relu(g.conv(h, cin, c1, 1))
        b2 = g.relu(g.conv(g.relu(g.conv(h, cin, c3r, 1)), c3r, c3, 3, pad=1))
        b3 = g.relu(g.conv(g.relu(g.conv(h, cin, c5r, 1)), c5r, c5, 5, pad=2))
        b4 = g.relu(g.conv(g.maxpool(h, 3, 1, pad=1), cin, cp, 1))
        return g.node("Concat", [b1, b2, b3, b4], "inception", axis=1), c1 + c3 + c5 + cp

    h = g.relu(g.conv(x, 3, 8, 7, stride=2, pad=3))  # 32 -> 16
    h = g.lrn(g.maxpool(h, 3, 2, pad=1))  # 16 -> 8 (the zoo file pads end only; symmetric here)
    h = g.relu(g.conv(h, 8, 8, 1))
    h = g.maxpool(g.lrn(g.relu(g.conv(h, 8, 12, 3, pad=1))), 3, 2, pad=1)  # 8 -> 4
    h, c = module(h, 12, 4, 4, 6, 2, 3, 3)
    h, c = module(h, c, 6, 4, 6, 2, 4, 4)
    h = g.avgpool(h, 4, 1)  # 4 -> 1
    h = g.dropout(h)
    h = g.reshape(h, [0, -1])
    out = g.softmax(g.gemm(h, c, CLASSES), "prob_1")
    return g.zoo(x, ["N", 3, 32, 32], out, ["N", CLASSES], (2, 3, 32, 32),
                 "opset 7, IR 3, LRN, 4-branch Concat, AveragePool 4x4")


def inception_v2(seed: int = 6, bias: bool = True) -> ZooModel:
    """inception_v2 (Caffe2): opset 8, IR 3, BatchNormalization everywhere, 3x3-3x3 branch, padded average-pool
    branch (count_include_pad=0), stride-2 reduction module with a max-pool branch."""
    g = OldGraph("inception_v2", opset=8, ir_version=3, seed=seed, bias=bias)
    x = "data_0"

    def cbr(h, cin, cout, k, stride=1, pad=0):
        return g.relu(g.batchnorm(g.conv(h, cin, cout, k, stride, pad), cout))

    def module(h, cin, c1, c3r, c3, d3r, d3, cp):
        b1 = cbr(h, cin, c1, 1)
        b2 = cbr(cbr(h, cin, c3r, 1), c3r, c3, 3, pad=1)
        b3 = cbr(cbr(cbr(h, cin, d3r, 1), d3r, d3, 3, pad=1), d3, d3, 3, pad=1)
        b4 = cbr(g.avgpool(h, 3, 1, pad=1, count_include_pad=0), cin, cp, 1)
        return g.node("Concat", [b1, b2, b3, b4], "inception", axis=1), c1 + c3 + d3 + cp

    def reduction(h, cin, c3r, c3, d3r, d3):
        b1 = cbr(cbr(h, cin, c3r, 1), c3r, c3, 3, stride=2, pad=1)
        b2 = cbr(cbr(cbr(h, cin, d3r, 1), d3r, d3, 3, pad=1), d3, d3, 3, stride=2, pad=1)
        b3 = g.maxpool(h, 3, 2, pad=1)
        return g.node("Concat", [b1, b2, b3], "reduction", axis=1), c3 + d3 + cin

    h = cbr(x, 3, 8, 7, 2, 3)  # 32 -> 16
    h = g.maxpool(h, 3, 2, pad=1)  # 16 -> 8
    h = cbr(cbr(h, 8, 8, 1), 8, 12, 3, pad=1)
    h, c = module(h, 12, 4, 4, 4, 2, 4, 2)
    h, c = reduction(h, c, 4, 6, 2, 4)  # 8 -> 4
    h = g.avgpool(h, 4, 1)
    h = g.flatten(h)
    out = g.softmax(g.gemm(h, c, CLASSES), "prob_1")
    return g.zoo(x, ["N", 3, 32, 32], out, ["N", CLASSES], (2, 3, 32, 32),
                 "opset 8, IR 3, BatchNormalization, padded AveragePool branch, reduction Concat")


def squeezenet(seed: int = 7, bias: bool = True) -> ZooModel:
    """squeezenet1.1: opset 7, IR 3, Fire modules, 1x1-conv classifier, GlobalAveragePool, Softmax on 4-D."""
    g = OldGraph("squeezenet", opset=7, ir_version=3, seed=seed, bias=bias)
    x = "data_0"

    def fire(h, cin, s, e):
        sq = g.relu(g.conv(h, cin, s, 1))
        return g.node("Concat", [g.relu(g.conv(sq, s, e, 1)), g.relu(g.conv(sq, s, e, 3, pad=1))], "fire",
                      axis=1), 2 * e

    h = g.maxpool(g.relu(g.conv(x, 3, 8, 3, stride=2)), 3, 2)  # 32 -> 15 -> 7
    h, c = fire(h, 8, 4, 6)
    h, c = fire(h, c, 4, 6)
    h = g.maxpool(h, 3, 2)  # 7 -> 3
    h, c = fire(h, c, 6, 8)
    h = g.dropout(h)
    h = g.relu(g.conv(h, c, CLASSES, 1))
    h = g.node("GlobalAveragePool", [h], "pool10")
    out = g.softmax(h, "softmaxout_1")
    return g.zoo(x, [1, 3, 32, 32], out, [1, CLASSES, 1, 1], (1, 3, 32, 32),
                 "opset 7, IR 3, Fire Concat, GlobalAveragePool -> Softmax on [1,C,1,1]")


def shufflenet(seed: int = 8, bias: bool = True) -> ZooModel:
    """shufflenet (Caffe2): opset 9, IR 4, group 1x1 convs, channel shuffle Reshape/Transpose/Reshape, depthwise
    3x3, stride-2 units joining an AveragePool shortcut by Concat, stride-1 units by Sum."""
    g = OldGraph("shufflenet", opset=9, ir_version=4, seed=seed, bias=bias)
    x = "gpu_0/data_0"
    groups = 2

    def shuffle(h, c, size):
        h = g.reshape(h, [0, groups, c // groups, size, size])
        h = g.node("Transpose", [h], "shuffle", perm=[0, 2, 1, 3, 4])
        return g.reshape(h, [0, c, size, size])

    def unit(h, cin, cout, stride, size, first_group=groups):
        mid = 8
        out_size = size // stride
        r = g.relu(g.batchnorm(g.conv(h, cin, mid, 1, group=first_group), mid))
        r = shuffle(r, mid, size)
        r = g.batchnorm(g.conv(r, mid, mid, 3, stride, 1, group=mid), mid)
        branch_out = cout - cin if stride == 2 else cout
        r = g.batchnorm(g.conv(r, mid, branch_out, 1, group=groups), branch_out)
        if stride == 2:
            short = g.avgpool(h, 3, 2, pad=1)
            return g.relu(g.node("Concat", [short, r], "unit", axis=1)), out_size
        return g.relu(g.node("Sum", [h, r], "unit")), out_size

    h = g.relu(g.conv(x, 3, 8, 3, stride=2, pad=1))  # 32 -> 16
    h = g.maxpool(h, 3, 2, pad=1)  # 16 -> 8
    h, size = unit(h, 8, 16, 2, 8, first_group=1)  # 8 -> 4
    h, size = unit(h, 16, 16, 1, size)
    h, size = unit(h, 16, 32, 2, size)  # 4 -> 2
    h, size = unit(h, 32, 32, 1, size)
    h = g.node("GlobalAveragePool", [h], "pool")
    h = g.flatten(h)
    out = g.softmax(g.gemm(h, 32, CLASSES), "gpu_0/softmax_1")
    return g.zoo(x, ["N", 3, 32, 32], out, ["N", CLASSES], (2, 3, 32, 32),
                 "opset 9, IR 4, channel shuffle, depthwise/group conv, Concat and Sum units")


# ---------------------------------------------------------------- Keras-style graphs (keras2onnx era)


def keras_cnn(seed: int = 9, bias: bool = True, opset: int = 11) -> ZooModel:
    """What keras2onnx wrote for a small NHWC Keras CNN: a Transpose pair around every NCHW op, a BatchNorm as
    ``Mul``/``Add`` over the last (channel) axis, Flatten as a Reshape whose shape is computed from ``Shape``,
    Dense as ``MatMul`` + ``Add``, and the Softmax inside the model."""
    g = OldGraph("keras_cnn", opset=opset, ir_version=6, seed=seed, bias=bias)
    x = "input_1"

    def nchw(h):
        return g.node("Transpose", [h], "to_nchw", perm=[0, 3, 1, 2])

    def nhwc(h):
        return g.node("Transpose", [h], "to_nhwc", perm=[0, 2, 3, 1])

    h = g.relu(nhwc(g.conv(nchw(x), 3, 4, 3, pad=1)))  # 12x12x4, Relu in NHWC
    scale = g.init("bn_scale", g.rng.uniform(0.5, 1.5, 4).astype(np.float32))
    h = g.node("Add", [g.node("Mul", [h, scale], "bn_mul"), g.init("bn_shift", g.bias_value(4))], "bn_add")
    h = nhwc(g.maxpool(nchw(h), 2, 2))  # 6x6x4
    h = nhwc(g.relu(g.conv(nchw(h), 4, 6, 3)))  # 4x4x6
    batch = g.node("Gather", [g.node("Shape", [h], "shape"), g.init("zero", np.array(0))], "batch")
    if opset >= 13:
        batch = g.node("Unsqueeze", [batch, g.init("axes", np.array([0]))], "batch_1d")
    else:
        batch = g.node("Unsqueeze", [batch], "batch_1d", axes=[0])
    shape = g.node("Concat", [batch, g.init("minus_one", np.array([-1], np.int64))], "flat_shape", axis=0)
    h = g.node("Reshape", [h, shape], "flatten")

    def dense(h, fin, fout):
        w = g.init("dense_kernel", g.weight((fin, fout), fin))
        return g.node("Add", [g.node("MatMul", [h, w], "dense_matmul"), g.init("dense_bias", g.bias_value(fout))],
                      "dense_biasadd")

    h = g.relu(dense(h, 96, 16))
    logits = dense(h, 16, CLASSES)
    g.nodes.append(helper.make_node("Softmax", [logits], ["dense_2"], name="dense_2/Softmax", axis=-1))
    g.logits = logits
    return g.zoo(x, ["N", 12, 12, 3], "dense_2", ["N", CLASSES], (2, 12, 12, 3),
                 "keras2onnx style: NHWC, Transpose pairs, Shape-computed Reshape, MatMul+Add, Softmax")


ZOO = {
    "alexnet": alexnet,
    "zfnet": zfnet,
    "vgg19": vgg19,
    "resnet50_v1": resnet50_v1,
    "densenet121": densenet121,
    "inception_v1": inception_v1,
    "inception_v2": inception_v2,
    "squeezenet": squeezenet,
    "shufflenet": shufflenet,
}

# Architectures whose bias-free variant is checked for conservation (pools, LRN, Sum/Concat joins, BN forms).
BIAS_FREE = ("alexnet", "resnet50_v1", "densenet121", "inception_v2", "shufflenet")

RULES = ("rlrp", "epsilon", "epsilon-plus-flat", "epsilon-gamma-box", "cmp")


# ---------------------------------------------------------------- running (shared by the tests)

def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # IR-3 files list initializers as inputs; onnxruntime warns about each
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_source(model: onnx.ModelProto, feeds: dict, names: list[str]) -> list:
    """The source model's tensors ``names`` (graph outputs or intermediates): onnxruntime, or the ONNX reference
    evaluator where onnxruntime refuses the (old) file."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    for name in names:
        if name not in declared:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    try:
        sess = session(probe)
    except Exception:  # noqa: BLE001 - any load failure: fall back to the reference evaluator
        return ReferenceEvaluator(probe).run(names, feeds)
    return sess.run(names, feeds)


def run_compiled(compiled: onnx.ModelProto, feeds: dict, target=None) -> dict:
    """Every output of a compiled model, by name (``target`` None: -1, the arg-max)."""
    sess = session(compiled)
    feeds = with_target(sess, feeds, target)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
