"""Pooling: average pools as linear maps with fixed weights, max pools as routing to the window's arg-max.

Each emitter wraps its node in a view that knows the op's geometry, and hands it to the rule the family planned for
the node (classic: :class:`onnxlrp.node_rules.Norm` / :class:`onnxlrp.node_rules.WinnerTakesAll`; R-LRP: Prop. 13).

- An :class:`AveragingView` offers ``spread(g) = W^T g`` (the transposed pooling map, shaped like the input) and the
  R-LRP factor map ``Card(J_i) / (N P1 P2)`` of Prop. 13 with Eq. 12.
- A :class:`MaxView` offers ``route_first(R)``: each window's relevance to its first arg-max (as the gradient routes
  it; overlapping windows add up), and ``route_all(R)``: to every arg-max of the window (ties: all of them).
"""

from __future__ import annotations

import numpy as np

from onnxlrp.layers import Window
from onnxlrp.quotients import factors_of, mul

from .helpers import attr, explicit_pads, float_mask, reshape_like
from .registry import backward


def pool_window(ctx, node, *, with_ceil: bool = True) -> Window | None:
    """Window geometry of a pooling node; ceil_mode windows become extra end padding (``with_ceil``)."""
    x_shape, y_shape = ctx.shapes.get(node.input[0]), ctx.shapes.get(node.output[0])
    if not x_shape or not y_shape or any(d is None for d in x_shape[1:] + y_shape[1:]):
        return None
    kernel = list(attr(node, "kernel_shape"))
    r = len(kernel)
    strides = list(attr(node, "strides", [1] * r))
    dilations = list(attr(node, "dilations", [1] * r))
    in_sp, out_sp = x_shape[2:], y_shape[2:]
    pads = explicit_pads(attr(node, "auto_pad", "NOTSET"), attr(node, "pads"), in_sp, kernel, strides, dilations)
    if with_ceil:
        for a in range(r):
            reach = (out_sp[a] - 1) * strides[a] + dilations[a] * (kernel[a] - 1) + 1
            pads[a + r] += max(reach - (in_sp[a] + pads[a] + pads[a + r]), 0)
    return Window(in_sp, out_sp, kernel, strides, pads, dilations)


def check_pool(ctx, node):
    if pool_window(ctx, node) is None:
        return "needs static input and output shapes (give --input-shape)"
    return None


def rlrp_pool_factor(window: Window, channels: int) -> np.ndarray:
    """Prop. 13 with Eq. 12: ``Card(J_i) / (N^(l+1) * P1*P2)``, one output channel per input channel."""
    n_out = channels * int(np.prod(window.out_spatial))
    return (window.cover_count() / (n_out * int(np.prod(window.kernel))))[None]


def tap_validity(wd: Window) -> np.ndarray:
    """[K, *out]: True where window tap k of output j reads a real input element, not padding."""
    r = wd.rank
    valid = None
    for a in range(r):
        j = np.arange(wd.out_spatial[a])[None]
        t = np.arange(wd.kernel[a])[:, None]
        i = j * wd.strides[a] - wd.pads[a] + t * wd.dilations[a]
        axis_valid = (i >= 0) & (i < wd.in_spatial[a])  # [k_a, out_a]
        valid = axis_valid if valid is None else np.multiply.outer(valid, axis_valid).astype(bool)
    order = [2 * a for a in range(r)] + [2 * a + 1 for a in range(r)]  # (k0, out0, k1, out1) -> taps first
    return valid.transpose(order).reshape(int(np.prod(wd.kernel)), *wd.out_spatial)


def first_max_taps(b, windows: str, axis: int, k: int, after: int) -> str:
    """Boolean mask of the first maximum of each window, whose ``k`` taps (in row-major order) lie along ``axis``
    of ``windows``, followed by ``after`` axes: ArgMax keeps the first of equal maxima (the arg-max the gradient
    picks)."""
    winner = b.op("ArgMax", [windows], "winner", axis=axis, keepdims=1, select_last_index=0)
    index = np.arange(k).reshape([1] * axis + [k] + [1] * after)
    return b.op("Equal", [winner, b.const(index, "tap_index", np.int64)], "winner")


