"""Benchmark architectures: ResNet50, VGG16 and MobileNetV2, as ONNX graphs and as torch modules (for Zennit).

ONNX side (``onnx_model(arch, seed)``): built with ``onnx.helper``, float32, input ``input`` of shape
``[batch, 3, 224, 224]`` with a dynamic batch, output ``logits`` ``[batch, 1000]``. Weights are seeded random,
He-scaled (``std = sqrt(2 / fan_in)``). The graphs look like what exporters write: Conv without bias followed by a
``BatchNormalization`` node (ResNet50, MobileNetV2), residual ``Add``, ``MaxPool``, ``Clip(0, 6)`` as ReLU6,
depthwise Conv (``group = channels``), ``GlobalAveragePool`` + ``Flatten`` + ``Gemm`` (``transB = 1``).

Torch side (``torch_model(arch, onnx_model)``): the same three architectures written by hand (no torchvision),
with the ONNX model's initializers loaded by name (the ONNX initializer names are the modules' ``state_dict``
keys), so both compute the same logits. Residual joins are ``zennit.layer.Sum`` over ``torch.stack([a, b], -1)``
so that Zennit's composites apply their Norm rule there, as onnxlrp does for ``Add``. ``zennit_ready(module)``
merges every Conv+BatchNorm pair (what onnxlrp's canonicalization does at compile time).
"""

from __future__ import annotations

import functools
import sys
import types

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ARCHS = ("resnet50", "vgg16", "mobilenetv2")
OPSET = 17
INPUT, OUTPUT = "input", "logits"
IMAGE = (3, 224, 224)
CLASSES = 1000

RESNET50_LAYERS = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride), expansion 4
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
MOBILENETV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                   (6, 320, 1, 1))  # (expansion t, channels c, repeats n, first stride s)


# ---------------------------------------------------------------- ONNX

