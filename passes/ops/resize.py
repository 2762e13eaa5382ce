"""Resize (Upsample becomes Resize at canonicalization) with constant scales or sizes: a linear map ``y = M x``.

Resize is separable: ``M`` is the tensor product of one interpolation matrix ``M_a`` [out_a, in_a] per resized axis.
Each ``M_a`` is built at compile time by running the node's own attributes on the identity matrix along that axis in
onnxruntime, the runtime of the compiled model (:func:`axis_matrix`), so every mode is covered as it runs:
nearest with every ``nearest_mode``, linear, cubic (``cubic_coeff_a``, ``exclude_outside``), ``antialias``, and every
``coordinate_transformation_mode`` with its edge clamping. ``tf_crop_and_resize`` writes ``extrapolation_value``
outside the crop box: that part is a bias, and ``M`` is the linear part.

The node kind is ``resize``; its rules see it through :class:`ResizeView`, an averaging view:

- Norm (classic default, as for average pools): ``R_in = x * M^T (R / stab(y))``.
- R-LRP, Eq. 6-7 with ``M`` as the weights: ``z_i = Card(J_i) / N^(l+1) * x_i * sum_j M_ji z_j / M_j``, where
  ``J_i`` is the set of outputs whose weight on input ``i`` is non-zero and ``M_j`` the number of inputs with a
  non-zero weight on output ``j`` (the sparsity pattern of ``M``; both factorize over the axes, like ``M``).
  Per axis this is one matrix ``diag(Card_a) M_a^T diag(1 / M_a,j)``, scaled by its largest magnitude (R-LRP is
  defined up to a positive factor). For a nearest upsampling by an integer factor it is ``M_a^T`` itself.

``W^T g`` is one MatMul per resized axis, or a Reshape and a ReduceSum where ``M_a^T`` adds up blocks of ``s``
consecutive outputs (nearest upsampling by an integer factor ``s``).
"""

from __future__ import annotations

import functools

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from .helpers import attr
from .pooling import AveragingView, averaging_rule
from .registry import backward

PROBE_OPSET = 19  # every Resize attribute (antialias, half_pixel_symmetric) exists at this opset
MAX_MATRIX_ELEMENTS = 1 << 24  # one axis's interpolation matrix, in x out
PROBE_SIZES = (2, 3)  # values tried for the unknown dims of a shape that `sizes` is computed from


@functools.lru_cache(maxsize=256)
def axis_matrix(attributes: tuple, rank: int, axis: int, n_in: int, scale: float | None, n_out: int,
                roi: tuple | None) -> np.ndarray:
    """``M_a`` [n_out, n_in] of one axis, as onnxruntime computes it: a Resize with the node's attributes
    (``(name, value)`` pairs without ``axes`` and ``keep_aspect_ratio_policy``) run on the identity matrix placed
    along ``axis`` and a basis axis (every other axis has size 1 and keeps scale 1, which every mode maps to itself),
    resized along ``axis`` only: by ``scale``, or to ``n_out`` when ``scale`` is None. ``roi`` is the crop box
    ``(start, end)`` of ``tf_crop_and_resize``. onnxruntime and not the ONNX reference implementation: they differ
    where ``scale * n_in`` is not an integer (align_corners and tf_crop_and_resize use the integer length there,
    the reference the product), and the relevance must follow the forward pass that runs."""
    import onnxruntime as ort

    basis = 1 if axis == 0 else 0
    shape = [1] * rank
    shape[basis] = shape[axis] = n_in
    identity = np.eye(n_in, dtype=np.float32).reshape([n_in if a in (basis, axis) else 1 for a in range(rank)])
    inputs, initializers = ["x", "", "", ""], []
    if roi:
        box = np.array([0.0] * rank + [1.0] * rank, np.float32)
        box[axis], box[rank + axis] = roi
        inputs[1] = "roi"
        initializers.append(numpy_helper.from_array(box, "roi"))
    if scale is not None:
        scales = np.ones(rank, np.float32)
        scales[axis] = scale
        inputs[2] = "scales"
        initializers.append(numpy_helper.from_array(scales, "scales"))
    else:
        sizes = np.array(shape, np.int64)
        sizes[axis] = n_out
        inputs[3] = "sizes"
        initializers.append(numpy_helper.from_array(sizes, "sizes"))
    node = helper.make_node("Resize", inputs if inputs[3] else inputs[:3], ["y"], **dict(attributes))
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", PROBE_OPSET)], ir_version=9)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    probe = session.run(None, {"x": identity})[0]
    probe = np.moveaxis(probe, (basis, axis), (0, 1)).reshape(n_in, -1)  # probe[b, j] = M[j, b]
    return probe.T.astype(np.float64)


