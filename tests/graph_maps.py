"""The pieces of the graph reference (tests/graph_reference.py) that do not depend on the rules: a float64 forward
pass of an ONNX model, and the linear maps of its nodes as explicit sparse matrices and pooling windows.

Forward. The model is copied to float64 (initializers, Constant/ConstantOfShape values, Cast targets, declared
types) and run by onnx's ReferenceEvaluator, which keeps every intermediate tensor. Three of its kernels are replaced
by the ONNX spec's formulas: onnx 1.23's LRN sums over the batch axis instead of the channels (its loop runs over
``x.shape[0]``), its opset-6/7 BatchNormalization runs in training mode (batch statistics) when ``is_test`` is
absent, and its MaxPool misreads asymmetric pads.

Matrices. A per-sample tensor ``(channels, *spatial)`` is flattened in C order; ``M [n_out, n_in]`` holds the
weight joining input ``i`` to output ``j`` and ``C`` is 1 wherever they are joined (a padding tap joins nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from scipy import sparse

# ---------------------------------------------------------------- forward in float64

class LRN(OpRun):
    """ONNX LRN: ``y = x / (bias + alpha/size * sum_{c'} x_c'^2)^beta`` over the channels
    ``c' in [c - floor((size-1)/2), c + ceil((size-1)/2)]``."""

    op_domain = ""

    def _run(self, x, alpha=1e-4, beta=0.75, bias=1.0, size=None):
        below, above = (size - 1) // 2, -(-(size - 1) // 2)
        square_sum = np.stack([(x[:, max(0, c - below):c + above + 1] ** 2).sum(1) for c in range(x.shape[1])], 1)
        return (x / (bias + alpha / size * square_sum) ** beta,)


class BatchNormalization(OpRun):
    """Inference-mode BatchNormalization: ``scale (x - mean) / sqrt(var + epsilon) + B`` per channel (axis 1)."""

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=1e-5, **_):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        s = (scale / np.sqrt(var + epsilon)).reshape(shape)
        return (s * (x - mean.reshape(shape)) + bias.reshape(shape),)


class MaxPool(OpRun):
    """ONNX MaxPool (output Y): padding is -inf; with ceil_mode a last window that would start in the end padding is
    dropped, as onnxruntime and PyTorch do. (onnx 1.23's kernel misreads asymmetric pads: [0, 0, 1, 1] on a 4x4
    input gives 3x5.)"""

    op_domain = ""

    def _run(self, x, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None, pads=None, storage_order=0,
             strides=None):
        rank, spatial = len(kernel_shape), x.shape[2:]
        strides, dilations = strides or [1] * rank, dilations or [1] * rank
        pads = resolve_pads(auto_pad, pads, spatial, kernel_shape, strides, dilations)
        extent = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilations, strict=True)]
        out = []
        for a in range(rank):
            span = spatial[a] + pads[a] + pads[rank + a] - extent[a]
            o = (-(-span // strides[a]) if ceil_mode else span // strides[a]) + 1
            out.append(o - 1 if ceil_mode and (o - 1) * strides[a] >= spatial[a] + pads[a] else o)
        end = [max(pads[rank + a], (out[a] - 1) * strides[a] + extent[a] - spatial[a] - pads[a]) for a in range(rank)]
        padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[a], end[a]) for a in range(rank)], constant_values=-np.inf)
        windows = np.lib.stride_tricks.sliding_window_view(padded, extent, axis=tuple(range(2, 2 + rank)))
        index = (slice(None), slice(None), *[slice(0, (o - 1) * s + 1, s) for o, s in zip(out, strides, strict=True)],
                 *[slice(None, None, d) for d in dilations])
        return (windows[index].max(axis=tuple(range(-rank, 0))),)


def float64_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every float32 initializer, Constant/ConstantOfShape value, Cast target and declared type in
    float64."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for t in graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return copy


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


# ---------------------------------------------------------------- linear maps as matrices

def explicit_pads(node, in_spatial, kernel, strides, dilations) -> list[int]:
    """Begin and end pads of a Conv or pool node, ``auto_pad`` resolved."""
    return resolve_pads(attr(node, "auto_pad", "NOTSET"), attr(node, "pads"), in_spatial, kernel, strides, dilations)