def tiles(wd: Window) -> bool:
    """Whether the windows tile the input: stride = kernel, no dilation, no padding (trailing positions that no
    window reaches are allowed)."""
    return wd.strides == wd.kernel and all(d == 1 for d in wd.dilations) and not any(wd.pads)


def tile_order(rank: int) -> list[int]:
    """The permutation of ``[N, C, o1, k1, o2, k2, ...]`` into ``[N, C, k1, k2, ..., o1, o2, ...]``."""
    return [0, 1] + [3 + 2 * a for a in range(rank)] + [2 + 2 * a for a in range(rank)]


def window_patches(b, x: str, wd: Window, channels: int) -> tuple[str, str | None]:
    """The windows of ``x`` as ``[N, C, K, *out]`` (zero at padded taps), and the one-hot kernel that made them:
    a Conv over the channels as a batch (``[N C, 1, *in]``: one input and ``K`` output channels, ungrouped), or, for
    windows that tile the input, a Reshape and a Transpose (no kernel). A grouped Conv with ``K`` outputs per group
    would be shorter, but onnxruntime-web's WebGPU kernels get it wrong for ``K`` = 9 (3x3 windows) among others
    (docs/onnxruntime-web-webgpu.md)."""
    k = int(np.prod(wd.kernel))
    shape = b.const([0, channels, k, *wd.out_spatial], "shape", np.int64)
    if tiles(wd):
        covered = [o * s for o, s in zip(wd.out_spatial, wd.kernel, strict=True)]
        if covered != list(wd.in_spatial):
            axes = list(range(2, 2 + wd.rank))
            x = b.op("Slice", [x, b.const([0] * wd.rank, "starts", np.int64), b.const(covered, "ends", np.int64),
                               b.const(axes, "axes", np.int64)], "x")
        split = [d for o, s in zip(wd.out_spatial, wd.kernel, strict=True) for d in (o, s)]
        x = b.op("Reshape", [x, b.const([0, channels, *split], "shape", np.int64)], "tiles")
        x = b.op("Transpose", [x], "tiles", perm=tile_order(wd.rank))
        return b.op("Reshape", [x, shape], "patches"), None
    kernel = b.const(np.eye(k, dtype=np.float32).reshape(k, 1, *wd.kernel), "onehot_kernel")
    planes = b.op("Reshape", [x, b.const([-1, 1, *wd.in_spatial], "shape", np.int64)], "planes")
    patches = b.op("Conv", [planes, kernel], "patches", strides=wd.strides, pads=wd.pads, dilations=wd.dilations,
                   group=1)
    return b.op("Reshape", [patches, b.const([-1, channels, k, *wd.out_spatial], "shape", np.int64)],
                "patches"), kernel


def scatter_windows(b, routed: str, wd: Window, channels: int, kernel: str | None) -> str:
    """``[N, C, K, *out]`` window values added back at their input positions: the one-hot kernel transposed over the
    channels as a batch, or, for windows that tile the input, the inverse Transpose and Reshape (zeros where no
    window reaches)."""
    k = int(np.prod(wd.kernel))
    if kernel is None:
        routed = b.op("Reshape", [routed, b.const([0, channels, *wd.kernel, *wd.out_spatial], "shape", np.int64)],
                      "R")
        routed = b.op("Transpose", [routed], "R", perm=[int(p) for p in np.argsort(tile_order(wd.rank))])
        covered = [o * s for o, s in zip(wd.out_spatial, wd.kernel, strict=True)]
        routed = b.op("Reshape", [routed, b.const([0, channels, *covered], "shape", np.int64)], "R")
        if covered == list(wd.in_spatial):
            return routed
        rest = [i - c for i, c in zip(wd.in_spatial, covered, strict=True)]
        return b.op("Pad", [routed, b.const([0] * (2 + wd.rank) + [0, 0] + rest, "pads", np.int64)], "R",
                    mode="constant")
    routed = b.op("Reshape", [routed, b.const([-1, k, *wd.out_spatial], "shape", np.int64)], "R")
    planes = wd.conv_transpose(b, routed, kernel, 1, "R", (k, 1))
    return b.op("Reshape", [planes, b.const([-1, channels, *wd.in_spatial], "shape", np.int64)], "R")


