"""Small PyTorch classifiers with seeded random weights, their ONNX exports, and Zennit reference relevance.

Shared by ``test_zennit.py`` and ``test_torch_matrix.py`` (plain helpers, no pytest fixtures, so that nothing has to
live in a ``conftest.py``). Importing this module needs torch; the test modules skip cleanly without it.

* :data:`ARCHITECTURES`: name -> (builder, input shape without batch). Every model is in eval mode, its BatchNorms
  carry random running statistics and affine parameters (so folding them matters), and every element-wise
  activation or residual sum is its own module (Zennit attaches rules to modules).
* :func:`exported`: the ONNX export of an architecture with the TorchScript exporter (``dynamo=False``) or the
  dynamo exporter (``dynamo=True``), optionally with a dynamic batch dim or with BatchNormalization kept unfused;
  cached per process.
* :func:`zennit_relevance`: Zennit's relevance for the onnxlrp rule or composite of the same name, on a Zennit-facing
  copy of the model (BatchNorm merged into the preceding linear layer, residual ``a + b`` replaced by Zennit's
  ``stack`` + :class:`zennit.layer.Sum` pattern so that the Norm rule applies), with the output relevance
  ``one_hot(target) * logits``.
* :func:`import_zennit`: imports zennit where torchvision is missing (zennit imports it only for two canonizers).
"""

from __future__ import annotations

import copy
import functools
import importlib.machinery
import io
import sys
import types
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from onnxlrp.runtime import with_target

MAX_IR_VERSION = 10  # onnxruntime 1.2x reads IR <= 10
BATCH = 2
SEED = 0


# ---------------------------------------------------------------- zennit without torchvision

def import_zennit():
    """``import zennit``, with a throw-away torchvision stub when torchvision is not importable.

    zennit imports ``torchvision.models.resnet.{Bottleneck, BasicBlock}`` at import time (for its ResNet canonizer
    only). The stub lives in ``sys.modules`` only while zennit is imported: torch's ONNX exporter probes
    ``importlib.util.find_spec("torchvision")``, which must keep saying "not installed" afterwards.
    """
    if "zennit" in sys.modules:
        return sys.modules["zennit"]
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or installed but broken (an ABI mismatch with torch raises RuntimeError)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    else:
        import zennit

        return zennit

    names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
    stubs = {}
    for name in names:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name != names[-1])
        stubs[name] = module
    stubs["torchvision"].models = stubs["torchvision.models"]
    stubs["torchvision.models"].resnet = stubs["torchvision.models.resnet"]

    class Bottleneck(nn.Module):
        pass

    class BasicBlock(nn.Module):
        pass

    stubs["torchvision.models.resnet"].Bottleneck = Bottleneck
    stubs["torchvision.models.resnet"].BasicBlock = BasicBlock
    sys.modules.update(stubs)
    try:
        import zennit
    finally:
        for name in names:
            if sys.modules.get(name) is stubs[name]:
                del sys.modules[name]
    return zennit


# ---------------------------------------------------------------- building blocks

class Add(nn.Module):
    """A residual join ``a + b`` as a module: exported as a plain ONNX ``Add``; :func:`zennit_model` swaps it for
    :class:`ZennitAdd`."""

    def forward(self, a, b):
        return a + b


class ZennitAdd(nn.Module):
    """``Sum(stack([a, b], -1))``: Zennit's pattern for a join, which its composites map to the Norm rule."""

    def __init__(self):
        super().__init__()
        self.sum = import_zennit().layer.Sum(dim=-1)

    def forward(self, a, b):
        return self.sum(torch.stack([a, b], dim=-1))


