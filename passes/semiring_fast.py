"""Boolean and counting LRP (threshold annotations, plus in {sum, or}) on linear layers without materializing the
pairs, exactly.

For a threshold ``theta > 0`` (Eq. 2.2.1, 2.2.2), ``d_jk >= theta`` holds iff the contribution ``c_jk = a_j w_jk``
has the sign of ``z_k != 0`` **and** ``|c_jk| >= theta |z_k|``. The sign condition separates into 0/1 matrices:

    S_j = [a_j > 0] (W+^T R+ + W-^T R-)_j + [a_j < 0] (W-^T R+ + W+^T R-)_j

with ``W+ = [w > 0]``, ``W- = [w < 0]``, ``R+ = R [z > 0]``, ``R- = R [z < 0]``: transposed products with 0/1
kernels, the cost of a backward pass. ``S_j`` counts every sign-matching pair, so it is exact wherever no pair of
``j`` is *tiny* (``|c_jk| < theta |z_k|`` with ``R_k != 0``). A neuron can have a tiny pair only if
``|a_j| w_min(j) < theta max_k |z_k|`` (``w_min(j)``: its smallest non-zero ``|w_jk|``; the max over the outputs with
``R_k != 0``). These *suspicious* neurons (few when theta is small against the contributions, as the default 1e-9)
are found at run time and evaluated pair by pair from gathered weights, ``z`` and ``R``, in a Loop of chunks of at
most :data:`SUSPICIOUS_CHUNK_PAIRS` pairs; their exact values replace the fast ones (ScatterND).

Counting keeps float64 relevance (exact integers up to 2**53): its transposed products are MatMuls in float64 and
the taps of a convolution go back to the input by the semiring's plus (onnxruntime has no float64 convolution).
Boolean relevance counts in float32 (sums of at most a layer's fan-out of ones, exact) and takes ``[S > 0]``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxlrp.builder import GraphBuilder
from onnxlrp.weights import concat, reshape, sign_mask, transpose

from .semiring_pairs import Annotator, to_positions

SUSPICIOUS_CHUNK_PAIRS = 1 << 21  # pairs gathered per Loop iteration
DENSE_CHUNK = 1 << 24  # weights of a dense layer turned into 0/1 matrices at once (64 MiB of float32)
MARGIN = 1e-3  # relative margin of the suspicion test against float32 rounding of d = (a w) / z
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT64_MAX = float(np.finfo(np.float64).max)


def applies(ann: Annotator) -> bool:
    """The fast path computes threshold annotations summed (or or-ed) with 0/1 products."""
    return ann.s.annotation == "threshold" and ann.s.plus in ("sum", "or")


def fast_threshold_linear(ann: Annotator, layer, r: str) -> str:
    b = ann.b
    dtype = ann.dtype
    zero = b.const(0.0, "zero")
    z = layer.z
    r_pos = b.op("Mul", [r, b.op("Cast", [b.op("Greater", [z, zero])], "z_pos", to=dtype)], "R_pos")
    r_neg = b.op("Mul", [r, b.op("Cast", [b.op("Less", [z, zero])], "z_neg", to=dtype)], "R_neg")
    both = not layer.x_nonneg
    s_plus, s_minus = sign_counts(ann, layer, r_pos, r_neg, both)
    x = layer.x
    fast = b.op("Mul", [s_plus, b.op("Cast", [b.op("Greater", [x, zero])], "x_pos", to=dtype)], "S")
    if both:
        negative = b.op("Mul", [s_minus, b.op("Cast", [b.op("Less", [x, zero])], "x_neg", to=dtype)], "S")
        fast = b.op("Add", [fast, negative], "S")
    exact = correct_suspicious(ann, layer, r, fast)
    if ann.s.plus == "or":
        return ann.select(b.op("Greater", [exact, ann.relevance_const(0.0, "zero")], "relevant"))
    return b.op("Min", [exact, ann.relevance_const(FLOAT64_MAX, "max")], "R")  # no Inf, even past 1.8e308


# ---------------------------------------------------------------- sign-matching counts

def sign_counts(ann: Annotator, layer, r_pos: str, r_neg: str, both: bool) -> tuple[str, str | None]:
    """``(W+^T R+ + W-^T R-, W-^T R+ + W+^T R-)`` (the second only when the input may be negative). The 0/1
    kernels are ops over the model's weight (:func:`onnxlrp.weights.sign_mask`), folded by onnxruntime."""
    if layer.kind == "dense":
        return dense_counts(ann, layer, r_pos, r_neg, both)
    w_pos, w_neg = sign_mask(layer.weight, True), sign_mask(layer.weight, False)
    if ann.dtype == TensorProto.DOUBLE:
        return double_counts(ann, layer, r_pos, r_neg, w_pos, w_neg, both)
    b = ann.b
    if layer.group == 1:
        g = b.op("Concat", [r_pos, r_neg], "R_pm", axis=1)
        s_plus = layer.transpose(b, g, concat([w_pos, w_neg], 0), "W01_pm")
        s_minus = layer.transpose(b, g, concat([w_neg, w_pos], 0), "W01_mp") if both else None
        return s_plus, s_minus

    def pair(first, second, tag):
        return b.op("Add", [layer.transpose(b, r_pos, first, tag[0]), layer.transpose(b, r_neg, second, tag[1])],
                    "S")
    return pair(w_pos, w_neg, ("W01_p", "W01_n")), pair(w_neg, w_pos, ("W01_n", "W01_p")) if both else None


