"""Networks with gated activations, squeeze-and-excitation gates and normalizations, with random weights, and their
ONNX exports (test-only; cached per process).

* :data:`TORCH_MODELS`: torchvision EfficientNet-B0 (SiLU, SE gates with Sigmoid), MobileNetV3-Small (Hardswish,
  ReLU, SE gates with Hardsigmoid), ConvNeXt-T (LayerNorm, GELU, layer scale) and a YOLO-like SiLU network (C2f
  blocks with Split/Concat and residual Adds, SPPF max pools), all at 64x64 (YOLO: 32x32). Their BatchNorms get
  random affine parameters and running statistics calibrated on random batches, so that the activations of the
  deep networks stay near 1 (torchvision's initialization lets EfficientNet's logits fall to 1e-14).
* :func:`torch_export`: the TorchScript (opset 13 or 17) or dynamo (opset 18) export.
* :func:`keras_export`: Keras ``applications`` EfficientNetB0 / MobileNetV3Small with ``weights=None``, or a small
  Keras network with LayerNormalization and GroupNormalization, through tf2onnx at opset 13.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import numpy as np
import onnx
import torch
from torch import nn
from torch_models import export
from vision_models import import_torchvision

INPUT = "input"
SIZE = 64


@contextlib.contextmanager
def one_thread():
    """torch on one thread: its float64 (and train-mode) convolutions run 10-25x slower with two threads on a busy
    two-core machine (the test suite's); restores the thread count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- a YOLO-like SiLU network

class ConvBNSiLU(nn.Sequential):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = ConvBNSiLU(c, c, 3), ConvBNSiLU(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))

    def lrp_forward(self, tape, x):
        from lrp_tape import run

        return tape.add(x, run(tape, self.cv2, run(tape, self.cv1, x)))


class C2f(nn.Module):
    """YOLOv8's C2f: a 1x1 convolution split in two halves, bottlenecks on the second, all concatenated."""

    def __init__(self, c1: int, c2: int, n: int = 1):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = ConvBNSiLU(c1, 2 * self.c)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = ConvBNSiLU((2 + n) * self.c, c2)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))

    def lrp_forward(self, tape, x):
        from lrp_tape import run

        y = tape.chunk(run(tape, self.cv1, x), 2, 1)
        y.extend(run(tape, m, y[-1]) for m in self.m)
        return run(tape, self.cv2, tape.cat(y, 1))


