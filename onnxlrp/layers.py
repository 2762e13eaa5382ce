"""Linear layers as the rules see them: ``z = W x + b`` with a forward and a transposed emitter.

A :class:`Linear` wraps one Conv or Gemm node, or a MatMul with a constant weight plus the constant Add that
follows it (its bias). Rules only call :meth:`Linear.forward` (``W' x' + b'`` with modified weights) and
:meth:`Linear.transpose` (``W'^T g``), so every rule works for every linear op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .builder import GraphBuilder
from .ranges import LIMIT, transpose_growth
from .weights import Weight, flip, reshape, transpose

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

    def conv_transpose(self, b: GraphBuilder, g: str, weight: str, group: int, hint: str,
                       channels: tuple[int, int]) -> str:
        """``W^T g`` for a convolution with this geometry, via ConvTranspose. ``channels`` are the weight's first two
        dims: the input channels of the transposed product and its output channels per group. A form that
        onnxruntime-web computes wrong (:func:`miscomputed_on_the_web`) becomes a depthwise ConvTranspose, one output
        per input channel, and the sum of each group's outputs."""
        in_channels, out_per_group = channels
        in_per_group = in_channels // group
        if miscomputed_on_the_web(in_per_group, out_per_group, group):
            each = b.op("ConvTranspose", [g, weight], hint, strides=self.strides, pads=self.pads,
                        dilations=self.dilations, group=in_channels, output_padding=self.output_padding())
            each = b.op("Reshape", [each, b.const([0, group, in_per_group, *self.in_spatial], "shape", np.int64)], hint)
            return b.op("ReduceSum", [each, b.const([2], "axes", np.int64)], hint, keepdims=0)
        return b.op("ConvTranspose", [g, weight], hint, strides=self.strides, pads=self.pads,
                    dilations=self.dilations, group=group, output_padding=self.output_padding())


def miscomputed_on_the_web(in_per_group: int, out_per_group: int, group: int) -> bool:
    """Whether onnxruntime-web 1.30 computes this ConvTranspose form wrong (with no error): one output channel per
    group from an even number of input channels per group, on its WebGPU execution provider (``ort.webgpu.min.js``)
    when ``group > 1``, and on its JSEP WebGPU kernels (``ort.min.js``) with exactly two input channels per group,
    grouped or not (docs/onnxruntime-web-webgpu.md)."""
    return out_per_group == 1 and in_per_group % 2 == 0 and (group > 1 or in_per_group == 2)