class OnnxNet:
    """A tape of ONNX nodes and seeded He-scaled initializers, named like a torch ``state_dict``."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _op(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        self.count += 1
        out = f"/{hint}/{op}_output_{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"/{hint}/{op}_{self.count}", **attrs))
        return out

    def _param(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def _he(self, shape, fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in)))

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0, groups: int = 1,
             bias: bool = False) -> str:
        fan_in = cin // groups * k * k
        inputs = [x, self._param(f"{name}.weight", self._he((cout, cin // groups, k, k), fan_in))]
        if bias:
            inputs.append(self._param(f"{name}.bias", self.rng.normal(0, 0.01, cout)))
        return self._op("Conv", inputs, name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                        group=groups, dilations=[1, 1])

    def bn(self, x: str, name: str, c: int, gain: float = 1.0) -> str:
        """BatchNormalization with plausible trained statistics; ``gain`` scales gamma (residual branch ends)."""
        r = self.rng
        params = [self._param(f"{name}.weight", gain * r.uniform(0.5, 1.5, c)),
                  self._param(f"{name}.bias", r.normal(0, 0.1, c)),
                  self._param(f"{name}.running_mean", r.normal(0, 0.1, c)),
                  self._param(f"{name}.running_var", r.uniform(0.5, 1.5, c))]
        return self._op("BatchNormalization", [x, *params], name, epsilon=1e-5, momentum=0.9)

    def relu(self, x: str, name: str) -> str:
        return self._op("Relu", [x], name)

    def relu6(self, x: str, name: str) -> str:
        if "clip.min" not in {t.name for t in self.inits}:
            self._param("clip.min", np.array(0.0))
            self._param("clip.max", np.array(6.0))
        return self._op("Clip", [x, "clip.min", "clip.max"], name)

    def maxpool(self, x: str, name: str, k: int, stride: int, pad: int = 0) -> str:
        return self._op("MaxPool", [x], name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)

    def add(self, a: str, b: str, name: str) -> str:
        return self._op("Add", [a, b], name)

    def flatten(self, x: str, name: str) -> str:
        return self._op("Flatten", [x], name, axis=1)

    def global_avg_pool(self, x: str, name: str) -> str:
        return self._op("GlobalAveragePool", [x], name)

    def gemm(self, x: str, name: str, fin: int, fout: int) -> str:
        w = self._param(f"{name}.weight", self._he((fout, fin), fin))
        b = self._param(f"{name}.bias", self.rng.normal(0, 0.01, fout))
        return self._op("Gemm", [x, w, b], name, transB=1)

    def model(self, out: str, name: str) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], [OUTPUT], name="/output/Identity"))
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *IMAGE])],
            [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", CLASSES])],
            self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="onnxlrp-bench-archs")
        model.ir_version = 8
        return model


def resnet50_onnx(seed: int = 0) -> onnx.ModelProto:
    net = OnnxNet(seed)
    x = net.relu(net.bn(net.conv(INPUT, "conv1", 3, 64, 7, 2, 3), "bn1", 64), "relu")
    x = net.maxpool(x, "maxpool", 3, 2, 1)
    cin = 64
    for li, (width, blocks, stride) in enumerate(RESNET50_LAYERS, start=1):
        for bi in range(blocks):
            p, s = f"layer{li}.{bi}", stride if bi == 0 else 1
            y = net.relu(net.bn(net.conv(x, f"{p}.conv1", cin, width, 1), f"{p}.bn1", width), f"{p}.relu1")
            y = net.relu(net.bn(net.conv(y, f"{p}.conv2", width, width, 3, s, 1), f"{p}.bn2", width), f"{p}.relu2")
            y = net.bn(net.conv(y, f"{p}.conv3", width, 4 * width, 1), f"{p}.bn3", 4 * width, gain=0.2)
            shortcut = x
            if bi == 0:
                shortcut = net.bn(net.conv(x, f"{p}.downsample.0", cin, 4 * width, 1, s), f"{p}.downsample.1",
                                  4 * width)
            x = net.relu(net.add(y, shortcut, f"{p}.add"), f"{p}.relu3")
            cin = 4 * width
    x = net.flatten(net.global_avg_pool(x, "avgpool"), "flatten")
    return net.model(net.gemm(x, "fc", 2048, CLASSES), "resnet50")


def vgg16_onnx(seed: int = 0) -> onnx.ModelProto:
    net = OnnxNet(seed)
    x, cin = INPUT, 3
    for i, v in enumerate(_vgg_layout()):
        if v == "M":
            x = net.maxpool(x, f"features.{i}", 2, 2)
        elif v == "R":
            x = net.relu(x, f"features.{i}")
        else:
            x = net.conv(x, f"features.{i}", cin, v, 3, 1, 1, bias=True)
            cin = v
    x = net.flatten(x, "flatten")
    x = net.relu(net.gemm(x, "classifier.0", 512 * 7 * 7, 4096), "classifier.1")
    x = net.relu(net.gemm(x, "classifier.3", 4096, 4096), "classifier.4")
    return net.model(net.gemm(x, "classifier.6", 4096, CLASSES), "vgg16")


def _vgg_layout() -> list:
    """torchvision's ``features`` indexing: every conv is followed by its ReLU ("R"), "M" is a max pool."""
    out = []
    for v in VGG16_CFG:
        out += ["M"] if v == "M" else [v, "R"]
    return out


