"""Linear layers as the rules see them: ``z = W x + b`` with a forward and a transposed emitter.

A :class:`Linear` wraps one Conv or Gemm node, or a MatMul with a constant weight plus the constant Add that
follows it (its bias). Rules only call :meth:`Linear.forward` (``W' x' + b'`` with modified weights) and
:meth:`Linear.transpose` (``W'^T g``), so every rule works for every linear op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .builder import GraphBuilder

FEW_CHANNELS = 8  # a transposed product into fewer channels stays a ConvTranspose (see Linear.transpose)


def window_cover_count(size: int, kernel: int, stride: int, pad_begin: int, dilation: int, out_size: int):
    """Per input index along one axis: how many output windows contain it (Card(J) along that axis)."""
    count = np.zeros(size, dtype=np.int64)
    for j in range(out_size):
        for k in range(kernel):
            i = j * stride - pad_begin + k * dilation
            if 0 <= i < size:
                count[i] += 1
    return count


def window_valid_count(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int,
                       out_size: int, include_pad: bool):
    """Per output index along one axis: how many window taps fall inside the input (or the padded input)."""
    low, high = (-pad_begin, size + pad_end) if include_pad else (0, size)
    count = np.zeros(out_size, dtype=np.int64)
    for j in range(out_size):
        for k in range(kernel):
            i = j * stride - pad_begin + k * dilation
            count[j] += low <= i < high
    return count


def outer_product(vectors: list[np.ndarray]) -> np.ndarray:
    """The N-D map whose value at (i1, i2, ...) is v1[i1] * v2[i2] * ... (windows are boxes, counts factorize)."""
    out = np.ones((), dtype=np.float64)
    for v in vectors:
        out = np.multiply.outer(out, v)
    return out


@dataclass
class Window:
    """Geometry of a sliding window op (Conv, pools) over the spatial axes of a static-shaped input."""

    in_spatial: list[int]
    out_spatial: list[int]
    kernel: list[int]
    strides: list[int]
    pads: list[int]  # begin..., end...
    dilations: list[int]

    @property
    def rank(self) -> int:
        return len(self.kernel)

    def cover_count(self) -> np.ndarray:
        """Card(J_i) per input position: number of windows containing position i."""
        r = self.rank
        return outer_product([
            window_cover_count(self.in_spatial[a], self.kernel[a], self.strides[a], self.pads[a],
                               self.dilations[a], self.out_spatial[a]) for a in range(r)])

    def valid_count(self, include_pad: bool) -> np.ndarray:
        """Number of window taps inside the input (``include_pad``: inside the padded input) per output."""
        r = self.rank
        return outer_product([
            window_valid_count(self.in_spatial[a], self.kernel[a], self.strides[a], self.pads[a],
                               self.pads[a + r], self.dilations[a], self.out_spatial[a], include_pad)
            for a in range(r)])

    def output_padding(self) -> list[int]:
        """ConvTranspose output_padding that restores the input size exactly."""
        r = self.rank
        return [self.in_spatial[a] - ((self.out_spatial[a] - 1) * self.strides[a] - self.pads[a]
                                      - self.pads[a + r] + self.dilations[a] * (self.kernel[a] - 1) + 1)
                for a in range(r)]

    def conv_transpose(self, b: GraphBuilder, g: str, weight: str, group: int, hint: str) -> str:
        """``W^T g`` for a convolution with this geometry, via ConvTranspose."""
        return b.op("ConvTranspose", [g, weight], hint, strides=self.strides, pads=self.pads,
                    dilations=self.dilations, group=group, output_padding=self.output_padding())


@dataclass
class Linear:
    """``z = W x + b``: a Conv (weight [Cout, Cin/g, *k]) or a dense layer (weight [in, out], ``x @ W``)."""

    name: str
    kind: str  # "conv" or "dense"
    x: str
    z: str
    weight: np.ndarray
    bias: np.ndarray | None
    x_shape: list[int | None]
    window: Window | None = None
    group: int = 1
    transpose_x: bool = False  # Gemm transA=1: the node reads x^T; ``x`` is then the transposed tensor
    x_nonneg: bool = False  # x >= 0 everywhere (a Relu output, ...): x- = 0, so rules drop their x- terms
    relu_out: str | None = None  # Relu(z) when the relevance of z is 0 wherever z <= 0 (RelevancePass.relu_behind)
    # the model's float32 initializer that holds ``weight`` unchanged, and whether it is stored transposed (a dense
    # weight as [out, in], Gemm transB=1): rules that use the weight as it is read it instead of a copy
    source: tuple[str, bool] | None = None
    _weights: dict = field(default_factory=dict, repr=False)

    def weight_name(self, b: GraphBuilder, weight: np.ndarray, tag: str) -> str:
        """An initializer for a transformed weight, computed once at compile time and shared within the layer."""
        if weight is self.weight and self.source is not None and not self.source[1]:
            return self.source[0]
        if tag not in self._weights:
            self._weights[tag] = b.const(weight.astype(np.float32), f"{tag}")
        return self._weights[tag]

    def forward(self, b: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray | None, tag: str) -> str:
        """``W' x + b'`` with this layer's geometry."""
        w = self.weight_name(b, weight, tag)
        if self.kind == "conv":
            inputs = [x, w] + ([self.weight_name(b, bias, tag + "_b")] if bias is not None else [])
            wd = self.window
            return b.op("Conv", inputs, "z", strides=wd.strides, pads=wd.pads, dilations=wd.dilations,
                        group=self.group)
        z = b.op("MatMul", [x, w], "z")
        if bias is not None:
            z = b.op("Add", [z, self.weight_name(b, bias, tag + "_b")], "z")
        return z

    def transpose(self, b: GraphBuilder, g: str, weight: np.ndarray, tag: str) -> str:
        """``W'^T g``: the gradient of ``W' x`` with respect to ``x``, shaped like ``x``."""
        if self.kind == "dense":
            if weight is self.weight and self.source is not None:  # the model's own [out, in] or [in, out] weight
                name, stored_transposed = self.source
                if stored_transposed:
                    return b.op("MatMul", [g, name], "WTg")
                if self.x_shape is not None and len(self.x_shape) > 2:
                    # [batch, tokens, out]: Gemm takes 2-D only, so g goes through it as [batch * tokens, out] (a
                    # MatMul with the Transpose of the weight would keep a transposed copy of every weight)
                    flat = b.op("Reshape", [g, b.const([-1, self.weight.shape[1]], "flat", np.int64)], "g_2d")
                    out = b.op("Gemm", [flat, name], "WTg", transB=1)
                    return b.op("Reshape", [out, b.op("Shape", [self.x])], "WTg")
                return b.op("Gemm", [g, name], "WTg", transB=1)
            return b.op("MatMul", [g, self.weight_name(b, weight.T, tag + "_T")], "WTg")
        wd = self.window
        strided = any(s != 1 for s in wd.strides)
        # Most transposed products run faster as a stride-1 Conv with the flipped kernel than as a ConvTranspose.
        # Two exceptions stay ConvTranspose:
        # - a strided product, unless its weights are depthwise (one input channel per group): those become a Conv
        #   over zero-inserted g, because onnxruntime's grouped ConvTranspose runs one small GEMM per channel
        #   (MobileNetV2's 96-channel 112x112 one: 5.2 against 2.1 ms);
        # - a product into fewer than FEW_CHANNELS channels (an RGB or grey input layer): onnxruntime blocks a Conv
        #   only for 8 or 16 output channels and otherwise builds an im2col buffer of kernel x Cout rows
        #   (VGG16's first layer: 16.5 against 8.3 ms).
        into_few_channels = self.group == 1 and weight.shape[1] < FEW_CHANNELS
        flipped = None if into_few_channels or (strided and weight.shape[1] != 1) else \
            flipped_conv(weight, wd, self.group)
        if flipped is None:
            return wd.conv_transpose(b, g, self.weight_name(b, weight, tag), self.group, "WTg")
        kernel, pads = flipped
        if strided:
            g = zero_insert(b, g, wd)
        return b.op("Conv", [g, self.weight_name(b, kernel, tag + "_flip")], "WTg", pads=pads,
                    dilations=wd.dilations, group=self.group)

    @property
    def fan_in(self) -> int:
        """M_j: inputs per output neuron (dense: N^(l); conv: the kernel size P1*P2 of Eq. 10)."""
        if self.kind == "dense":
            return self.weight.shape[0]
        return int(np.prod(self.weight.shape[2:]))