@dataclass
class Linear:
    """``z = W x + b``: a Conv (weight [Cout, Cin/g, *k]) or a dense layer (weight [in, out], ``x @ W``).

    ``weight`` is an expression over the model's initializer (:class:`Weight`): rules transform it with ops that
    onnxruntime folds when the session is created, so the compiled file holds no transformed copy of it."""

    name: str
    kind: str  # "conv" or "dense"
    x: str
    z: str
    weight: Weight
    bias: np.ndarray | None
    x_shape: list[int | None]
    window: Window | None = None
    group: int = 1
    transpose_x: bool = False  # Gemm transA=1: the node reads x^T; ``x`` is then the transposed tensor
    x_nonneg: bool = False  # x >= 0 everywhere (a Relu output, ...): x- = 0, so rules drop their x- terms
    relu_out: str | None = None  # Relu(z) when the relevance of z is 0 wherever z <= 0 (RelevancePass.relu_behind)
    _biases: dict = field(default_factory=dict, repr=False)
    _growths: dict = field(default_factory=dict, repr=False)

    def bias_name(self, b: GraphBuilder, bias: np.ndarray, tag: str) -> str:
        """An initializer for a (modified) bias, one per output: small, computed at compile time, shared within the
        layer by tag."""
        if tag not in self._biases:
            self._biases[tag] = b.const(bias.astype(np.float32), tag)
        return self._biases[tag]

    def forward(self, b: GraphBuilder, x: str, weight: Weight, bias: np.ndarray | None, tag: str) -> str:
        """``W' x + b'`` with this layer's geometry."""
        w = weight.emit(b, tag)
        if self.kind == "conv":
            inputs = [x, w] + ([self.bias_name(b, bias, tag + "_b")] if bias is not None else [])
            wd = self.window
            return b.op("Conv", inputs, "z", strides=wd.strides, pads=wd.pads, dilations=wd.dilations,
                        group=self.group)
        z = b.op("MatMul", [x, w], "z")
        if bias is not None:
            z = b.op("Add", [z, self.bias_name(b, bias, tag + "_b")], "z")
        return z

    def transpose(self, b: GraphBuilder, g: str, weight: Weight, tag: str) -> str:
        """``W'^T g``: the gradient of ``W' x`` with respect to ``x``, shaped like ``x``. With range keeping
        (:mod:`onnxlrp.ranges`), ``g`` is first normalized when ``max |g| * max_i sum_j |w'_ji|`` could leave
        :data:`onnxlrp.ranges.LIMIT`, and the product's bound is recorded."""
        if b.ranges is None:
            return self._transpose(b, g, weight, tag)
        growth = self.growth(weight, tag)
        g = b.ranges.at_most(b, g, LIMIT - growth)
        out = self._transpose(b, g, weight, tag)
        bound = b.ranges.bound_of(g)
        b.ranges.set_bound(out, None if bound is None else bound + growth)
        return out

    def growth(self, weight: Weight, tag: str) -> float:
        """``log2 max_i sum_j |w_ji|`` of a weight of this layer, computed once per tag."""
        if tag not in self._growths:
            self._growths[tag] = transpose_growth(weight.value, self.kind, self.group)
        return self._growths[tag]

    def _transpose(self, b: GraphBuilder, g: str, weight: Weight, tag: str) -> str:
        if self.kind == "dense":
            if weight.is_initializer:
                # the model's own [in, out] weight: Gemm reads it transposed, no copy (Gemm takes matrices only)
                if self.x_shape is None or len(self.x_shape) == 2:
                    return b.op("Gemm", [g, weight.emit(b, tag)], "WTg", transB=1)
                # [batch, tokens, out]: g goes through Gemm as [batch * tokens, out] (a MatMul with the Transpose
                # of the weight would keep a transposed copy of every weight)
                flat = b.op("Reshape", [g, b.const([-1, weight.shape[1]], "flat", np.int64)], "g_2d")
                out = b.op("Gemm", [flat, weight.emit(b, tag)], "WTg", transB=1)
                return b.op("Reshape", [out, b.op("Shape", [self.x])], "WTg")
            return b.op("MatMul", [g, weight.T.emit(b, tag + "_T")], "WTg")  # [out, in] (a stored one as it is)
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
            return wd.conv_transpose(b, g, weight.emit(b, tag), self.group, "WTg", weight.shape[:2])
        kernel, pads = flipped
        if strided:
            g = zero_insert(b, g, wd)
        return b.op("Conv", [g, kernel.emit(b, tag + "_flip")], "WTg", pads=pads, dilations=wd.dilations,
                    group=self.group)

    @property
    def fan_in(self) -> int:
        """M_j: inputs per output neuron (dense: N^(l); conv: the kernel size P1*P2 of Eq. 10)."""
        if self.kind == "dense":
            return self.weight.shape[0]
        return int(np.prod(self.weight.shape[2:]))


def flipped_conv(weight: Weight, window: Window, group: int):
    """A transposed convolution is a stride-1 Conv with the kernel flipped and its channel axes swapped, over ``g``
    with ``stride - 1`` zeros inserted after each element along each axis (``out * stride`` long, see
    :func:`zero_insert`; nothing inserted at stride 1). Its pads are ``span - pad_begin`` before and
    ``in - out * stride + pad_begin`` after (``span = dilation * (kernel - 1)``), which also yields the input's
    trailing positions that no window reaches.

    Returns (kernel, pads) for that Conv, or None when a pad would be negative (a real ConvTranspose is needed).
    The kernel is ``weight`` as ``[group, Cout/g, Cin/g, *k]`` with axes 1 and 2 swapped (a Transpose; only a
    Reshape when one of them has length 1, as in depthwise weights), reversed along the spatial axes (a Slice with
    step -1).
    """
    r = window.rank
    span = [window.dilations[a] * (window.kernel[a] - 1) for a in range(r)]
    pads = [span[a] - window.pads[a] for a in range(r)] + \
        [window.in_spatial[a] - window.out_spatial[a] * window.strides[a] + window.pads[a] for a in range(r)]
    if any(p < 0 for p in pads):
        return None
    cout, cin_g = weight.shape[:2]
    k = weight.shape[2:]
    cout_g = cout // group
    spatial = tuple(range(2, 2 + r))
    if group == 1:
        swapped = transpose(weight, (1, 0, *spatial))
    elif cout_g == 1 or cin_g == 1:  # swapping an axis of length 1 moves no element
        swapped = reshape(weight, (group * cin_g, cout_g, *k))
    else:
        grouped = reshape(weight, (group, cout_g, cin_g, *k))
        swapped = reshape(transpose(grouped, (0, 2, 1, *(a + 1 for a in spatial))), (group * cin_g, cout_g, *k))
    return flip(swapped, spatial), pads


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