def mobilenetv2_onnx(seed: int = 0) -> onnx.ModelProto:
    net = OnnxNet(seed)

    def conv_bn(x, name, cin, cout, k, stride=1, groups=1, act=True):
        y = net.bn(net.conv(x, f"{name}.0", cin, cout, k, stride, k // 2, groups), f"{name}.1", cout)
        return net.relu6(y, f"{name}.2") if act else y

    x = conv_bn(INPUT, "features.0", 3, 32, 3, 2)
    cin, i = 32, 1
    for t, c, n, s in MOBILENETV2_CFG:
        for r in range(n):
            stride, hidden, p = s if r == 0 else 1, cin * t, f"features.{i}.conv"
            y, j = x, 0
            if t != 1:
                y, j = conv_bn(y, f"{p}.{j}", cin, hidden, 1), j + 1
            y = conv_bn(y, f"{p}.{j}", hidden, hidden, 3, stride, groups=hidden)
            y = net.conv(y, f"{p}.{j + 1}", hidden, c, 1)
            y = net.bn(y, f"{p}.{j + 2}", c, gain=0.5 if stride == 1 and cin == c else 1.0)
            x = net.add(x, y, f"features.{i}.add") if stride == 1 and cin == c else y
            cin, i = c, i + 1
    x = conv_bn(x, f"features.{i}", cin, 1280, 1)
    x = net.flatten(net.global_avg_pool(x, "avgpool"), "flatten")
    return net.model(net.gemm(x, "classifier.1", 1280, CLASSES), "mobilenetv2")


BUILDERS = {"resnet50": resnet50_onnx, "vgg16": vgg16_onnx, "mobilenetv2": mobilenetv2_onnx}


def onnx_model(arch: str, seed: int = 0) -> onnx.ModelProto:
    """The ONNX model of ``arch`` (checked by ``onnx.checker``)."""
    model = BUILDERS[arch](seed)
    onnx.checker.check_model(model)
    return model


def sample_input(batch: int, seed: int = 1) -> np.ndarray:
    """Images in [0, 1) (inside the z-box bounds the composites use)."""
    return np.random.default_rng(seed).random((batch, *IMAGE), dtype=np.float32)


# ---------------------------------------------------------------- torch / Zennit

def import_zennit():
    """``import zennit`` where torchvision is absent: zennit imports ``torchvision.models.resnet.{Bottleneck,
    BasicBlock}`` at import time (for one canonizer), so a throw-away stub stands in while it is imported."""
    if "zennit" in sys.modules:
        return sys.modules["zennit"]
    names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
    present = {n: sys.modules.get(n) for n in names}
    try:
        import torchvision  # noqa: F401
        stub = False
    except Exception:
        stub = True
        mods = {n: types.ModuleType(n) for n in names}
        mods["torchvision"].models = mods["torchvision.models"]
        mods["torchvision.models"].resnet = mods["torchvision.models.resnet"]
        mods["torchvision.models.resnet"].Bottleneck = type("Bottleneck", (), {})
        mods["torchvision.models.resnet"].BasicBlock = type("BasicBlock", (), {})
        sys.modules.update(mods)
    try:
        import zennit
        import zennit.attribution  # noqa: F401
        import zennit.composites  # noqa: F401
        import zennit.layer  # noqa: F401
    finally:
        if stub:
            for n in names:
                if present[n] is None:
                    sys.modules.pop(n, None)
                else:
                    sys.modules[n] = present[n]
    return zennit


@functools.cache
def _torch_classes() -> dict:
    """The torch modules, defined on first use so that the ONNX builders need neither torch nor zennit."""
    import torch
    from torch import nn

    zennit = import_zennit()

    class StackSum(nn.Module):
        """A residual join as ``Sum(stack([a, b], -1))``: Zennit's composites give it the Norm rule."""

        def __init__(self):
            super().__init__()
            self.sum = zennit.layer.Sum(dim=-1)

        def forward(self, a, b):
            return self.sum(torch.stack([a, b], dim=-1))

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride, downsample):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
            self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
            self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride, bias=False),
                                            nn.BatchNorm2d(4 * width)) if downsample else None
            self.add = StackSum()

        def forward(self, x):
            y = self.relu1(self.bn1(self.conv1(x)))
            y = self.relu2(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return self.relu3(self.add(y, x if self.downsample is None else self.downsample(x)))

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.relu = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for li, (width, blocks, stride) in enumerate(RESNET50_LAYERS, start=1):
                layer = []
                for bi in range(blocks):
                    layer.append(Bottleneck(cin, width, stride if bi == 0 else 1, bi == 0))
                    cin = 4 * width
                setattr(self, f"layer{li}", nn.Sequential(*layer))
            self.avgpool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
            self.fc = nn.Linear(2048, CLASSES)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.flatten(self.avgpool(x)))

    class VGG16(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [], 3
            for v in _vgg_layout():
                if v == "M":
                    layers.append(nn.MaxPool2d(2, 2))
                elif v == "R":
                    layers.append(nn.ReLU())
                else:
                    layers.append(nn.Conv2d(cin, v, 3, 1, 1))
                    cin = v
            self.features, self.flatten = nn.Sequential(*layers), nn.Flatten()
            self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(),
                                            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(),
                                            nn.Linear(4096, CLASSES))

        def forward(self, x):
            return self.classifier(self.flatten(self.features(x)))

    def conv_bn(cin, cout, k, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = cin * t
            layers = [conv_bn(cin, hidden, 1)] if t != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                       nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout
            self.add = StackSum() if self.residual else None

        def forward(self, x):
            return self.add(x, self.conv(x)) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [conv_bn(3, 32, 3, 2)], 32
            for t, c, n, s in MOBILENETV2_CFG:
                for r in range(n):
                    layers.append(InvertedResidual(cin, c, s if r == 0 else 1, t))
                    cin = c
            layers.append(conv_bn(cin, 1280, 1))
            self.features = nn.Sequential(*layers)
            self.avgpool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, CLASSES))

        def forward(self, x):
            return self.classifier(self.flatten(self.avgpool(self.features(x))))

    return {"resnet50": ResNet50, "vgg16": VGG16, "mobilenetv2": MobileNetV2}


