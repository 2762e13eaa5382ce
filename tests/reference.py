"""Independent numpy (float64) reference for forward, classic LRP and R-LRP.

Written from the equations, in "matrix form": every linear layer (Dense,
Conv, AvgPool, GlobalAvgPool) is unrolled into an explicit dense matrix
M [n_out, n_in] (built by loops over neurons) plus a bias vector and a 0/1
connectivity matrix C [n_out, n_in] (C[j, i] = 1 iff input i is wired to
output j -- for a conv: i lies inside j's receptive field, in j's group,
padding positions excluded).  Each LRP rule is then one generic matrix
formula on (M, b, x, R).  Tensors are flattened per sample in C order.

Public API
----------
forward(layers, x)                      -> output [B, ...] float64
lrp(layers, x, rule, target=None, **p)  -> relevance [B, *x.shape[1:]]
rlrp(layers, x, target=None, normalize=True) -> R-LRP relevance
fold_batchnorm(layers)                  -> copy of the spec, BN folded
linear_matrix(layer, in_shape)          -> (M, b, C) for Dense/Conv/AvgPool/GlobalAvgPool
rlrp_card(layer, in_shape)              -> Card(J_i) map, shape in_shape
initial_relevance(logits, target)       -> one-hot(target) * logit
stab(z, eps)                            -> z + eps * sign(z), sign(0) = +1
RULES                                   -> name -> matrix rule function

Conventions (Zennit 0.5): see the docstrings of the rule functions.
"""

from __future__ import annotations

import numpy as np
from netspec import (
    AvgPool,
    BatchNorm,
    Concat,
    Conv,
    Dense,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool,
    Relu,
    Residual,
    Sum,
    iter_linear,
    layer_output_shape,
    pool_out_size,
    sublists,
)
from scipy.sparse import issparse

EPS = 1e-6


def stab(z, eps=EPS):
    """Zennit stabilizer: z + eps * sign(z) with sign(0) = +1."""
    return z + eps * np.where(z >= 0, 1.0, -1.0)


# ==========================================================================
# unrolled matrices
# ==========================================================================


def _flat_index(shape, idx):
    return int(np.ravel_multi_index(tuple(int(i) for i in idx), shape))


def dense_matrix(L: Dense):
    W = np.asarray(L.W, dtype=np.float64)
    b = np.zeros(W.shape[0]) if L.b is None else np.asarray(L.b, dtype=np.float64)
    return W.copy(), b, np.ones_like(W)