def stored_weight(b, layer) -> tuple[str, bool]:
    """A dense layer's weight as a float32 tensor: ``(name, True)`` when the model stores it as ``[K, J]`` (Gemm
    ``transB = 1``: read as it is, not transposed), else ``[J, K]``."""
    w = layer.weight
    if w.op == "transpose" and w.inputs[0].is_initializer:
        return w.inputs[0].emit(b, "W"), True
    return w.emit(b, "W"), False


def dense_counts(ann: Annotator, layer, r_pos, r_neg, both):
    """:func:`sign_counts` of a dense layer with its 0/1 matrices made from the weight, a chunk of
    :data:`DENSE_CHUNK` weights at a time (VGG16's first dense layer has 10**8)."""
    b, dtype = ann.b, ann.dtype
    j, k = layer.weight.shape
    weight, transposed = stored_weight(b, layer)
    rows = b.const([-1, k], "shape", np.int64)
    r_pos, r_neg = b.op("Reshape", [r_pos, rows], "R_pos"), b.op("Reshape", [r_neg, rows], "R_neg")
    zero = b.const(0.0, "zero")

    def product(g, mask):
        return b.op("MatMul", [g, mask], "S") if transposed else b.op("Gemm", [g, mask], "S", transB=1)
    plus, minus = [], []
    step = max(1, DENSE_CHUNK // k)
    for j0 in range(0, j, step):
        part = weight if step >= j else b.op(
            "Slice", [weight, b.const([j0], "start", np.int64), b.const([min(j0 + step, j)], "end", np.int64),
                      b.const([1 if transposed else 0], "axes", np.int64)], "W_rows")
        pos = b.op("Cast", [b.op("Greater", [part, zero])], "W_pos", to=dtype)
        neg = b.op("Cast", [b.op("Less", [part, zero])], "W_neg", to=dtype)
        plus.append(b.op("Add", [product(r_pos, pos), product(r_neg, neg)], "S"))
        if both:
            minus.append(b.op("Add", [product(r_pos, neg), product(r_neg, pos)], "S"))
    shape = b.op("Shape", [layer.x])

    def joined(parts):
        whole = parts[0] if len(parts) == 1 else b.op("Concat", parts, "S", axis=1)
        return b.op("Reshape", [whole, shape], "S")
    return joined(plus), joined(minus) if both else None


def double_counts(ann: Annotator, layer, r_pos, r_neg, w_pos, w_neg, both):
    """:func:`sign_counts` of a convolution in float64: per group, one MatMul of the stacked 0/1 kernels
    ``[W+^T W-^T]`` (and ``[W-^T W+^T]`` below them) with ``[R+; R-]`` laid out as ``[2 Kg, positions]`` gives
    every tap's count at every output position; the taps go back to the input with plus (:meth:`Annotator.
    scatter_taps`)."""
    b = ann.b
    wd, groups = layer.window, layer.group
    cout, cin_g = layer.weight.shape[:2]
    taps, kg, positions = int(np.prod(wd.kernel)), cout // groups, int(np.prod(wd.out_spatial))
    jg = cin_g * taps
    by_group = b.const([0, groups, kg, positions], "shape", np.int64)
    g = b.op("Concat", [b.op("Reshape", [r_pos, by_group], "R_pos"), b.op("Reshape", [r_neg, by_group], "R_neg")],
             "R_pm", axis=2)  # [N, G, 2Kg, positions]
    wp = transpose(reshape(w_pos, (groups, kg, jg)), (0, 2, 1))  # [G, J, Kg]
    wn = transpose(reshape(w_neg, (groups, kg, jg)), (0, 2, 1))
    kernels = [concat([wp, wn], 2)] + ([concat([wn, wp], 2)] if both else [])
    stacked = b.op("Cast", [concat(kernels, 1).emit(b, "W01")], "W01", to=TensorProto.DOUBLE)
    col = b.op("MatMul", [stacked, g], "col")  # [N, G, J', P]
    halves = [col] if not both else b.op("Split", [col, b.const([jg, jg], "split", np.int64)], "col", n_out=2,
                                         axis=2)
    shape = b.const([0, groups * cin_g, taps, *wd.out_spatial], "shape", np.int64)
    sums = [ann.scatter_taps(b.op("Reshape", [h, shape], "col"), wd) for h in halves]
    return sums[0], (sums[1] if both else None)


# ---------------------------------------------------------------- suspicious neurons, pair by pair

def correct_suspicious(ann: Annotator, layer, r: str, fast: str) -> str:
    """Replace the fast value of every suspicious neuron (see the module docstring) by its exact pair-by-pair
    value."""
    b = ann.b
    zero = b.const(0.0, "zero")
    x, z = layer.x, layer.z
    tables = dense_tables(ann, layer, r) if layer.kind == "dense" else conv_tables(ann, layer, r)
    if layer.kind == "dense":  # any leading axes are samples
        x = b.op("Reshape", [x, b.const([-1, layer.weight.shape[0]], "shape", np.int64)], "x")
        z = b.op("Reshape", [z, b.const([-1, layer.weight.shape[1]], "shape", np.int64)], "z")
        r = b.op("Reshape", [r, b.const([-1, layer.weight.shape[1]], "shape", np.int64)], "R")
        fast_in = b.op("Reshape", [fast, b.const([-1, layer.weight.shape[0]], "shape", np.int64)], "S")
    else:
        fast_in = fast
    relevant = b.op("Not", [b.op("Equal", [r, ann.relevance_const(0.0, "zero")])], "R_nonzero")
    rank = len(layer.x_shape) if layer.kind == "conv" else 2
    z_max = ann.ctx.reduce("ReduceMax", b.op("Where", [relevant, b.op("Abs", [z]), zero], "abs_z"),
                           list(range(1, rank)), keepdims=1, hint="z_max")
    bound = b.op("Mul", [z_max, b.const((1 + MARGIN) * ann.threshold, "theta_margin")], "bound")
    lower = b.op("Mul", [b.op("Abs", [x]), b.const(tables.w_min, "w_min")], "lower")
    suspicious = b.op("And", [b.op("Not", [b.op("Equal", [x, zero])]), b.op("Less", [lower, bound])], "suspicious")
    indices = b.op("Transpose", [b.op("NonZero", [suspicious], "suspicious")], "suspicious", perm=[1, 0])
    chunk = max(1, SUSPICIOUS_CHUNK_PAIRS // tables.pairs_per_neuron)
    count = b.op("Gather", [b.op("Shape", [indices]), b.const(0, "zero_i", np.int64)], "n_suspicious")
    trips = b.op("Div", [b.op("Add", [count, b.const(chunk - 1, "chunk_m1", np.int64)]),
                         b.const(chunk, "chunk", np.int64)], "trips")
    body = loop_body(ann, tables, x, indices, chunk, b.fresh("loop"))
    exact = b.op("Loop", [trips, "", fast_in], "S_exact", body=body)
    return exact if fast_in is fast else b.op("Reshape", [exact, b.op("Shape", [fast])], "S")


class Tables:
    """What the pair-by-pair evaluation gathers from: ``weights`` ``[J-index, ..., Kg]`` (by input channel or
    neuron), ``inv_z`` and ``R`` laid out by (sample, output position, group), and the geometry."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def nonzero_min(w: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The smallest non-zero ``|w|`` along ``axes`` (float32's largest value where all are zero)."""
    a = np.abs(w).astype(np.float32)
    np.putmask(a, a == 0, np.inf)
    a = a.min(axis=axes)
    return np.where(np.isinf(a), FLOAT32_MAX, a).astype(np.float32)


def dense_tables(ann: Annotator, layer, r: str) -> Tables:
    b = ann.b
    j, k = layer.weight.shape
    shape = b.const([-1, k], "shape", np.int64)
    weight, transposed = stored_weight(b, layer)
    return Tables(kind="dense", weights=weight, transposed=transposed,
                  inv_z=ann.inverse(b.op("Reshape", [layer.z, shape], "z")),
                  r=b.op("Reshape", [r, shape], "R"), w_min=nonzero_min(layer.weight.value, (1,))[None],
                  pairs_per_neuron=k, k=k)


def conv_tables(ann: Annotator, layer, r: str) -> Tables:
    b = ann.b
    wd, groups = layer.window, layer.group
    cout, cin_g = layer.weight.shape[:2]
    taps, kg, positions = int(np.prod(wd.kernel)), cout // groups, int(np.prod(wd.out_spatial))
    weights = reshape(transpose(reshape(layer.weight, (groups, kg, cin_g, taps)), (0, 2, 3, 1)),
                      (groups * cin_g, taps, kg))  # [Cin, taps, Kg]
    pad_row = b.const([0, 0, 0, 0, 0, 1, 0, 0], "pads", np.int64)  # one more output position: the sentinel

    def by_position(t, hint, fill):
        return b.op("Pad", [to_positions(b, t, groups, kg, positions), pad_row, fill], hint)
    rank = len(layer.x_shape)
    return Tables(kind="conv", weights=weights.emit(b, "W_by_input"),
                  inv_z=by_position(ann.inverse(layer.z), "inv_z_table", b.const(0.0, "zero")),
                  r=by_position(r, "R_table", ann.relevance_const(0.0, "zero")),
                  w_min=nonzero_min(weights.value, (1, 2)).reshape(1, -1, *[1] * (rank - 2)),
                  pairs_per_neuron=taps * kg, taps=taps, kg=kg, cin_g=cin_g,
                  positions_of=b.const(output_positions(wd), "output_positions", np.int64),
                  spatial_strides=b.const(np.cumprod([1, *wd.in_spatial[::-1]])[:-1][::-1].copy(),
                                          "spatial_strides", np.int64))


def output_positions(wd) -> np.ndarray:
    """``[input position, tap]``: the flat output position whose window reads that input position at that tap, or
    the sentinel ``prod(out)`` where none does (stride, padding and dilation accounted for)."""
    r = wd.rank
    flat = np.zeros([*wd.in_spatial, *wd.kernel], dtype=np.int64)
    valid = np.ones(flat.shape, dtype=bool)
    place = np.cumprod([1, *wd.out_spatial[::-1]])[:-1][::-1]  # row-major strides of the output positions
    for a in range(r):
        i = np.arange(wd.in_spatial[a])[:, None]
        t = np.arange(wd.kernel[a])[None]
        shifted = i + wd.pads[a] - t * wd.dilations[a]
        o = shifted // wd.strides[a]
        ok = (shifted >= 0) & (shifted % wd.strides[a] == 0) & (o < wd.out_spatial[a])
        shape = [1] * (2 * r)
        shape[a], shape[r + a] = wd.in_spatial[a], wd.kernel[a]
        flat = flat + (o * place[a]).reshape(shape)
        valid = valid & ok.reshape(shape)
    table = np.where(valid, flat, int(np.prod(wd.out_spatial)))
    return table.reshape(int(np.prod(wd.in_spatial)), int(np.prod(wd.kernel)))


def loop_body(ann: Annotator, tables: Tables, x: str, indices: str, chunk: int, prefix: str) -> onnx.GraphProto:
    """One Loop iteration: the next ``chunk`` suspicious neurons, evaluated pair by pair (``d = (a_j w_jk) /
    z_k >= theta``, summed against the gathered ``R_k``), scattered into the loop-carried value."""
    graph = onnx.GraphProto(name=prefix)
    bb = GraphBuilder(graph, prefix=prefix)
    dtype = ann.dtype
    step, cond, carried = bb.fresh("i"), bb.fresh("cond_in"), bb.fresh("S_in")

    def const(value, hint, dt=np.int64):
        return bb.const(value, hint, dt)

    start = bb.op("Unsqueeze", [bb.op("Mul", [step, const(chunk, "chunk")]), const([0], "axes")], "start")
    end = bb.op("Add", [start, const([chunk], "chunk")], "end")
    rows = bb.op("Slice", [indices, start, end, const([0], "axes")], "rows")  # [c, rank]

    def column(lo, hi):
        return bb.op("Slice", [rows, const([lo], "start"), const([hi], "end"), const([1], "axes")], "column")
    sample = column(0, 1)
    if tables.kind == "dense":
        k = tables.k
        if tables.transposed:  # stored [K, J]: the columns of the suspicious neurons
            picked = bb.op("Gather", [tables.weights, column(1, 2)], "w", axis=1)  # [K, c, 1]
            weights = bb.op("Transpose", [bb.op("Reshape", [picked, const([k, -1], "shape")])], "w", perm=[1, 0])
        else:
            weights = bb.op("Reshape", [bb.op("Gather", [tables.weights, column(1, 2)], "w"), const([-1, k], "shape")])
        inv_z = bb.op("Reshape", [bb.op("Gather", [tables.inv_z, sample], "inv_z"), const([-1, k], "shape")])
        r = bb.op("Reshape", [bb.op("Gather", [tables.r, sample], "R"), const([-1, k], "shape")])
        a = bb.op("Reshape", [bb.op("GatherND", [x, rows], "a"), const([-1, 1], "shape")])
        axes = [1]
    else:
        channel = column(1, 2)
        spatial = bb.op("Slice", [rows, const([2], "start"), const([np.iinfo(np.int64).max], "end"),
                                  const([1], "axes")], "spatial")
        flat = bb.op("ReduceSum", [bb.op("Mul", [spatial, tables.spatial_strides]), const([1], "axes")], "flat",
                     keepdims=1)
        positions = bb.op("Reshape", [bb.op("Gather", [tables.positions_of, flat], "positions"),
                                      const([-1, tables.taps], "shape")], "positions")  # [c, taps]
        group = bb.op("Div", [channel, const(tables.cin_g, "cin_g")], "group")
        like = bb.op("Shape", [positions])
        minus_one = const([-1], "axes")
        where = bb.op("Concat", [bb.op("Unsqueeze", [bb.op("Expand", [sample, like]), minus_one]),
                                 bb.op("Unsqueeze", [positions, minus_one]),
                                 bb.op("Unsqueeze", [bb.op("Expand", [group, like]), minus_one])], "where", axis=-1)
        inv_z = bb.op("GatherND", [tables.inv_z, where], "inv_z")  # [c, taps, Kg]
        r = bb.op("GatherND", [tables.r, where], "R")
        weights = bb.op("Reshape", [bb.op("Gather", [tables.weights, channel], "w"),
                                    const([-1, tables.taps, tables.kg], "shape")], "w")
        a = bb.op("Reshape", [bb.op("GatherND", [x, rows], "a"), const([-1, 1, 1], "shape")])
        axes = [1, 2]
    d = bb.op("Mul", [bb.op("Mul", [a, weights], "c"), inv_z], "d")
    theta = bb.op("Cast", [bb.op("GreaterOrEqual", [d, const(ann.threshold, "theta", np.float32)])], "theta",
                  to=dtype)
    values = bb.op("ReduceSum", [bb.op("Mul", [theta, r]), const(axes, "axes")], "values", keepdims=0)
    updated = bb.op("ScatterND", [carried, rows, values], "S")
    cond_out = bb.op("Identity", [cond], "cond")
    bb.commit()
    graph.input.extend([helper.make_tensor_value_info(step, TensorProto.INT64, []),
                        helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
                        helper.make_tensor_value_info(carried, dtype, None)])
    graph.output.extend([helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
                         helper.make_tensor_value_info(updated, dtype, None)])
    return graph