class ConvBN(nn.Sequential):
    """Conv2d (no bias) followed by BatchNorm2d: the pair :func:`zennit_model` merges."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, groups=1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class LinearBN(nn.Sequential):
    """Linear followed by BatchNorm1d."""

    def __init__(self, cin, cout):
        super().__init__(nn.Linear(cin, cout), nn.BatchNorm1d(cout))


# ---------------------------------------------------------------- architectures

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), LinearBN(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                                    nn.Linear(24, 10))

    def forward(self, x):
        return self.layers(x)


class CNN(nn.Module):
    """Conv-BN-ReLU-MaxPool twice, then two dense layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(ConvBN(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class VGG(nn.Module):
    """VGG-like: stacked 3x3 convolutions, average pooling, a dense classifier with dropout."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = ConvBN(cout, cout, 3, 1, 1)
        self.shortcut = ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.conv2(self.relu1(self.conv1(x)))
        return self.relu2(self.add(out, x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """ResNet-like with basic blocks: an identity block and a stride-2 block with a 1x1 projection shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.conv1 = ConvBN(cin, mid, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = ConvBN(mid, mid, 3, stride, 1)
        self.relu2 = nn.ReLU()
        self.conv3 = ConvBN(mid, cout, 1)
        self.shortcut = ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.add = Add()
        self.relu3 = nn.ReLU()

    def forward(self, x):
        out = self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.relu3(self.add(out, x if self.shortcut is None else self.shortcut(x)))


class ResNetBottleneck(nn.Module):
    """ResNet-50-like: stem with max pooling, bottleneck blocks with projection and identity shortcuts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.blocks = nn.Sequential(Bottleneck(8, 4, 16), Bottleneck(16, 4, 16), Bottleneck(16, 8, 32, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))))


class DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, concatenated to its input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)  # follows a Concat: no linear layer to fold it into
        self.relu1 = nn.ReLU()
        self.conv1 = ConvBN(cin, 2 * growth, 1)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        new = self.conv2(self.relu2(self.conv1(self.relu1(self.norm(x)))))
        return torch.cat([x, new], 1)


class DenseNet(nn.Module):
    """DenseNet-like: dense blocks (Concat), a transition (BN-ReLU-Conv1x1-AvgPool), a final BN-ReLU-global pool."""

    def __init__(self, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = nn.Sequential(DenseLayer(8, growth), DenseLayer(8 + growth, growth))
        c = 8 + 2 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 8, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(8, growth), DenseLayer(8 + growth, growth))
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c, 10))

    def forward(self, x):
        return self.head(self.block2(self.transition(self.block1(self.stem(x)))))


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-5x5; 3x3 max pool-1x1) concatenated."""

    def __init__(self, cin):
        super().__init__()
        self.b1 = nn.Sequential(ConvBN(cin, 4, 1), nn.ReLU())
        self.b2 = nn.Sequential(ConvBN(cin, 4, 1), nn.ReLU(), ConvBN(4, 6, 3, padding=1), nn.ReLU())
        self.b3 = nn.Sequential(ConvBN(cin, 2, 1), nn.ReLU(), ConvBN(2, 4, 5, padding=2), nn.ReLU())
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvBN(cin, 4, 1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block = InceptionBlock(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(18, 10))

    def forward(self, x):
        return self.fc(self.pool(self.block(self.stem(x))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-ReLU6, 3x3 depthwise-ReLU6, linear 1x1 projection, residual Add if shapes
    match."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(ConvBN(cin, hidden, 1), nn.ReLU6())
        self.depthwise = nn.Sequential(ConvBN(hidden, hidden, 3, stride, 1, groups=hidden), nn.ReLU6())
        self.project = ConvBN(hidden, cout, 1)
        self.add = Add() if stride == 1 and cin == cout else None

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return out if self.add is None else self.add(x, out)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, 8, 3, 2, 1), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 4), InvertedResidual(8, 12, 2, 2),
                                    InvertedResidual(12, 12, 1, 2))
        self.head = nn.Sequential(ConvBN(12, 32, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand1, expand3):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand1, 1), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand3, 3, padding=1), nn.ReLU())

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet-like: ceil-mode max pooling, Fire modules, a 1x1 conv classifier with ReLU and global pooling."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8, 8), Fire(16, 4, 8, 8), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(16, 6, 12, 12))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(24, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                        nn.Flatten())

    def forward(self, x):
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "mlp": (MLP, (1, 8, 8)),
    "cnn_maxpool": (CNN, (3, 16, 16)),
    "vgg_avgpool": (VGG, (3, 16, 16)),
    "resnet_basic": (ResNet, (3, 16, 16)),
    "resnet_bottleneck": (ResNetBottleneck, (3, 16, 16)),
    "densenet": (DenseNet, (3, 16, 16)),
    "inception": (Inception, (3, 16, 16)),
    "mobilenetv2": (MobileNetV2, (3, 16, 16)),
    "squeezenet": (SqueezeNet, (3, 32, 32)),
}

# Exports by name: (exporter, opset).
EXPORTS = {"ts13": ("torchscript", 13), "ts17": ("torchscript", 17), "dynamo18": ("dynamo", 18)}


