"""Float64 reference of LRP for LSTM and GRU layers, written from Arras et al. 2017 ("Explaining Recurrent Neural
Network Predictions in Sentiment Analysis") and their reference code's ``lrp_linear`` (``bias_factor = 0``), with
explicit loops over time steps and samples. One direction, one sample at a time; the ONNX gate orders (LSTM: i, o, f,
c; GRU: z, r, h) and the ONNX forward equations (peepholes, ``linear_before_reset``).

``lrp_linear(hin, w, hout, rout, eps)``: ``R_in[i] = sum_j hin[i] w[i, j] / (hout[j] + eps sign(hout[j])) rout[j]``
where ``hout`` is the full pre-activation (bias included), ``sign(0) = +1``.
"""

from __future__ import annotations

import numpy as np


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def lrp_linear(hin, w, hout, rout, eps):
    """Arras et al.'s rule with bias_factor 0: ``w`` is [in, out]."""
    denominator = hout + eps * np.where(hout >= 0, 1.0, -1.0)
    return (hin[:, None] * w * (rout / denominator)[None, :]).sum(1)


def lstm(x, w, r, bias, h0, c0, peep=None, length=None, eps=1e-3, r_y=None, r_h=None, r_c=None):
    """One sample, one direction in processing order. ``x`` [T, I]; ``w`` [4H, I]; ``r`` [4H, H]; ``bias`` [8H].
    Relevance given at ``Y`` (``r_y`` [T, H]) and at the final states; returns ``(R_x, R_h0, R_c0, h_T)``."""
    steps, hidden = len(x), r.shape[1]
    length = steps if length is None else length
    b = bias[:4 * hidden] + bias[4 * hidden:]
    p = np.zeros(3 * hidden) if peep is None else peep
    h, c = h0.copy(), c0.copy()
    memory = []
    for t in range(length):
        pre = w @ x[t] + r @ h + b
        i = sigmoid(pre[:hidden] + p[:hidden] * c)
        f = sigmoid(pre[2 * hidden:3 * hidden] + p[2 * hidden:] * c)
        g = np.tanh(pre[3 * hidden:])
        c_new = f * c + i * g
        o = sigmoid(pre[hidden:2 * hidden] + p[hidden:2 * hidden] * c_new)
        memory.append((h, c, i, f, g, c_new, pre[3 * hidden:]))
        h, c = o * np.tanh(c_new), c_new
    r_x = np.zeros_like(x)
    rh = np.zeros(hidden) if r_h is None else r_h.copy()
    rc = np.zeros(hidden) if r_c is None else r_c.copy()
    for t in reversed(range(length)):  # steps past the length copy the state: their relevance passes unchanged
        h_prev, c_prev, i, f, g, c_new, pre_g = memory[t]
        if r_y is not None:
            rh = rh + r_y[t]
        rc = rc + rh  # h_t = o_t tanh(c_t): all of R_h to the signal c_t
        identity = np.eye(hidden)
        r_g = lrp_linear(i * g, identity, c_new, rc, eps)  # c_t = f c_{t-1} + i g: the epsilon rule on the sum
        rc_prev = lrp_linear(f * c_prev, identity, c_new, rc, eps)
        w_g, r_g_w = w[3 * hidden:], r[3 * hidden:]  # g = tanh(W_g x + R_g h + b_g): identity through tanh
        r_x[t] = lrp_linear(x[t], w_g.T, pre_g, r_g, eps)
        rh = lrp_linear(h_prev, r_g_w.T, pre_g, r_g, eps)
        rc = rc_prev
    return r_x, rh, rc, h


def gru(x, w, r, bias, h0, linear_before_reset=0, length=None, eps=1e-3, r_y=None, r_h=None):
    """One sample, one direction: ``h = (1 - z) n + z h_prev``; returns ``(R_x, R_h0, h_T)``."""
    steps, hidden = len(x), r.shape[1]
    length = steps if length is None else length
    wb, rb = bias[:3 * hidden], bias[3 * hidden:]
    h = h0.copy()
    memory = []
    for t in range(length):
        zr = w[:2 * hidden] @ x[t] + r[:2 * hidden] @ h + wb[:2 * hidden] + rb[:2 * hidden]
        z, rr = sigmoid(zr[:hidden]), sigmoid(zr[hidden:])
        if linear_before_reset:
            pre_n = w[2 * hidden:] @ x[t] + wb[2 * hidden:] + rr * (r[2 * hidden:] @ h + rb[2 * hidden:])
        else:
            pre_n = w[2 * hidden:] @ x[t] + wb[2 * hidden:] + r[2 * hidden:] @ (rr * h) + rb[2 * hidden:]
        n = np.tanh(pre_n)
        h_new = (1 - z) * n + z * h
        memory.append((h, z, rr, n, h_new, pre_n))
        h = h_new
    r_x = np.zeros_like(x)
    rh = np.zeros(hidden) if r_h is None else r_h.copy()
    for t in reversed(range(length)):
        h_prev, z, rr, n, h_new, pre_n = memory[t]
        if r_y is not None:
            rh = rh + r_y[t]
        identity = np.eye(hidden)
        r_n = lrp_linear((1 - z) * n, identity, h_new, rh, eps)
        r_direct = lrp_linear(z * h_prev, identity, h_new, rh, eps)
        r_x[t] = lrp_linear(x[t], w[2 * hidden:].T, pre_n, r_n, eps)
        if linear_before_reset:  # h_k reaches pre_n_j through r_j R_n[j, k]
            r_through = lrp_linear(h_prev, (rr[:, None] * r[2 * hidden:]).T, pre_n, r_n, eps)
        else:  # through (r h)_k R_n[j, k]
            r_through = lrp_linear(rr * h_prev, r[2 * hidden:].T, pre_n, r_n, eps)
        rh = r_through + r_direct
    return r_x, rh, h