def shape_value(ctx, name: str, unknown: int, depth: int = 0) -> np.ndarray | None:
    """The value of an integer tensor computed from constants and ``Shape`` of tensors whose shapes are known but
    for some dims (a ``sizes`` input of ``Concat(Shape(x)[:2], [h, w])``), with ``unknown`` for the unknown dims;
    None when it depends on anything else."""
    if name in ctx.constants:
        return ctx.constants[name]
    node = ctx.view.producer.get(name)
    if node is None or depth > 16 or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Shape":
        shape = ctx.shapes.get(node.input[0])
        if shape is None:
            return None
        full = np.array([unknown if d is None else d for d in shape], np.int64)
        return full[attr(node, "start", 0):attr(node, "end", len(full))]
    values = {}
    for i in node.input:
        if i:
            values[i] = shape_value(ctx, i, unknown, depth + 1)
            if values[i] is None:
                return None
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in values]
    outputs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output if o]
    model = helper.make_model(helper.make_graph([node], "shape", graph_inputs, outputs),
                              opset_imports=[helper.make_opsetid("", ctx.opset)])
    try:
        result = ReferenceEvaluator(model).run(None, values)
    except Exception:  # noqa: BLE001 - whatever the evaluator refuses, the sizes are unknown
        return None
    return np.asarray(result[list(node.output).index(name)])


def constant_input(ctx, node, index: int) -> np.ndarray | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    value = ctx.constants.get(node.input[index])
    return None if value is None or value.size == 0 else value


def resize_geometry(ctx, node) -> dict[int, np.ndarray] | str:
    """``{axis: M_a}`` for every axis that the node changes, or the reason it cannot be handled."""
    x_shape, y_shape = ctx.shapes.get(node.input[0]), ctx.shapes.get(node.output[0])
    if x_shape is None or y_shape is None:
        return "needs the ranks of its input and output"
    rank = len(x_shape)
    axes = [int(a) % rank for a in (attr(node, "axes") or range(rank))]
    if attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch" and constant_input(ctx, node, 2) is None:
        return "keep_aspect_ratio_policy other than stretch has no rule"
    scales = constant_input(ctx, node, 2)
    sizes = None if scales is not None else sizes_per_probe(ctx, node)
    if scales is None and sizes is None:
        return "needs constant scales or sizes (or sizes computed from shapes)"
    roi = constant_input(ctx, node, 1)
    crop = attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
    if crop and roi is None:
        return "tf_crop_and_resize needs a constant roi"
    attributes = tuple(sorted((a.name, helper.get_attribute_value(a)) for a in node.attribute
                              if a.name not in ("axes", "keep_aspect_ratio_policy")))
    attributes = tuple((k, 0.0 if k == "extrapolation_value" else v.decode() if isinstance(v, bytes) else v)
                       for k, v in attributes)
    matrices = {}
    for k, a in enumerate(axes):
        box = (float(roi[k]), float(roi[k + len(axes)])) if crop else None
        if scales is not None:
            scale, n_outs = float(scales[k]), [y_shape[a]]
            if scale == 1.0 and box in (None, (0.0, 1.0)):
                continue
        else:
            n_outs = [int(s[k]) for s in sizes]
            if all(s[k] == p for s, p in zip(sizes, PROBE_SIZES, strict=True)) and x_shape[a] is None \
                    and box in (None, (0.0, 1.0)):
                continue  # sizes[a] is the input's own (unknown) dim: unchanged
            scale = None
        n_in, n_out = x_shape[a], n_outs[0]
        if n_in is None or n_out is None or any(n != n_out for n in n_outs):
            return f"resizes axis {a}, whose size is not static"
        if n_in * n_out > MAX_MATRIX_ELEMENTS:
            return f"axis {a} maps {n_in} to {n_out} elements, an interpolation matrix too large to build"
        try:
            matrix = axis_matrix(attributes, rank, a, n_in, scale, n_out, box)
        except Exception as err:  # noqa: BLE001 - onnxruntime's refusal is the reason
            return f"onnxruntime refuses its attributes ({str(err).splitlines()[0][:200]})"
        if matrix.shape != (n_out, n_in):
            return f"axis {a}: onnxruntime resizes {n_in} to {matrix.shape[0]}, the model to {n_out}"
        matrices[a] = matrix
    return matrices