def build(arch: str, seed: int = SEED) -> nn.Module:
    """The architecture with seeded random weights and BatchNorm statistics, in eval mode (global RNG untouched)."""
    cls, _ = ARCHITECTURES[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.data = torch.empty(c).uniform_(0.5, 1.5)
                m.bias.data = torch.empty(c).normal_(0, 0.2)
                m.running_mean.data = torch.empty(c).normal_(0, 0.2)
                m.running_var.data = torch.empty(c).uniform_(0.5, 1.5)
    return model.eval()


@functools.cache
def model(arch: str) -> nn.Module:
    """The cached model of :func:`build` (treat as read-only)."""
    return build(arch)


def sample_input(arch: str, batch: int = BATCH, seed: int = 1) -> np.ndarray:
    """Inputs uniform in [0, 1) (the box of the z-box rule), float32."""
    _, shape = ARCHITECTURES[arch]
    return np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)


def torch_logits(arch: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(arch)(torch.from_numpy(x)).numpy()


# ---------------------------------------------------------------- ONNX export

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export(module: nn.Module, x: torch.Tensor, *, exporter: str, opset: int, dynamic_batch: bool = False,
           keep_batchnorm: bool = False, optimize: bool = True) -> onnx.ModelProto:
    """Export with ``torch.onnx.export``: ``exporter`` is "torchscript" (``dynamo=False``) or "dynamo".

    ``keep_batchnorm`` (TorchScript only): no constant folding and ``TrainingMode.PRESERVE`` on the eval-mode model,
    which keeps every ``BatchNormalization`` node (the exporter otherwise folds BN into the Conv).
    ``optimize=False`` (dynamo only): skip the exporter's ONNX optimizer (its default is on), which leaves
    BatchNormalization nodes and the exporter's raw patterns (a bias-free Conv gets a zero bias built by
    ``Expand(CastLike(0, input), Shape(weight)[:1])``).
    """
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            if not optimize:
                raise ValueError("optimize=False is a dynamo exporter option")
            buffer = io.BytesIO()
            kwargs = {"do_constant_folding": False, "training": torch.onnx.TrainingMode.PRESERVE} if keep_batchnorm \
                else {}
            torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch
                              else None, **kwargs)
            proto = onnx.load_from_string(buffer.getvalue())
        elif exporter == "dynamo":
            if keep_batchnorm:
                raise ValueError("keep_batchnorm is a TorchScript exporter option")
            program = torch.onnx.export(module, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], verbose=False, optimize=optimize,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None)
            proto = program.model_proto
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    return proto


@functools.cache
def _exported_bytes(arch: str, exporter: str, opset: int, dynamic_batch: bool, keep_batchnorm: bool,
                    optimize: bool) -> bytes:
    x = torch.from_numpy(sample_input(arch))
    proto = export(build(arch), x, exporter=exporter, opset=opset, dynamic_batch=dynamic_batch,
                   keep_batchnorm=keep_batchnorm, optimize=optimize)
    return proto.SerializeToString()


def exported(arch: str, export_name: str = "ts17", *, dynamic_batch: bool = False, keep_batchnorm: bool = False,
             optimize: bool = True) -> onnx.ModelProto:
    """A fresh copy of the cached export of ``arch`` by ``export_name`` (a key of :data:`EXPORTS`)."""
    exporter, opset = EXPORTS[export_name]
    return onnx.load_from_string(_exported_bytes(arch, exporter, opset, dynamic_batch, keep_batchnorm, optimize))


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


# ---------------------------------------------------------------- onnxruntime

def ort_session(proto: onnx.ModelProto):
    """An onnxruntime session (2 threads) that feeds a compiled model's ``target`` as -1 when a call leaves it out
    (:class:`helpers.Session`)."""
    import onnxruntime as ort
    from helpers import Session

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    return Session(proto, options)