# ---------------------------------------------------------------- average pools

class AveragingView:
    """An averaging node ``y = W x`` with fixed non-negative weights: ``x``, ``y`` (float32), ``spread(g) = W^T g``
    and R-LRP's factor map (``None`` where it is uniform, which R-LRP drops: see :func:`onnxlrp.rules.scaled_product`).
    ``spread(g, up_to_scale=True)`` may leave out a uniform positive factor of ``W`` (R-LRP's relevance is defined up
    to one)."""

    def __init__(self, ctx, node):
        self.ctx, self.node = ctx, node
        self.x, self.y = ctx.value(node.input[0]), ctx.value(node.output[0])

    def spread(self, b, g: str, up_to_scale: bool = False) -> str:
        raise NotImplementedError

    def rlrp_factor(self) -> np.ndarray | None:
        return None

    def rlrp_spread(self, b, g: str) -> str:
        """R-LRP's ``W^T g`` (Prop. 13 with Eq. 12) before the factor map :meth:`rlrp_factor`."""
        return self.spread(b, g, up_to_scale=True)

    def growth(self) -> float:
        """``log2`` of a bound of ``max |W^T g| / max |g|`` for the spread of :meth:`spread` (global: 1)."""
        return 0.0


class WindowAverage(AveragingView):
    """AveragePool: a depthwise convolution with weights ``1/divisor`` (the count of the window's taps inside the
    input, or inside the padded input with ``count_include_pad``)."""

    def __init__(self, ctx, node):
        super().__init__(ctx, node)
        self.window = pool_window(ctx, node)
        self.channels = ctx.shapes[node.input[0]][1]
        include_pad = bool(attr(node, "count_include_pad", 0))
        self.divisor = pool_window(ctx, node, with_ceil=False).valid_count(include_pad=include_pad)

    def spread(self, b, g, up_to_scale=False):  # the divisor may vary near borders: it always stays
        weighted = mul(b, g, b.const((1.0 / self.divisor)[None], "inv_divisor"))
        ones = np.ones([self.channels, 1, *self.window.kernel], dtype=np.float32)
        out = self.window.conv_transpose(b, weighted, b.const(ones, "ones_kernel"), self.channels, "WTg",
                                         ones.shape[:2])
        # weights 1/divisor <= 1, and an input lies in at most prod(kernel) windows
        return grown(b, out, g, np.log2(np.prod(self.window.kernel)))

    def rlrp_factor(self):
        return rlrp_pool_factor(self.window, self.channels)

    def growth(self):  # weights 1/divisor <= 1; an input lies in at most prod(kernel) windows
        return float(np.log2(np.prod(self.window.kernel)))


class AxesAverage(AveragingView):
    """GlobalAveragePool and ReduceMean: the mean over ``axes`` (``W^T g`` broadcasts ``g / count`` back)."""

    def __init__(self, ctx, node, axes: list[int], keepdims: bool):
        super().__init__(ctx, node)
        self.axes, self.keepdims = axes, keepdims
        shape = ctx.shapes[node.input[0]]
        self.count = int(np.prod([shape[a] for a in axes]))

    def spread(self, b, g, up_to_scale=False):
        if not self.keepdims:
            g = b.op("Unsqueeze", [g, b.const(self.axes, "axes", np.int64)], "R")
        return g if up_to_scale else grown(b, mul(b, g, b.const(1.0 / self.count, "scale")), g, 0.0)


def grown(b, out: str, g: str, growth: float) -> str:
    """Record (with range keeping) that ``log2 max |out| <= log2 max |g| + growth``."""
    if b.ranges is not None and b.ranges.bound_of(g) is not None:
        b.ranges.set_bound(out, b.ranges.bound_of(g) + growth)
    return out