def resolve_pads(auto_pad, pads, in_spatial, kernel, strides, dilations) -> list[int]:
    """Begin and end pads as the ONNX spec defines ``auto_pad``: SAME_UPPER puts the odd pad at the end."""
    rank = len(kernel)
    if auto_pad in ("NOTSET", "", None):
        return list(pads) if pads else [0] * 2 * rank
    if auto_pad == "VALID":
        return [0] * 2 * rank
    begin, end = [], []
    for a in range(rank):
        out = -(-in_spatial[a] // strides[a])
        total = max((out - 1) * strides[a] + dilations[a] * (kernel[a] - 1) + 1 - in_spatial[a], 0)
        begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        end.append(total - begin[-1])
    return begin + end


def window_geometry(node, in_shape, kernel):
    rank = len(kernel)
    strides = list(attr(node, "strides", [1] * rank))
    dilations = list(attr(node, "dilations", [1] * rank))
    return strides, explicit_pads(node, in_shape[1:], kernel, strides, dilations), dilations


def conv_matrix(w: np.ndarray, in_shape, out_shape, strides, pads, dilations, group: int):
    """``(M, C)`` of a Conv for per-sample shapes ``(channels, *spatial)``: ``M[j, i]`` is the weight joining input
    ``i`` to output ``j`` (``j = (c_out, *position)``), ``C`` is 1 wherever they are joined."""
    cout, cin_g, *kernel = w.shape
    rank = len(kernel)
    grid = np.meshgrid(np.arange(cout), np.arange(cin_g), *map(np.arange, kernel), *map(np.arange, out_shape[1:]),
                       indexing="ij")
    co, cl, taps, outs = grid[0], grid[1], grid[2:2 + rank], grid[2 + rank:]
    pos = [outs[a] * strides[a] - pads[a] + taps[a] * dilations[a] for a in range(rank)]
    valid = np.all([(p >= 0) & (p < in_shape[1 + a]) for a, p in enumerate(pos)], axis=0)
    ci = co // (cout // group) * cin_g + cl
    rows = np.ravel_multi_index((co[valid], *[o[valid] for o in outs]), out_shape)
    cols = np.ravel_multi_index((ci[valid], *[p[valid] for p in pos]), in_shape)
    shape = (int(np.prod(out_shape)), int(np.prod(in_shape)))
    weights = w[(co[valid], cl[valid], *[t[valid] for t in taps])]
    return (sparse.csr_array((weights, (rows, cols)), shape=shape),
            sparse.csr_array((np.ones(len(rows)), (rows, cols)), shape=shape))


@dataclass
class Windows:
    """Pooling windows: ``index[j, k]`` is the flat input index of tap ``k`` (row-major in the window) of output
    ``j``, -1 at a padding tap; ``divisor[j]`` is an average pool's divisor; ``size`` is P1*P2 (Prop. 13)."""

    index: np.ndarray
    divisor: np.ndarray
    size: int

    def matrices(self, n_in: int):
        """``(M, C)`` of the average over each window."""
        rows, taps = np.nonzero(self.index >= 0)
        shape = (len(self.index), n_in)
        cols = self.index[rows, taps]
        return (sparse.csr_array((1.0 / self.divisor[rows], (rows, cols)), shape=shape),
                sparse.csr_array((np.ones(len(rows)), (rows, cols)), shape=shape))


def pool_windows(node, in_shape, out_shape) -> Windows:
    """Windows of a MaxPool or AveragePool. With ``count_include_pad`` the divisor counts the taps inside the padded
    input (not ceil_mode's overhang past the end padding), otherwise the real inputs only."""
    kernel = list(attr(node, "kernel_shape"))
    rank = len(kernel)
    strides, pads, dilations = window_geometry(node, in_shape, kernel)
    grid = np.meshgrid(np.arange(in_shape[0]), *map(np.arange, out_shape[1:]), *map(np.arange, kernel),
                       indexing="ij")
    channel, outs, taps = grid[0], grid[1:1 + rank], grid[1 + rank:]
    pos = [outs[a] * strides[a] - pads[a] + taps[a] * dilations[a] for a in range(rank)]
    real = np.all([(p >= 0) & (p < in_shape[1 + a]) for a, p in enumerate(pos)], axis=0)
    padded = np.all([(p >= -pads[a]) & (p < in_shape[1 + a] + pads[rank + a]) for a, p in enumerate(pos)], axis=0)
    clipped = [np.clip(p, 0, in_shape[1 + a] - 1) for a, p in enumerate(pos)]
    index = np.where(real, np.ravel_multi_index((channel, *clipped), in_shape), -1)
    k = int(np.prod(kernel))
    index, real, padded = (a.reshape(-1, k) for a in (index, real, padded))
    counted = padded if attr(node, "count_include_pad", 0) else real
    return Windows(index, counted.sum(1).astype(np.float64), k)


def mean_windows(in_shape, axes) -> Windows:
    """Windows of a mean over the per-sample ``axes`` (GlobalAveragePool, GlobalMaxPool, ReduceMean)."""
    multi = np.indices(in_shape).reshape(len(in_shape), -1)
    multi[list(axes)] = 0
    out_shape = [1 if a in axes else d for a, d in enumerate(in_shape)]
    k = int(np.prod([in_shape[a] for a in axes]))
    index = np.argsort(np.ravel_multi_index(multi, out_shape), kind="stable").reshape(-1, k)
    return Windows(index, np.full(len(index), float(k)), k)


def node_windows(node, in_shape, out_shape, axes=None) -> Windows:
    """Windows of a pool or a mean; ``axes``: a ReduceMean's axes (attribute, or input from opset 18)."""
    if node.op_type in ("MaxPool", "AveragePool"):
        return pool_windows(node, in_shape, out_shape)
    if node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        return mean_windows(in_shape, range(1, len(in_shape)))
    axes = range(1, len(in_shape) + 1) if axes is None or len(axes) == 0 else [a % (len(in_shape) + 1) for a in axes]
    if 0 in axes:
        raise NotImplementedError("a mean over the batch axis")
    return mean_windows(in_shape, [a - 1 for a in axes])


def evaluator(model64: onnx.ModelProto) -> ReferenceEvaluator:
    """onnx's ReferenceEvaluator with the spec-exact LRN, inference-mode BatchNormalization and MaxPool."""
    return ReferenceEvaluator(model64, new_ops=[LRN, BatchNormalization, MaxPool])