def sizes_per_probe(ctx, node) -> list[np.ndarray] | None:
    """The ``sizes`` input for each value of :data:`PROBE_SIZES` given to the unknown dims it is computed from
    (constant sizes: the same each time); None when it is absent or depends on data."""
    if len(node.input) <= 3 or not node.input[3]:
        return None
    values = [shape_value(ctx, node.input[3], p) for p in PROBE_SIZES]
    return None if any(v is None or v.size == 0 for v in values) else values


def check_resize(ctx, node):
    geometry = resize_geometry(ctx, node)
    return geometry if isinstance(geometry, str) else None


def along_axis(b, g: str, matrix: np.ndarray, axis: int, rank: int, shape: list) -> str:
    """``h[..., i, ...] = sum_j matrix[i, j] g[..., j, ...]`` along ``axis`` of ``g`` (``shape``: ``g``'s shape)."""
    n_new, n_old = matrix.shape
    if n_old % n_new == 0 and np.array_equal(matrix, np.kron(np.eye(n_new), np.ones((1, n_old // n_new)))) and \
            all(d is not None for d in shape[axis + 1:]):
        # a sum over blocks of consecutive entries: Reshape [..., n_new, s, ...] and ReduceSum (no MatMul)
        blocks = [0] * axis + [n_new, n_old // n_new] + list(shape[axis + 1:])
        split = b.op("Reshape", [g, b.const(blocks, "shape", np.int64)], "blocks")
        return b.op("ReduceSum", [split, b.const([axis + 1], "axes", np.int64)], "R", keepdims=0)
    if axis == rank - 1:
        return b.op("MatMul", [g, b.const(matrix.T, "interpolation_T")], "R")
    if axis == rank - 2:
        return b.op("MatMul", [b.const(matrix, "interpolation"), g], "R")
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    moved = b.op("Transpose", [g], "moved", perm=perm)
    return b.op("Transpose", [b.op("MatMul", [moved, b.const(matrix.T, "interpolation_T")], "R")], "R", perm=perm)


def rlrp_weights(matrix: np.ndarray) -> np.ndarray:
    """R-LRP's per-axis map ``diag(Card_i) M^T diag(1 / M_j)`` (Eq. 6-7), divided by its largest magnitude."""
    support = matrix != 0
    fan_in = np.maximum(support.sum(1), 1)  # M_j: inputs with a non-zero weight on output j
    card = support.sum(0)  # Card(J_i): outputs with a non-zero weight on input i
    weights = card[:, None] * matrix.T / fan_in[None, :]
    return weights / np.abs(weights).max()


class ResizeView(AveragingView):
    """A Resize ``y = M x``: ``spread(g) = M^T g`` and R-LRP's ``rlrp_spread`` (see the module docstring)."""

    def __init__(self, ctx, node):
        super().__init__(ctx, node)
        self.matrices = resize_geometry(ctx, node)
        self.rank = len(ctx.shapes[node.input[0]])
        self.out_shape = list(ctx.shapes[node.output[0]])

    def apply(self, b, g: str, per_axis) -> str:
        shape = list(self.out_shape)
        for axis in sorted(self.matrices, reverse=True):  # trailing axes first: the leading ones stay as they are
            matrix = per_axis(self.matrices[axis])
            g = along_axis(b, g, matrix, axis, self.rank, shape)
            shape[axis] = matrix.shape[0]
        return g

    def spread(self, b, g, up_to_scale=False):
        return self.apply(b, g, lambda m: m.T)

    def rlrp_spread(self, b, g):
        return self.apply(b, g, rlrp_weights)


def resize_nonnegative(is_nonneg, node, tensor) -> bool:
    """Nearest and linear interpolation have non-negative weights; cubic overshoots."""
    return attr(node, "mode", "nearest") != "cubic" and is_nonneg(node.input[0])


@backward("Resize", data_inputs=(0,), kind="resize", nonnegative=resize_nonnegative, check=check_resize)
def resize(ctx, node, r_out):
    return averaging_rule(ctx, node, ResizeView(ctx, node), r_out[0])
