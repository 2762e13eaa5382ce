"""Tiny network descriptions and a plain ONNX builder for them.

A network is a list of layer objects (the dataclasses below).  Composite
layers (Residual, Concat, Sum) hold lists of layers, and may be nested.
All layers act on tensors with a leading batch axis; channel axis is 1.

``to_onnx`` turns such a list into a plain ONNX classifier graph (weights as
initializers) that onnx.checker accepts and onnxruntime runs.  The numpy
reference in ``reference.py`` evaluates the same description independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# --------------------------------------------------------------------------
# layer dataclasses (eq=False: they hold numpy arrays; identity is what counts)
# --------------------------------------------------------------------------


@dataclass(eq=False)
class Dense:
    """y = x @ W.T + b ; W has shape [out, in]; input must be [B, in]."""

    W: np.ndarray
    b: np.ndarray | None = None


@dataclass(eq=False)
class Conv:
    """ONNX Conv.  W: [cout, cin/groups, *kernel].  pads in ONNX order
    (begin_0, begin_1, ..., end_0, end_1, ...).  None means the ONNX default."""

    W: np.ndarray
    b: np.ndarray | None = None
    strides: tuple | None = None
    pads: tuple | None = None
    dilations: tuple | None = None
    groups: int = 1

    def __post_init__(self):
        nd = self.W.ndim - 2
        self.strides = tuple(int(s) for s in (self.strides or (1,) * nd))
        self.pads = tuple(int(p) for p in (self.pads or (0,) * (2 * nd)))
        self.dilations = tuple(int(d) for d in (self.dilations or (1,) * nd))
        self.groups = int(self.groups)
        assert len(self.strides) == nd and len(self.pads) == 2 * nd and len(self.dilations) == nd


@dataclass(eq=False)
class BatchNorm:
    """ONNX BatchNormalization (inference).  Only directly after Conv/Dense."""

    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float = 1e-5


@dataclass(eq=False)
class Relu:
    pass


@dataclass(eq=False)
class MaxPool:
    kernel: tuple
    strides: tuple | None = None
    pads: tuple | None = None
    ceil_mode: int = 0

    def __post_init__(self):
        nd = len(self.kernel)
        self.kernel = tuple(int(k) for k in self.kernel)
        self.strides = tuple(int(s) for s in (self.strides or (1,) * nd))
        self.pads = tuple(int(p) for p in (self.pads or (0,) * (2 * nd)))
        self.ceil_mode = int(self.ceil_mode)


@dataclass(eq=False)
class AvgPool:
    kernel: tuple
    strides: tuple | None = None
    pads: tuple | None = None
    count_include_pad: int = 0
    ceil_mode: int = 0

    def __post_init__(self):
        nd = len(self.kernel)
        self.kernel = tuple(int(k) for k in self.kernel)
        self.strides = tuple(int(s) for s in (self.strides or (1,) * nd))
        self.pads = tuple(int(p) for p in (self.pads or (0,) * (2 * nd)))
        self.count_include_pad = int(self.count_include_pad)
        self.ceil_mode = int(self.ceil_mode)


@dataclass(eq=False)
class GlobalAvgPool:
    pass


@dataclass(eq=False)
class GlobalMaxPool:
    pass


@dataclass(eq=False)
class Flatten:
    """ONNX Flatten(axis=1): [B, ...] -> [B, prod(...)]."""


@dataclass(eq=False)
class Residual:
    """out = branch(x) + shortcut(x); an empty shortcut is the identity."""

    branch: list
    shortcut: list = field(default_factory=list)


@dataclass(eq=False)
class Concat:
    """out = Concat([b(x) for b in branches], axis=1); an empty branch is x."""

    branches: list


@dataclass(eq=False)
class Sum:
    """out = Sum(b(x) for b in branches) (n-ary ONNX Sum); empty branch is x."""

    branches: list


LINEAR_TYPES = (Dense, Conv)


def sublists(layer):
    """The child layer lists of a composite layer, in depth-first order
    (Residual: branch first, then shortcut)."""
    if isinstance(layer, Residual):
        return [layer.branch, layer.shortcut]
    if isinstance(layer, (Concat, Sum)):
        return list(layer.branches)
    return []


def iter_linear(layers):
    """Dense/Conv layers in depth-first order of the spec (the order used for
    per-layer rule lists in reference.lrp)."""
    for layer in layers:
        if isinstance(layer, LINEAR_TYPES):
            yield layer
        for sub in sublists(layer):
            yield from iter_linear(sub)


# --------------------------------------------------------------------------
# shape arithmetic (per sample, i.e. without the batch axis)
# --------------------------------------------------------------------------


def conv_out_size(n, k, s, pb, pe, d=1):
    """ONNX Conv output length along one axis."""
    return (n + pb + pe - d * (k - 1) - 1) // s + 1


def pool_out_size(n, k, s, pb, pe, ceil_mode=0):
    """ONNX pool output length along one axis.  With ceil_mode a last window
    that would START inside the end padding is dropped (what onnxruntime and
    PyTorch do; plain ONNX shape inference keeps it)."""
    num = n + pb + pe - k
    if not ceil_mode:
        return num // s + 1
    o = -(-num // s) + 1
    if (o - 1) * s >= n + pb:
        o -= 1
    return o


def layer_output_shape(L, shape):
    shape = tuple(int(d) for d in shape)
    if isinstance(L, Dense):
        assert shape == (L.W.shape[1],), (shape, L.W.shape)
        return (L.W.shape[0],)
    if isinstance(L, Conv):
        nd = L.W.ndim - 2
        assert len(shape) == nd + 1 and shape[0] == L.W.shape[1] * L.groups, (shape, L.W.shape)
        sp = tuple(conv_out_size(shape[1 + a], L.W.shape[2 + a], L.strides[a], L.pads[a], L.pads[nd + a],
                                 L.dilations[a]) for a in range(nd))
        return (L.W.shape[0],) + sp
    if isinstance(L, (MaxPool, AvgPool)):
        nd = len(L.kernel)
        sp = tuple(pool_out_size(shape[1 + a], L.kernel[a], L.strides[a], L.pads[a], L.pads[nd + a], L.ceil_mode)
                   for a in range(nd))
        return (shape[0],) + sp
    if isinstance(L, (GlobalAvgPool, GlobalMaxPool)):
        return (shape[0],) + (1,) * (len(shape) - 1)
    if isinstance(L, Flatten):
        return (int(np.prod(shape)),)
    if isinstance(L, (BatchNorm, Relu)):
        return shape
    if isinstance(L, (Residual, Sum)):
        outs = [output_shape(b, shape) for b in sublists(L)]
        assert all(o == outs[0] for o in outs), outs
        return outs[0]
    if isinstance(L, Concat):
        outs = [output_shape(b, shape) for b in L.branches]
        assert all(o[1:] == outs[0][1:] for o in outs), outs
        return (sum(o[0] for o in outs),) + outs[0][1:]
    raise TypeError(f"unknown layer {type(L).__name__}")


def output_shape(layers, shape):
    """Per-sample output shape of a layer list for per-sample input ``shape``."""
    for L in layers:
        shape = layer_output_shape(L, shape)
    return tuple(shape)


# --------------------------------------------------------------------------
# random layer helpers
# --------------------------------------------------------------------------


def _tup(v, n):
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    v = tuple(int(a) for a in v)
    assert len(v) == n, v
    return v


def dense(rng, nin, nout, bias=True):
    W = rng.normal(0.0, 1.0 / np.sqrt(nin), size=(nout, nin))
    b = rng.normal(0.0, 0.1, size=nout) if bias else None
    return Dense(W, b)


def conv(rng, cin, cout, k, stride=1, pad=0, dilation=1, groups=1, bias=True, ndim=None):
    """Random Conv.  k/stride/dilation: int or per-axis tuple.  pad: int
    (symmetric), per-axis tuple (symmetric), or a 2*ndim tuple in ONNX order.
    ndim defaults to len(k) when k is a tuple, else 2."""
    if ndim is None:
        ndim = 2 if isinstance(k, (int, np.integer)) else len(k)
    k = _tup(k, ndim)
    if isinstance(pad, (int, np.integer)):
        pads = (int(pad),) * (2 * ndim)
    elif len(pad) == ndim:
        pads = tuple(int(p) for p in pad) * 2
    else:
        pads = _tup(pad, 2 * ndim)
    assert cin % groups == 0 and cout % groups == 0
    fan_in = (cin // groups) * int(np.prod(k))
    W = rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=(cout, cin // groups) + k)
    b = rng.normal(0.0, 0.1, size=cout) if bias else None
    return Conv(W, b, strides=_tup(stride, ndim), pads=pads, dilations=_tup(dilation, ndim), groups=groups)


def batchnorm(rng, c, eps=1e-5):
    return BatchNorm(
        scale=rng.uniform(0.5, 1.5, size=c),
        bias=rng.normal(0.0, 0.1, size=c),
        mean=rng.normal(0.0, 0.1, size=c),
        var=rng.uniform(0.5, 1.5, size=c),
        eps=eps,
    )


# --------------------------------------------------------------------------
# ONNX builder
# --------------------------------------------------------------------------


class _Builder:
    def __init__(self, dense_as):
        assert dense_as in ("gemm", "matmul"), dense_as
        self.dense_as = dense_as
        self.nodes = []
        self.inits = []
        self.count = 0

    def name(self, base):
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base, arr):
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), n))
        return n

    def node(self, op, inputs, base=None, **attrs):
        out = self.name(base or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name("n_" + op), **attrs))
        return out

    def seq(self, layers, x):
        for layer in layers:
            x = self.layer(layer, x)
        return x

    def layer(self, L, x):
        if isinstance(L, Dense):
            W = self.const("W", L.W)
            if self.dense_as == "gemm":
                ins = [x, W] + ([self.const("b", L.b)] if L.b is not None else [])
                return self.node("Gemm", ins, "gemm", transB=1)
            Wt = self.const("Wt", np.asarray(L.W).T)
            y = self.node("MatMul", [x, Wt], "matmul")
            if L.b is not None:
                y = self.node("Add", [y, self.const("b", L.b)], "add")
            return y
        if isinstance(L, Conv):
            ins = [x, self.const("W", L.W)] + ([self.const("b", L.b)] if L.b is not None else [])
            return self.node(
                "Conv", ins, "conv",
                kernel_shape=list(L.W.shape[2:]), strides=list(L.strides), pads=list(L.pads),
                dilations=list(L.dilations), group=L.groups,
            )
        if isinstance(L, BatchNorm):
            ins = [x] + [self.const(n, a) for n, a in
                         (("scale", L.scale), ("beta", L.bias), ("mean", L.mean), ("var", L.var))]
            return self.node("BatchNormalization", ins, "bn", epsilon=float(L.eps))
        if isinstance(L, Relu):
            return self.node("Relu", [x], "relu")
        if isinstance(L, MaxPool):
            return self.node("MaxPool", [x], "maxpool", kernel_shape=list(L.kernel), strides=list(L.strides),
                             pads=list(L.pads), ceil_mode=L.ceil_mode)
        if isinstance(L, AvgPool):
            return self.node("AveragePool", [x], "avgpool", kernel_shape=list(L.kernel), strides=list(L.strides),
                             pads=list(L.pads), ceil_mode=L.ceil_mode, count_include_pad=L.count_include_pad)
        if isinstance(L, GlobalAvgPool):
            return self.node("GlobalAveragePool", [x], "gap")
        if isinstance(L, GlobalMaxPool):
            return self.node("GlobalMaxPool", [x], "gmp")
        if isinstance(L, Flatten):
            return self.node("Flatten", [x], "flatten", axis=1)
        if isinstance(L, Residual):
            a = self.seq(L.branch, x)
            s = self.seq(L.shortcut, x)
            return self.node("Add", [a, s], "add")
        if isinstance(L, Concat):
            outs = [self.seq(b, x) for b in L.branches]
            return self.node("Concat", outs, "concat", axis=1)
        if isinstance(L, Sum):
            outs = [self.seq(b, x) for b in L.branches]
            return self.node("Sum", outs, "sum")
        raise TypeError(f"unknown layer {type(L).__name__}")


def to_onnx(layers, input_shape, *, opset=17, dense_as="gemm", softmax=False, dynamic_batch=True,
            input_name="x", output_name="y") -> onnx.ModelProto:
    """Build a plain float32 ONNX model of ``layers``.

    input_shape: the full input shape INCLUDING the batch axis, e.g. (1, 2, 6, 6).
    dense_as: "gemm" (Gemm transB=1) or "matmul" (MatMul(x, W.T) [+ Add(b)]).
    softmax: if True the graph output is Softmax(logits, axis=-1) and the
    logits tensor (named "logits") is an intermediate.
    dynamic_batch: the batch dimension is the symbolic "batch".
    """
    input_shape = tuple(int(d) for d in input_shape)
    out_shape = output_shape(layers, input_shape[1:])
    batch = "batch" if dynamic_batch else input_shape[0]
    bld = _Builder(dense_as)
    y = bld.seq(layers, input_name)
    if softmax:
        logits = bld.node("Identity", [y], "logits") if y == input_name else y
        # rename the final logits tensor to "logits" for readability
        for n in bld.nodes:
            n.output[:] = ["logits" if o == logits else o for o in n.output]
            n.input[:] = ["logits" if i == logits else i for i in n.input]
        bld.nodes.append(helper.make_node("Softmax", ["logits"], [output_name], name="n_softmax", axis=-1))
    else:
        if y == input_name:
            bld.nodes.append(helper.make_node("Identity", [y], [output_name], name="n_identity"))
        else:
            for n in bld.nodes:
                n.output[:] = [output_name if o == y else o for o in n.output]
                n.input[:] = [output_name if i == y else i for i in n.input]
    graph = helper.make_graph(
        bld.nodes, "netspec",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, *input_shape[1:]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, *out_shape])],
        initializer=bld.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="netspec")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model