def flipped_conv(weight: np.ndarray, window: Window, group: int):
    """A transposed convolution is a stride-1 Conv with the kernel flipped and its channel axes swapped, over ``g``
    with ``stride - 1`` zeros inserted after each element along each axis (``out * stride`` long, see
    :func:`zero_insert`; nothing inserted at stride 1). Its pads are ``span - pad_begin`` before and
    ``in - out * stride + pad_begin`` after (``span = dilation * (kernel - 1)``), which also yields the input's
    trailing positions that no window reaches.

    Returns (kernel, pads) for that Conv, or None when a pad would be negative (a real ConvTranspose is needed).
    """
    r = window.rank
    span = [window.dilations[a] * (window.kernel[a] - 1) for a in range(r)]
    pads = [span[a] - window.pads[a] for a in range(r)] + \
        [window.in_spatial[a] - window.out_spatial[a] * window.strides[a] + window.pads[a] for a in range(r)]
    if any(p < 0 for p in pads):
        return None
    cout, cin_g = weight.shape[:2]
    k = weight.shape[2:]
    w = weight.reshape(group, cout // group, cin_g, *k).swapaxes(1, 2).reshape(group * cin_g, cout // group, *k)
    w = np.flip(w, axis=tuple(range(2, 2 + r)))
    return np.ascontiguousarray(w), pads


def zero_insert(b: GraphBuilder, g: str, window: Window) -> str:
    """``g`` with ``stride - 1`` zeros after each element along each spatial axis: a nearest Resize by the strides
    (each element repeated) times a constant 0/1 mask that keeps the first of each repeat."""
    strides = window.strides
    up = [o * s for o, s in zip(window.out_spatial, strides, strict=True)]
    mask = np.zeros(up, dtype=np.float32)
    mask[tuple(slice(None, None, s) for s in strides)] = 1
    repeated = b.op("Resize", [g, "", b.const([1, 1, *strides], "scales")], "zero_inserted", mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return b.op("Mul", [repeated, b.const(mask[None, None], "zero_insert_mask")], "zero_inserted")