def averaging_rule(ctx, node, view: AveragingView, r: str) -> dict:
    """The planned rule's ``average`` (classic: Norm; R-LRP: Prop. 13), between the family's per-layer steps."""
    r_scaled, scale = ctx.family.before_layer(ctx, node, r, view.x, view.growth())
    rule = ctx.rule(node)
    r_in = rule.average(ctx, view, r_scaled) if scale is None else rule.average(ctx, view, r_scaled, scale=scale)
    return {0: ctx.family.after_layer(ctx, r_in, r)}


def pool_nonnegative(is_nonneg, node, tensor) -> bool:
    """A pool of a non-negative tensor is non-negative (a MaxPool's Indices output is not relevance-carrying)."""
    return is_nonneg(node.input[0]) and (node.op_type != "MaxPool" or tensor == node.output[0])


@backward("AveragePool", kind="average_pool", nonnegative=pool_nonnegative, check=check_pool)
def average_pool(ctx, node, r_out):
    return averaging_rule(ctx, node, WindowAverage(ctx, node), r_out[0])


def check_global(ctx, node):
    shape = ctx.shapes.get(node.input[0])
    if not shape or any(d is None for d in shape[1:]):
        return "needs static channel and spatial dims"
    return None


@backward("GlobalAveragePool", kind="average_pool", nonnegative=pool_nonnegative, check=check_global)
def global_average_pool(ctx, node, r_out):
    rank = len(ctx.shapes[node.input[0]])
    return averaging_rule(ctx, node, AxesAverage(ctx, node, list(range(2, rank)), keepdims=True), r_out[0])


def reduce_axes(ctx, node) -> list[int] | None:
    rank = len(ctx.shapes[node.input[0]])
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.constants.get(node.input[1])
        if axes is None:
            return None
    if axes is None or len(axes) == 0:
        return list(range(rank))
    return sorted(int(a) % rank for a in axes)


def check_reduce_mean(ctx, node):
    reason = check_global(ctx, node)
    if reason:
        return reason
    axes = reduce_axes(ctx, node)
    if axes is None:
        return "needs constant axes"
    return "a mean over the batch axis mixes samples" if 0 in axes else None


@backward("ReduceMean", data_inputs=(0,), kind="average_pool", nonnegative=pool_nonnegative,
          check=check_reduce_mean)
def reduce_mean(ctx, node, r_out):
    """A mean over axes, handled like GlobalAveragePool over those axes."""
    view = AxesAverage(ctx, node, reduce_axes(ctx, node), keepdims=bool(attr(node, "keepdims", 1)))
    return averaging_rule(ctx, node, view, r_out[0])


# ---------------------------------------------------------------- max pools

class MaxView:
    """A max-pooling node: ``x``, ``y`` (float32), the two routings, and R-LRP's factor map (``None``: uniform)."""

    def __init__(self, ctx, node):
        self.ctx, self.node = ctx, node
        self.x = ctx.value(node.input[0])

    def route_first(self, b, r: str) -> str:
        raise NotImplementedError

    def route_all(self, b, r: str) -> str:
        raise NotImplementedError

    def rlrp_factor(self) -> np.ndarray | None:
        return None

    def growth(self) -> float:
        """``log2`` of the largest number of windows an input lies in (global: 1)."""
        return 0.0