def run_source(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The exported (uncompiled) model's logits in onnxruntime."""
    session = ort_session(proto)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def run_compiled(compiled: onnx.ModelProto, x: np.ndarray, target=None) -> dict[str, np.ndarray]:
    """All outputs of a compiled model by name; ``target`` None feeds -1 (the arg-max)."""
    session = ort_session(compiled)
    feeds = with_target(session, {INPUT_NAME: x}, target)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


# ---------------------------------------------------------------- Zennit reference

def _fuse(module: nn.Module) -> None:
    """Merge every ConvBN / LinearBN pair in place (the BN becomes Identity)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    for child in module.children():
        if isinstance(child, ConvBN):
            child[0], child[1] = fuse_conv_bn_eval(child[0], child[1]), nn.Identity()
        elif isinstance(child, LinearBN):
            child[0], child[1] = fuse_linear_bn_eval(child[0], child[1]), nn.Identity()
        else:
            _fuse(child)


def _swap_adds(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, Add):
            setattr(module, name, ZennitAdd())
        else:
            _swap_adds(child)


def zennit_model(arch: str, dtype=torch.float64) -> nn.Module:
    """The Zennit-facing copy: BatchNorm merged into the preceding linear layer (what onnxlrp's canonicalization
    does; the stand-alone pre-activation BNs of the DenseNet stay, and Zennit's composites pass relevance through
    them, as onnxlrp does through their per-channel affine map), residual Adds as ``stack`` + ``Sum``."""
    import_zennit()
    zmodel = copy.deepcopy(model(arch)).eval()
    _fuse(zmodel)
    _swap_adds(zmodel)
    return zmodel.to(dtype)


# onnxlrp single rules -> the Zennit rule and its constructor arguments
SINGLE_RULES = {
    "lrp0": ("Epsilon", {"epsilon": 0.0}),
    "epsilon": ("Epsilon", {"epsilon": 1e-6}),
    "gamma": ("Gamma", {"gamma": 0.25}),
    "zplus": ("ZPlus", {}),
    "alpha-beta": ("AlphaBeta", {"alpha": 2.0, "beta": 1.0}),
    "flat": ("Flat", {}),
    "wsquare": ("WSquare", {}),
    "zbox": ("ZBox", {"low": 0.0, "high": 1.0}),
}

COMPOSITES = ("epsilon-plus", "epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1",
              "epsilon-alpha2-beta1-flat", "cmp")

ZENNIT_RULES = tuple(SINGLE_RULES) + COMPOSITES


def zennit_composite(rule: str):
    """The Zennit composite equivalent to onnxlrp's plan for ``rule`` (a single rule or a named composite)."""
    zennit = import_zennit()
    from zennit import composites as zc
    from zennit import rules as zr
    from zennit.types import Activation, AvgPool, BatchNorm, Linear

    if rule in SINGLE_RULES:
        name, kwargs = SINGLE_RULES[rule]
        return zc.LayerMapComposite([
            (Activation, zr.Pass()),
            (zennit.layer.Sum, zr.Norm()),
            (AvgPool, zr.Norm()),
            (BatchNorm, zr.Pass()),
            (Linear, getattr(zr, name)(**kwargs)),
        ])
    return {
        "epsilon-plus": zc.EpsilonPlus,
        "epsilon-plus-flat": zc.EpsilonPlusFlat,
        "epsilon-gamma-box": lambda: zc.EpsilonGammaBox(low=0.0, high=1.0),
        "epsilon-alpha2-beta1": zc.EpsilonAlpha2Beta1,
        "epsilon-alpha2-beta1-flat": zc.EpsilonAlpha2Beta1Flat,
        "cmp": zc.EpsilonAlpha2Beta1Flat,  # flat on the first layer, alpha2-beta1 on convolutions, epsilon on dense
    }[rule]()


@functools.cache
def _zennit_cached(arch: str, rule: str, x_bytes: bytes, shape: tuple, target: tuple, dtype_name: str):
    import_zennit()
    from zennit.attribution import Gradient

    dtype = getattr(torch, dtype_name)
    x = torch.from_numpy(np.frombuffer(x_bytes, dtype=np.float32).reshape(shape).copy()).to(dtype)
    zmodel = zennit_model(arch, dtype)
    t = torch.as_tensor(target, dtype=torch.int64)

    def attr_output(logits):
        return torch.nn.functional.one_hot(t, logits.shape[1]).to(logits) * logits

    with Gradient(model=zmodel, composite=zennit_composite(rule)) as attributor:
        logits, relevance = attributor(x, attr_output)
    return logits.detach().numpy(), relevance.detach().numpy()


def zennit_relevance(arch: str, rule: str, x: np.ndarray, target, dtype=torch.float64):
    """(logits, relevance) by Zennit for ``rule`` on ``arch`` at ``x`` (float32) explaining ``target`` per sample.

    The reference runs in float64 by default (same float32 weights and inputs), so that it measures onnxlrp's own
    float32 error rather than adding Zennit's."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    target = tuple(int(t) for t in np.broadcast_to(np.asarray(target), (len(x),)))
    logits, relevance = _zennit_cached(arch, rule, x.tobytes(), x.shape, target, str(dtype).split(".")[-1])
    return logits.copy(), relevance.copy()


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest per-sample ``||a - b|| / ||b||``."""
    a = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    b = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-300)))
