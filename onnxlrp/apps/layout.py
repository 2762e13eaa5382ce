"""Where an image model wants its channels: NCHW (ONNX's convention) or NHWC (TensorFlow and Keras exports).

tf2onnx and keras2onnx keep a Keras model's NHWC input and write ``Transpose(perm=[0, 3, 1, 2])`` before its first
Conv. :func:`image_layout` follows the input through the ops that keep its axes (element-wise preprocessing, Pad,
Transpose) to the first Conv that reads it and asks which input axis that Conv takes as its channels; without such a
Conv, the shape decides (the axis of 1 or 3 channels, NCHW when both could be).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import quote

__all__ = ["ImageLayout", "image_layout"]

#: Ops whose output keeps the axes of their data input (element-wise maps and preprocessing, padding).
AXIS_KEEPING = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Max", "Min",
    "Cast", "Identity", "Dropout", "Pad", "BatchNormalization",
})


@dataclass(frozen=True)
class ImageLayout:
    """How images ``[B, C, H, W]`` become the model's input and its relevance becomes a map per image."""

    name: str  # "NCHW" or "NHWC"
    channels: int
    height: int
    width: int
    why: str

    @property
    def sample_axes(self) -> str:
        """The axes of one sample's input (and relevance): ``[C, H, W]`` or ``[H, W, C]``."""
        return "[C, H, W]" if self.name == "NCHW" else "[H, W, C]"

    def to_model(self, images: np.ndarray) -> np.ndarray:
        """A batch ``[B, C, H, W]`` in the model's layout."""
        return images if self.name == "NCHW" else np.ascontiguousarray(images.transpose(0, 2, 3, 1))

    def to_chw(self, sample: np.ndarray) -> np.ndarray:
        """One sample's relevance (the model's layout) as ``[C, H, W]``."""
        return sample if self.name == "NCHW" else sample.transpose(2, 0, 1)


def first_conv_channel_axis(graph: onnx.GraphProto, input_name: str) -> tuple[onnx.NodeProto, int] | None:
    """The first Conv (in topological order) that reads ``input_name`` through ops that keep or permute its axes,
    and the input axis that Conv takes as its channels (its axis 1); None when no Conv reads it that way."""
    order: dict[str, tuple[int, ...]] = {input_name: (0, 1, 2, 3)}  # tensor -> input axis of each of its axes
    for node in graph.node:
        axes = order.get(node.input[0]) if node.input else None
        if axes is None:
            continue
        if node.op_type == "Conv":
            return node, axes[1]
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm is not None and sorted(perm) == [0, 1, 2, 3]:
                order[node.output[0]] = tuple(axes[p] for p in perm)
        elif node.op_type in AXIS_KEEPING:
            order[node.output[0]] = axes
    return None


def image_layout(graph: onnx.GraphProto, input_name: str, dims: tuple[int, ...], shown: str) -> ImageLayout:
    """The layout of the image input ``input_name`` of shape ``[N, *dims]`` (three fixed dims), or a one-line
    error when its channels are neither 1 nor 3."""
    found = first_conv_channel_axis(graph, input_name)
    axis1, axis3 = dims[0], dims[2]
    if found is not None and found[1] in (1, 3):
        conv, axis = found
        name = "NCHW" if axis == 1 else "NHWC"
        how = "directly" if axis == 1 else "through a Transpose"
        why = f"its first Conv {quote(conv.name or conv.output[0])} reads axis {axis} as channels, {how}"
    elif axis1 in (1, 3):
        name = "NCHW"
        why = "by its shape: axis 1 holds 1 or 3 channels" + (" (so does axis 3; NCHW is ONNX's convention)"
                                                            if axis3 in (1, 3) else "")
    elif axis3 in (1, 3):
        name, why = "NHWC", "by its shape: axis 3 holds 1 or 3 channels"
    else:
        raise OnnxlrpError(f"{shown}: input {quote(input_name)} has shape [N, {', '.join(map(str, dims))}]: neither "
                           "axis 1 (NCHW) nor axis 3 (NHWC) holds 1 (gray) or 3 (RGB) channels, as images give")
    channels, height, width = dims if name == "NCHW" else (dims[2], dims[0], dims[1])
    if channels not in (1, 3):
        raise OnnxlrpError(f"{shown}: input {quote(input_name)} is {name} ({why}) with {channels} channels; images "
                           "give 1 (gray) or 3 (RGB)")
    return ImageLayout(name, channels, height, width, why)