class WindowMax(MaxView):
    """MaxPool: windows extracted by a one-hot depthwise convolution (``[N, C, K, *out]``), masked, and added back
    at their input positions by the one-hot kernel transposed."""

    def __init__(self, ctx, node):
        super().__init__(ctx, node)
        self.y = ctx.value(node.output[0])
        self.window = pool_window(ctx, node)
        self.channels = ctx.shapes[node.input[0]][1]

    def route_first(self, b, r):
        """Padded taps are set to ``-inf`` so that they never win. When ``r = y * c`` (see
        :func:`onnxlrp.quotients.product`), the winner's input is ``y``, so the routed relevance is also
        ``x * route(c)`` (remembered as such; ``drop_unread`` keeps one of the two)."""
        wd, channels = self.window, self.channels
        patches, kernel = window_patches(b, self.x, wd, channels)
        valid = tap_validity(wd)[None, None]
        if not valid.all():
            patches = b.op("Add", [patches, b.const(np.where(valid, 0.0, -np.inf), "padded_taps")], "patches")
        is_winner = float_mask(b, first_max_taps(b, patches, 2, int(np.prod(wd.kernel)), wd.rank))
        axes = b.const([2], "axes", np.int64)

        def route(v: str) -> str:
            return scatter_windows(b, mul(b, is_winner, b.op("Unsqueeze", [v, axes], "R")), wd, channels, kernel)

        factors = factors_of(b, r, self.y)
        r_in = route(r)
        if factors is not None:  # an input lies in at most prod(kernel) windows
            b.products[r_in] = (self.x, grown(b, route(factors[1]), factors[1], np.log2(np.prod(wd.kernel))))
        return r_in

    def route_all(self, b, r):
        wd, channels = self.window, self.channels
        patches, kernel = window_patches(b, self.x, wd, channels)
        is_max = b.op("Equal", [patches, b.op("Unsqueeze", [self.y, b.const([2], "axes", np.int64)], "y")])
        is_max = b.op("And", [is_max, b.const(tap_validity(wd)[None, None], "valid_taps", np.bool_)])
        routed = mul(b, float_mask(b, is_max), b.op("Unsqueeze", [r, b.const([2], "axes", np.int64)], "R"))
        return scatter_windows(b, routed, wd, channels, kernel)

    def rlrp_factor(self):
        return rlrp_pool_factor(self.window, self.channels)

    def growth(self):
        return float(np.log2(np.prod(self.window.kernel)))


class GlobalMax(MaxView):
    """GlobalMaxPool: each channel's spatial values as one window ``[N, C, HW]``."""

    def windows(self, b, r):
        flat = b.op("Reshape", [self.x, b.const([0, 0, -1], "shape", np.int64)], "x")
        return flat, b.op("Reshape", [r, b.const([0, 0, 1], "shape", np.int64)], "R")

    def route_first(self, b, r):
        flat, r = self.windows(b, r)
        area = int(np.prod(self.ctx.shapes[self.node.input[0]][2:]))
        return reshape_like(self.ctx, mul(b, float_mask(b, first_max_taps(b, flat, 2, area, 0)), r), self.x)

    def route_all(self, b, r):
        flat, r = self.windows(b, r)
        y = b.op("Reshape", [self.ctx.value(self.node.output[0]), b.const([0, 0, 1], "shape", np.int64)], "y")
        return reshape_like(self.ctx, mul(b, float_mask(b, b.op("Equal", [flat, y])), r), self.x)


def max_rule(ctx, node, view: MaxView, r: str) -> dict:
    """The planned rule's ``max_pool`` (classic: winner-take-all; R-LRP: Prop. 13), between the family's per-layer
    steps."""
    r_scaled, scale = ctx.family.before_layer(ctx, node, r, view.x, view.growth())
    rule = ctx.rule(node)
    r_in = rule.max_pool(ctx, view, r_scaled) if scale is None else rule.max_pool(ctx, view, r_scaled, scale=scale)
    return {0: ctx.family.after_layer(ctx, r_in, r)}


@backward("MaxPool", data_outputs=(0,), kind="max_pool", nonnegative=pool_nonnegative, zero_preserving=True,
          check=check_pool)
def max_pool(ctx, node, r_out):
    return max_rule(ctx, node, WindowMax(ctx, node), r_out[0])


@backward("GlobalMaxPool", kind="max_pool", nonnegative=pool_nonnegative, zero_preserving=True, check=check_global)
def global_max_pool(ctx, node, r_out):
    return max_rule(ctx, node, GlobalMax(ctx, node), r_out[0])