class SPPF(nn.Module):
    """YOLOv5/v8's spatial pyramid pooling: three chained 5x5 stride-1 max pools, concatenated."""

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.cv1 = ConvBNSiLU(c1, c1 // 2)
        self.m = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBNSiLU(c1 // 2 * 4, c2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))

    def lrp_forward(self, tape, x):
        from lrp_tape import run

        x = run(tape, self.cv1, x)
        ys = [x]
        for _ in range(3):
            ys.append(tape.max_pool(ys[-1], self.m))
        return run(tape, self.cv2, tape.cat(ys, 1))


class YoloLike(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(ConvBNSiLU(3, 8, 3, 2), ConvBNSiLU(8, 16, 3, 2), C2f(16, 16),
                                      ConvBNSiLU(16, 32, 3, 2), C2f(32, 32, 2), SPPF(32, 32))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

    def lrp_forward(self, tape, x):
        from lrp_tape import run

        h = tape.mean_pool(run(tape, self.features, x))
        return run(tape, self.head, tape.reindex(h, lambda t: t.flatten(1)))


# ---------------------------------------------------------------- torchvision models, calibrated

def torchvision_model(name: str) -> nn.Module:
    tv = import_torchvision()
    return {"efficientnet_b0": tv.models.efficientnet_b0, "mobilenet_v3_small": tv.models.mobilenet_v3_small,
            "convnext_tiny": tv.models.convnext_tiny}[name](weights=None)


TORCH_MODELS = {"efficientnet_b0": SIZE, "mobilenet_v3_small": SIZE, "convnext_tiny": SIZE, "yolo_like": 32}


@functools.cache
def torch_model(name: str) -> nn.Module:
    """The model with seeded random weights, BatchNorm statistics calibrated on random batches, in eval mode."""
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(0)
        model = YoloLike() if name == "yolo_like" else torchvision_model(name)
        batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in batchnorms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        if batchnorms:
            model.train()
            with torch.no_grad():
                for _ in range(2):
                    model(torch.randn(4, 3, TORCH_MODELS[name], TORCH_MODELS[name]))
    return model.eval()


def sample(name: str, batch: int = 2, seed: int = 1) -> np.ndarray:
    size = TORCH_MODELS.get(name, SIZE)
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


@functools.cache
def _torch_export_bytes(name: str, exporter: str, opset: int) -> bytes:
    x = torch.from_numpy(sample(name))
    model = torch_model(name)
    with one_thread():
        return export(model, x, exporter=exporter, opset=opset).SerializeToString()


def torch_export(name: str, exporter: str = "torchscript", opset: int = 17) -> onnx.ModelProto:
    """A fresh copy of the cached export (input ``input`` [2, 3, S, S], output ``logits``)."""
    return onnx.load_from_string(_torch_export_bytes(name, exporter, opset))


# ---------------------------------------------------------------- Keras through tf2onnx

KERAS_SIZE = 64
XCEPTION_SIZE = 71  # the smallest input Keras' Xception takes


def keras_size(name: str) -> int:
    return XCEPTION_SIZE if name == "Xception" else KERAS_SIZE


def keras_norms(keras):
    """LayerNormalization over the channels and GroupNormalization (2 groups) between 1x1 convolutions (NHWC), with
    random gamma and beta."""
    inp = keras.Input((6, 6, 8), name="image")
    h = keras.layers.LayerNormalization()(inp)
    h = keras.layers.Conv2D(8, 1, activation="swish")(h)
    h = keras.layers.GroupNormalization(groups=2)(h)
    h = keras.layers.Conv2D(8, 1)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(4)(h))


@functools.cache
def _keras_export_bytes(name: str) -> bytes:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import tf2onnx

    keras = tf.keras
    keras.utils.set_random_seed(0)
    if name == "norms":
        model, shape = keras_norms(keras), (6, 6, 8)
    else:
        build = {"EfficientNetB0": keras.applications.EfficientNetB0,
                 "MobileNetV3Small": keras.applications.MobileNetV3Small, "Xception": keras.applications.Xception}[name]
        shape = (keras_size(name), keras_size(name), 3)
        model = build(weights=None, input_shape=shape, classes=10)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # random gamma and beta
        for w in layer.weights:
            if w.name in ("gamma", "beta"):
                w.assign((rng.uniform(0.5, 1.5, w.shape) if w.name == "gamma" else rng.normal(0, 0.2, w.shape))
                         .astype(np.float32))
    batchnorms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in batchnorms:  # moving statistics of random inputs, so that the activations stay near 1
        layer.momentum = 0.0
    if batchnorms:
        model(keras_sample(name, batch=8, seed=2), training=True)
    # the norms model has a static batch: Keras' GroupNormalization reshapes back to Shape(x), which only folds when
    # every dim is static (with a dynamic batch, --input-shape must fix it)
    spec = (tf.TensorSpec((2 if name == "norms" else None, *shape), tf.float32, name="image"),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=13)
    return proto.SerializeToString()


def keras_export(name: str) -> onnx.ModelProto:
    """``EfficientNetB0``, ``MobileNetV3Small`` (64x64x3, 10 classes, dynamic batch), ``Xception`` (71x71x3, the
    same) or ``norms`` (6x6x8, batch 2), NHWC input ``image``; the first output is the Softmax (``norms``: the
    logits)."""
    return onnx.load_from_string(_keras_export_bytes(name))


def keras_sample(name: str, batch: int = 2, seed: int = 1) -> np.ndarray:
    shape = (6, 6, 8) if name == "norms" else (keras_size(name), keras_size(name), 3)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *shape)) if name == "norms" else rng.uniform(0, 255, (batch, *shape))
    return x.astype(np.float32)