def torch_model(arch: str, model: onnx.ModelProto | None = None, seed: int = 0):
    """``arch`` as a torch module in eval mode with the weights of ``model`` (default: ``onnx_model(arch, seed)``)."""
    import torch

    module = _torch_classes()[arch]()
    model = model if model is not None else onnx_model(arch, seed)
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    state = module.state_dict()
    missing = [k for k in state if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise KeyError(f"{arch}: initializers missing for {missing[:5]}")
    module.load_state_dict({k: weights.get(k, v) for k, v in state.items()})
    return module.eval()


def zennit_ready(module):
    """Merge every Conv2d + BatchNorm2d pair in place (the BatchNorm becomes Identity), as onnxlrp folds them."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def visit(parent):
        children = list(parent.named_children())
        for (name, child), (next_name, nxt) in zip(children, children[1:], strict=False):
            if isinstance(child, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                setattr(parent, name, fuse_conv_bn_eval(child, nxt))
                setattr(parent, next_name, nn.Identity())
        for _, child in parent.named_children():
            visit(child)

    visit(module)
    return module.eval()


def zennit_composite(rule: str, x_shape=None):
    """Zennit's composite for an onnxlrp rule or composite name (cmp = EpsilonAlpha2Beta1Flat with one flat layer),
    or None where Zennit has no counterpart (R-LRP)."""
    import torch

    import_zennit()
    import zennit.layer
    from zennit import composites as zc
    from zennit import rules as zr
    from zennit.types import Activation, AvgPool, BatchNorm, Linear

    singles = {"lrp0": ("Epsilon", {"epsilon": 0.0}), "epsilon": ("Epsilon", {"epsilon": 1e-6}),
               "gamma": ("Gamma", {"gamma": 0.25}), "zplus": ("ZPlus", {}),
               "alpha-beta": ("AlphaBeta", {"alpha": 2.0, "beta": 1.0}), "flat": ("Flat", {}),
               "wsquare": ("WSquare", {})}
    if rule in singles:
        name, kwargs = singles[rule]
        return zc.LayerMapComposite([(Activation, zr.Pass()), (zennit.layer.Sum, zr.Norm()), (AvgPool, zr.Norm()),
                                     (BatchNorm, zr.Pass()), (Linear, getattr(zr, name)(**kwargs))])
    if rule == "epsilon-gamma-box":
        return zc.EpsilonGammaBox(low=torch.zeros(x_shape), high=torch.ones(x_shape))
    named = {"epsilon-plus": zc.EpsilonPlus, "epsilon-plus-flat": zc.EpsilonPlusFlat,
             "epsilon-alpha2-beta1": zc.EpsilonAlpha2Beta1, "epsilon-alpha2-beta1-flat": zc.EpsilonAlpha2Beta1Flat,
             "cmp": zc.EpsilonAlpha2Beta1Flat}
    return named[rule]() if rule in named else None