def conv_matrix(L: Conv, in_shape):
    """Unroll an ONNX Conv (any spatial rank) into M [n_out, n_in], b, C."""
    in_shape = tuple(in_shape)
    W = np.asarray(L.W, dtype=np.float64)
    nd = W.ndim - 2
    cout, cin_g = W.shape[:2]
    kernel = W.shape[2:]
    out_shape = layer_output_shape(L, in_shape)
    cout_g = cout // L.groups
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    M = np.zeros((n_out, n_in))
    C = np.zeros((n_out, n_in))
    for co in range(cout):
        g = co // cout_g
        for opos in np.ndindex(*out_shape[1:]):
            j = _flat_index(out_shape, (co,) + opos)
            for cl in range(cin_g):
                ci = g * cin_g + cl
                for kk in np.ndindex(*kernel):
                    ipos = [opos[a] * L.strides[a] - L.pads[a] + kk[a] * L.dilations[a] for a in range(nd)]
                    if all(0 <= ipos[a] < in_shape[1 + a] for a in range(nd)):  # padding: no connection
                        i = _flat_index(in_shape, (ci, *ipos))
                        M[j, i] += W[(co, cl) + kk]
                        C[j, i] = 1.0
    b = np.zeros(cout) if L.b is None else np.asarray(L.b, dtype=np.float64)
    b_full = np.repeat(b, n_out // cout)  # C order: channel is the slowest axis
    return M, b_full, C


def pool_windows(kernel, strides, pads, ceil_mode, in_shape):
    """Windows of a per-channel pool.  Returns (out_shape, windows) where
    windows[j] lists, in row-major order within the window, the flat input
    index of every window position that lies inside the PADDED input, or -1
    for a padding position.  (With ceil_mode, positions past the end padding
    are not part of the window at all.)"""
    in_shape = tuple(in_shape)
    nd = len(kernel)
    sp_out = tuple(pool_out_size(in_shape[1 + a], kernel[a], strides[a], pads[a], pads[nd + a], ceil_mode)
                   for a in range(nd))
    out_shape = (in_shape[0],) + sp_out
    windows = []
    for c in range(in_shape[0]):
        for opos in np.ndindex(*sp_out):
            win = []
            for kk in np.ndindex(*kernel):
                ipos = [opos[a] * strides[a] - pads[a] + kk[a] for a in range(nd)]
                if any(p >= in_shape[1 + a] + pads[nd + a] for a, p in enumerate(ipos)):
                    continue  # beyond the end padding (ceil_mode overhang)
                if all(0 <= ipos[a] < in_shape[1 + a] for a in range(nd)):
                    win.append(_flat_index(in_shape, (c, *ipos)))
                else:
                    win.append(-1)
            windows.append(win)
    return out_shape, windows


def global_windows(in_shape):
    in_shape = tuple(in_shape)
    n_sp = int(np.prod(in_shape[1:]))
    out_shape = (in_shape[0],) + (1,) * (len(in_shape) - 1)
    return out_shape, [list(range(c * n_sp, (c + 1) * n_sp)) for c in range(in_shape[0])]


def _windows(L, in_shape):
    if isinstance(L, (MaxPool, AvgPool)):
        return pool_windows(L.kernel, L.strides, L.pads, L.ceil_mode, in_shape)
    return global_windows(in_shape)


def avgpool_matrix(L, in_shape):
    """AvgPool / GlobalAvgPool as M, b (= 0), C.  Divisor: number of window
    positions inside the padded input if count_include_pad, else the number
    of real (non-pad) elements."""
    in_shape = tuple(in_shape)
    out_shape, windows = _windows(L, in_shape)
    include_pad = isinstance(L, AvgPool) and L.count_include_pad
    M = np.zeros((len(windows), int(np.prod(in_shape))))
    C = np.zeros_like(M)
    for j, win in enumerate(windows):
        real = [i for i in win if i >= 0]
        div = len(win) if include_pad else len(real)
        for i in real:
            M[j, i] += 1.0 / div
            C[j, i] = 1.0
    return M, np.zeros(len(windows)), C


def linear_matrix(L, in_shape):
    """(M, b, C) of a Dense / Conv / AvgPool / GlobalAvgPool layer for the
    per-sample input shape in_shape."""
    if isinstance(L, Dense):
        return dense_matrix(L)
    if isinstance(L, Conv):
        return conv_matrix(L, in_shape)
    if isinstance(L, (AvgPool, GlobalAvgPool)):
        return avgpool_matrix(L, in_shape)
    raise TypeError(f"{type(L).__name__} is not a linear layer")


def window_membership(L, in_shape):
    """0/1 matrix [n_out, n_in]: input i lies in window j (real inputs only)."""
    _, windows = _windows(L, in_shape)
    C = np.zeros((len(windows), int(np.prod(in_shape))))
    for j, win in enumerate(windows):
        for i in win:
            if i >= 0:
                C[j, i] = 1.0
    return C


def rlrp_card(L, in_shape):
    """Card(J_i) of Eq. 7 for every input neuron i, as an array of in_shape:
    the number of output neurons connected to i (conv: output channels of i's
    group x output positions whose receptive field contains i; pools: number
    of windows containing i)."""
    if isinstance(L, (MaxPool, GlobalMaxPool)):
        C = window_membership(L, in_shape)
    else:
        C = linear_matrix(L, in_shape)[2]
    return C.sum(axis=0).reshape(in_shape)


# ==========================================================================
# BatchNorm folding and forward
# ==========================================================================


def fold_batchnorm(layers):
    """Copy of the spec with each BatchNorm folded into the Conv/Dense just
    before it: s = scale / sqrt(var + eps), W' = W * s (per output channel),
    b' = (b - mean) * s + beta."""
    out = []
    for L in layers:
        if isinstance(L, BatchNorm):
            if not out or not isinstance(out[-1], (Conv, Dense)):
                raise ValueError("BatchNorm must directly follow a Conv or Dense layer")
            prev = out.pop()
            s = np.asarray(L.scale, np.float64) / np.sqrt(np.asarray(L.var, np.float64) + L.eps)
            W = np.asarray(prev.W, np.float64)
            W2 = W * s.reshape((-1,) + (1,) * (W.ndim - 1))
            b = np.zeros(W.shape[0]) if prev.b is None else np.asarray(prev.b, np.float64)
            b2 = (b - np.asarray(L.mean, np.float64)) * s + np.asarray(L.bias, np.float64)
            if isinstance(prev, Conv):
                out.append(Conv(W2, b2, prev.strides, prev.pads, prev.dilations, prev.groups))
            else:
                out.append(Dense(W2, b2))
        elif isinstance(L, Residual):
            out.append(Residual(fold_batchnorm(L.branch), fold_batchnorm(L.shortcut)))
        elif isinstance(L, Concat):
            out.append(Concat([fold_batchnorm(b) for b in L.branches]))
        elif isinstance(L, Sum):
            out.append(Sum([fold_batchnorm(b) for b in L.branches]))
        else:
            out.append(L)
    return out


class _Net:
    """Evaluation context: caches unrolled matrices per (layer, input shape)
    and holds the per-layer rule assignment."""

    def __init__(self, rule_map=None, norm_eps=EPS):
        self.cache = {}
        self.rule_map = rule_map or {}
        self.norm_eps = norm_eps  # the stabilizer of the Norm rule at joins and average pools
        self._keep = []  # keep cached layers alive so ids stay unique

    def matrix(self, L, in_shape):
        key = (id(L), tuple(in_shape), "M")
        if key not in self.cache:
            self.cache[key] = linear_matrix(L, in_shape)
            self._keep.append(L)
        return self.cache[key]

    def windows(self, L, in_shape):
        key = (id(L), tuple(in_shape), "W")
        if key not in self.cache:
            self.cache[key] = _windows(L, in_shape)
            self._keep.append(L)
        return self.cache[key]

    # ---------------------------------------------------------------- forward
    def seq(self, layers, x):
        for L in layers:
            x = self.layer(L, x)
        return x

    def layer(self, L, x):
        B, in_shape = x.shape[0], x.shape[1:]
        if isinstance(L, (Dense, Conv, AvgPool, GlobalAvgPool)):
            M, b, _ = self.matrix(L, in_shape)
            y = x.reshape(B, -1) @ M.T + b
            return y.reshape((B,) + layer_output_shape(L, in_shape))
        if isinstance(L, BatchNorm):
            shp = (1, -1) + (1,) * (x.ndim - 2)
            s = np.asarray(L.scale, np.float64).reshape(shp)
            m = np.asarray(L.mean, np.float64).reshape(shp)
            v = np.asarray(L.var, np.float64).reshape(shp)
            beta = np.asarray(L.bias, np.float64).reshape(shp)
            return s * (x - m) / np.sqrt(v + L.eps) + beta
        if isinstance(L, Relu):
            return np.maximum(x, 0.0)
        if isinstance(L, (MaxPool, GlobalMaxPool)):
            out_shape, windows = self.windows(L, in_shape)
            xf = x.reshape(B, -1)
            y = np.empty((B, len(windows)))
            for j, win in enumerate(windows):
                y[:, j] = xf[:, [i for i in win if i >= 0]].max(axis=1)  # padding = -inf never wins
            return y.reshape((B,) + out_shape)
        if isinstance(L, Flatten):
            return x.reshape(B, -1)
        if isinstance(L, (Residual, Sum)):
            return sum(self.seq(br, x) for br in sublists(L))
        if isinstance(L, Concat):
            return np.concatenate([self.seq(br, x) for br in L.branches], axis=1)
        raise TypeError(f"unknown layer {type(L).__name__}")

    # ------------------------------------------------------------ classic LRP
    def lrp_seq(self, layers, x, R):
        if not layers:  # identity branch
            return R
        acts = [x]
        for L in layers[:-1]:
            acts.append(self.layer(L, acts[-1]))
        for L, a in zip(reversed(layers), reversed(acts), strict=True):
            R = self.lrp_layer(L, a, R)
        return R

    def lrp_layer(self, L, x, R):
        B, in_shape = x.shape[0], x.shape[1:]
        xf, Rf = x.reshape(B, -1), R.reshape(B, -1)
        if isinstance(L, (Dense, Conv)):
            M, b, C = self.matrix(L, in_shape)
            name, params = self.rule_map[id(L)]
            R_in = RULES[name](M, b, xf, Rf, C=C, in_shape=x.shape, **params)
            return R_in.reshape(x.shape)
        if isinstance(L, (AvgPool, GlobalAvgPool)):
            # "Norm" rule: epsilon rule, eps = the Norm stabilizer (Zennit's default 1e-6), no bias
            M, _, C = self.matrix(L, in_shape)
            return rule_epsilon(M, np.zeros(M.shape[0]), xf, Rf, eps=self.norm_eps).reshape(x.shape)
        if isinstance(L, (MaxPool, GlobalMaxPool)):
            # winner-take-all to the FIRST arg-max (row-major within the window)
            _, windows = self.windows(L, in_shape)
            R_in = np.zeros_like(xf)
            for j, win in enumerate(windows):
                real = [i for i in win if i >= 0]
                for s in range(B):
                    R_in[s, real[int(np.argmax(xf[s, real]))]] += Rf[s, j]
            return R_in.reshape(x.shape)
        if isinstance(L, Relu):
            return R
        if isinstance(L, Flatten):
            return R.reshape(x.shape)
        if isinstance(L, (Residual, Sum)):
            # Norm rule at the join: R_k = a_k * R / stab(sum_k a_k)
            branches = sublists(L)
            outs = [self.seq(br, x) for br in branches]
            g = R / stab(sum(outs), self.norm_eps)
            return sum(self.lrp_seq(br, x, a * g) for br, a in zip(branches, outs, strict=True))
        if isinstance(L, Concat):
            R_in = np.zeros_like(x)
            off = 0
            for br in L.branches:
                c = self.seq(br, x).shape[1]
                R_in = R_in + self.lrp_seq(br, x, R[:, off:off + c])
                off += c
            return R_in
        if isinstance(L, BatchNorm):
            raise ValueError("BatchNorm must be folded before LRP (use fold_batchnorm)")
        raise TypeError(f"unknown layer {type(L).__name__}")

    # ----------------------------------------------------------------- R-LRP
    def rlrp_seq(self, layers, x, z):
        if not layers:  # identity branch
            return z
        acts = [x]
        for L in layers[:-1]:
            acts.append(self.layer(L, acts[-1]))
        for L, a in zip(reversed(layers), reversed(acts), strict=True):
            z = self.rlrp_layer(L, a, z)
        return z

    def rlrp_layer(self, L, x, z):
        B, in_shape = x.shape[0], x.shape[1:]
        xf, zf = x.reshape(B, -1), z.reshape(B, -1)
        n_in, n_out = xf.shape[1], zf.shape[1]
        if isinstance(L, (Dense, Conv, AvgPool, GlobalAvgPool)):
            W, _, C = self.matrix(L, in_shape)  # bias ignored: it is not an input neuron
            if isinstance(L, Dense):
                Mj = float(n_in)  # Eq. 8: M_j = N^(l)
            elif isinstance(L, Conv):
                Mj = float(np.prod(L.W.shape[1:]))  # Eq. 10-12: kernel size (cin/groups * P1 * P2)
            elif isinstance(L, AvgPool):
                Mj = float(np.prod(L.kernel))  # Prop. 13: pool-size P1 * P2
            else:
                Mj = float(np.prod(in_shape[1:]))  # global pool: full window
            z_in = np.zeros_like(xf)
            for i in range(n_in):
                J = np.nonzero(C[:, i])[0]  # J_i: outputs connected to input i
                if len(J) == 0:
                    continue
                # Eq. 6: z_ij = (1/M_j) w_ij x_i z_j ;  Eq. 7: z_i = Card(J_i)/N^(l+1) sum_{j in J_i} z_ij
                z_in[:, i] = len(J) / n_out * xf[:, i] * (zf[:, J] @ (W[J, i] / Mj))
            return z_in.reshape(x.shape)
        if isinstance(L, (MaxPool, GlobalMaxPool)):
            # Prop. 13: max pooling = conv whose weight is 1 at EVERY arg-max of the
            # window (sample dependent), 0 elsewhere; Card(J_i) = windows containing i.
            _, windows = self.windows(L, in_shape)
            Mj = float(np.prod(L.kernel)) if isinstance(L, MaxPool) else float(np.prod(in_shape[1:]))
            card = np.zeros(n_in)
            acc = np.zeros_like(xf)  # sum_{j in J_i} w_ij(x) z_j
            for j, win in enumerate(windows):
                real = [i for i in win if i >= 0]
                card[real] += 1.0
                for s in range(B):
                    m = xf[s, real].max()
                    for i in real:
                        if xf[s, i] == m:
                            acc[s, i] += zf[s, j]
            z_in = card / n_out * xf * acc / Mj  # Eq. 12
            return z_in.reshape(x.shape)
        if isinstance(L, Relu):
            return z  # activations: z passes unchanged (gating via x_i at the next linear layer)
        if isinstance(L, Flatten):
            return z.reshape(x.shape)
        if isinstance(L, (Residual, Sum)):
            # Prop. 14 / Eq. 13: every branch gets the FULL z of the join; each
            # branch's contribution at the fork is rescaled so that its sum equals
            # sum(z_join) (conservation up to a factor), then they are added.
            # An identity branch contributes z_join unchanged (it already has the right sum).
            ref = _persample_sum(z)
            return sum(_rescale(self.rlrp_seq(br, x, z), ref) if br else z for br in sublists(L))
        if isinstance(L, Concat):
            # Concat of branches forking from the same x: each branch is normalized
            # against the sum of ITS slice of z.
            z_in = np.zeros_like(x)
            off = 0
            for br in L.branches:
                c = self.seq(br, x).shape[1]
                sl = z[:, off:off + c]
                z_in = z_in + (_rescale(self.rlrp_seq(br, x, sl), _persample_sum(sl)) if br else sl)
                off += c
            return z_in
        if isinstance(L, BatchNorm):
            raise ValueError("BatchNorm must be folded before R-LRP (use fold_batchnorm)")
        raise TypeError(f"unknown layer {type(L).__name__}")


def _persample_sum(a):
    return a.reshape(a.shape[0], -1).sum(axis=1)


def _rescale(c, ref):
    """c * ref / sum(c) per sample; a branch with sum(c) == 0 contributes 0."""
    s = _persample_sum(c)
    f = np.where(s == 0, 0.0, ref / np.where(s == 0, 1.0, s))
    return c * f.reshape((-1,) + (1,) * (c.ndim - 1))


def forward(layers, x):
    """Forward pass in float64 (BatchNorm evaluated as such, not folded)."""
    x = np.asarray(x, dtype=np.float64)
    return _Net().seq(layers, x)


# ==========================================================================
# LRP rules in matrix form.  W: [n_out, n_in], b: [n_out], x: [B, n_in],
# R: [B, n_out]  ->  R_in: [B, n_in].  W^T v is written v @ W (batched).
# W (and C) may be dense arrays or scipy sparse arrays (csr_array).
# ==========================================================================


def _pos(a):
    """max(a, 0); for a scipy sparse matrix too (the graph reference's layers are sparse)."""
    return a.maximum(0.0) if issparse(a) else np.maximum(a, 0.0)


def _neg(a):
    return a.minimum(0.0) if issparse(a) else np.minimum(a, 0.0)


def rule_lrp0(W, b, x, R, **_):
    """LRP-0: R_in = x * W^T (R / z), z = W x + b (pure division)."""
    return rule_epsilon(W, b, x, R, eps=0.0)


def rule_epsilon(W, b, x, R, eps=EPS, **_):
    """LRP-epsilon: R_in = x * W^T (R / stab_eps(z)), z = W x + b."""
    z = x @ W.T + b
    return x * ((R / stab(z, eps)) @ W)


def rule_zplus(W, b, x, R, eps=EPS, **_):
    """z+: z = W+ x+ + b+ + W- x-; R_in = x+ * W+^T g + x- * W-^T g, g = R/stab(z)."""
    Wp, Wn, xp, xn = _pos(W), _neg(W), _pos(x), _neg(x)
    z = xp @ Wp.T + _pos(b) + xn @ Wn.T
    g = R / stab(z, eps)
    return xp * (g @ Wp) + xn * (g @ Wn)


def rule_alphabeta(W, b, x, R, alpha=2.0, beta=1.0, eps=EPS, **_):
    """alpha-beta: za = W+ x+ + b+ + W- x-, zb = W- x+ + b- + W+ x-;
    R_in = alpha (x+ W+^T ga + x- W-^T ga) - beta (x+ W-^T gb + x- W+^T gb)."""
    Wp, Wn, xp, xn = _pos(W), _neg(W), _pos(x), _neg(x)
    za = xp @ Wp.T + _pos(b) + xn @ Wn.T
    zb = xp @ Wn.T + _neg(b) + xn @ Wp.T
    ga, gb = R / stab(za, eps), R / stab(zb, eps)
    return alpha * (xp * (ga @ Wp) + xn * (ga @ Wn)) - beta * (xp * (gb @ Wn) + xn * (gb @ Wp))


def rule_gamma(W, b, x, R, gamma=0.25, eps=EPS, **_):
    """Zennit generalized gamma: Wp = W + g W+, Wn = W + g W-, bp = b + g b+,
    bn = b + g b-; zp = Wp x+ + bp + Wn x-, zn = Wn x+ + bn + Wp x-;
    gp = [z > 0] R / stab(zp), gn = [z < 0] R / stab(zn);
    R_in = x+ Wp^T gp + x- Wn^T gp + x+ Wn^T gn + x- Wp^T gn."""
    xp, xn = _pos(x), _neg(x)
    Wp, Wn = W + gamma * _pos(W), W + gamma * _neg(W)
    bp, bn = b + gamma * _pos(b), b + gamma * _neg(b)
    z = x @ W.T + b
    zp = xp @ Wp.T + bp + xn @ Wn.T
    zn = xp @ Wn.T + bn + xn @ Wp.T
    gp = (z > 0) * R / stab(zp, eps)
    gn = (z < 0) * R / stab(zn, eps)
    return xp * (gp @ Wp) + xn * (gp @ Wn) + xp * (gn @ Wn) + xn * (gn @ Wp)


def rule_flat(W, b, x, R, C=None, eps=EPS, **_):
    """flat: W1 = connectivity (all weights 1, padding is no connection), no bias;
    z = W1 1; R_in = W1^T (R / stab(z))."""
    W1 = np.ones_like(W) if C is None else C
    z = W1.sum(axis=1)
    return np.broadcast_to((R / stab(z, eps)) @ W1, x.shape).copy()


def rule_wsquare(W, b, x, R, eps=EPS, **_):
    """w^2: z = (W*W) 1 + b*b; R_in = (W*W)^T (R / stab(z))."""
    W2 = W * W
    z = W2.sum(axis=1) + b * b
    return np.broadcast_to((R / stab(z, eps)) @ W2, x.shape).copy()


def rule_zbox(W, b, x, R, low=None, high=None, in_shape=None, eps=EPS, **_):
    """z^B: z = W x + b - (W+ l + b+) - (W- h + b-);
    R_in = x W^T g - l W+^T g - h W-^T g, g = R / stab(z).  low/high are
    broadcast to the layer input [B, *shape] (scalars or arrays)."""
    shape = x.shape if in_shape is None else in_shape
    lo = np.broadcast_to(np.asarray(low, np.float64), shape).reshape(x.shape)
    hi = np.broadcast_to(np.asarray(high, np.float64), shape).reshape(x.shape)
    Wp, Wn = _pos(W), _neg(W)
    z = x @ W.T + b - (lo @ Wp.T + _pos(b)) - (hi @ Wn.T + _neg(b))
    g = R / stab(z, eps)
    return x * (g @ W) - lo * (g @ Wp) - hi * (g @ Wn)


RULES = {
    "lrp0": rule_lrp0,
    "epsilon": rule_epsilon,
    "zplus": rule_zplus,
    "alphabeta": rule_alphabeta,
    "gamma": rule_gamma,
    "flat": rule_flat,
    "wsquare": rule_wsquare,
    "zbox": rule_zbox,
}
_ALIASES = {"zero": "lrp0", "eps": "epsilon", "alpha2beta1": "alphabeta", "w2": "wsquare", "wsq": "wsquare"}


def rule_name(name):
    n = name.lower().replace("-", "").replace("_", "")
    n = _ALIASES.get(n, n)
    if n not in RULES:
        raise ValueError(f"unknown LRP rule {name!r}; known: {sorted(RULES)}")
    return n


# ==========================================================================
# drivers
# ==========================================================================


def _targets(logits, target):
    B = logits.shape[0]
    if target is None:
        return np.argmax(logits, axis=1)
    t = np.asarray(target, dtype=np.int64)
    return np.full(B, int(t)) if t.ndim == 0 else t.reshape(B)


def initial_relevance(logits, target=None):
    """one-hot(target) * logit, logits flattened per sample to [B, K]."""
    lf = logits.reshape(logits.shape[0], -1)
    t = _targets(lf, target)
    R = np.zeros_like(lf)
    R[np.arange(lf.shape[0]), t] = lf[np.arange(lf.shape[0]), t]
    return R.reshape(logits.shape)


def _rule_map(layers, rule, params):
    lin = list(iter_linear(layers))
    if isinstance(rule, str):
        assignment = [(rule, dict(params))] * len(lin)
    else:
        assignment = []
        for r in rule:
            if isinstance(r, str):
                assignment.append((r, dict(params)))
            else:
                name, p = r
                assignment.append((name, {**params, **(p or {})}))
        if len(assignment) != len(lin):
            raise ValueError(f"{len(assignment)} rules for {len(lin)} Dense/Conv layers")
    return {id(L): (rule_name(n), p) for L, (n, p) in zip(lin, assignment, strict=True)}


def lrp(layers, x, rule, target=None, norm_eps=EPS, **params):
    """Classic LRP relevance at the input, [B, *x.shape[1:]] float64.

    rule: a rule name for every Dense/Conv layer, or a list with one entry
    per Dense/Conv layer in depth-first spec order (Residual: branch before
    shortcut; Concat/Sum: branches in order), each a name or (name, params).
    params: defaults passed to every rule (e.g. eps=1e-9, gamma=0.25,
    alpha=2, beta=1, low=..., high=...); per-layer params override them.
    norm_eps: the stabilizer of Zennit's Norm rule at joins and average pools.
    BatchNorm is folded into the preceding Conv/Dense first."""
    x = np.asarray(x, dtype=np.float64)
    folded = fold_batchnorm(layers)
    net = _Net(_rule_map(folded, rule, params), norm_eps)
    R = initial_relevance(net.seq(folded, x), target)
    return net.lrp_seq(folded, x, R)


def rlrp(layers, x, target=None, normalize=True):
    """R-LRP (Nyiri & Gibaru) relevance at the input, [B, *x.shape[1:]].

    Start: z = logit at target (Definition 9: z_kk := x_k), 0 elsewhere.
    normalize: scale per sample so that sum(|z|) = |logit at target|
    (an all-zero map stays zero).  BatchNorm is folded first."""
    x = np.asarray(x, dtype=np.float64)
    folded = fold_batchnorm(layers)
    net = _Net()
    logits = net.seq(folded, x)
    z0 = initial_relevance(logits, target)
    z = net.rlrp_seq(folded, x, z0)
    if not normalize:
        return z
    target_logit = _persample_sum(z0)  # the only nonzero entry
    s = _persample_sum(np.abs(z))
    f = np.where(s == 0, 0.0, np.abs(target_logit) / np.where(s == 0, 1.0, s))
    return z * f.reshape((-1,) + (1,) * (z.ndim - 1))
