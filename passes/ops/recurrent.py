"""LSTM and GRU (the ONNX ops): the LRP rule of Arras et al. 2017 ("Explaining Recurrent Neural Network Predictions
in Sentiment Analysis"), unrolled over the static sequence length.

The forward pass stays the exported LSTM/GRU op (its outputs are unchanged bit for bit). The backward graph recomputes
the gates and cell states step by step from the inputs, then sends relevance back in time:

- the gates (i, f, o of an LSTM; z, r of a GRU) are constants;
- a gated product gives all of its relevance to its signal ("signal-take-all"): ``h_t = o_t tanh(c_t)`` gives
  ``R_{c_t} += R_{h_t}``, ``i_t g_t`` gives its share to ``g_t``;
- a sum splits relevance by the epsilon rule, ``R_k = u_k R / stab(sum u)``: the cell update
  ``c_t = f_t c_{t-1} + i_t g_t``, the GRU's ``h_t = (1 - z_t) n_t + z_t h_{t-1}``;
- the linear maps into the candidate (``g_t = tanh(W_g x_t + R_g h_{t-1} + b_g)``; the GRU's ``n_t``) get the epsilon
  rule with the full pre-activation, bias included, as denominator (Arras et al.'s ``bias_factor = 0``), through the
  identity rule of tanh.

Relevance reaches ``X`` and, when they are graph inputs, the initial states (``relevance.<state input>``). Sequence
lengths: steps past a sample's length copy the state forward, so their relevance passes back unchanged, and their
``Y`` entries (zeros) carry none; the reverse direction runs over each sample's reversed valid prefix
(ReverseSequence). R-LRP is refused: its Eq. 8-14 are stated for feed-forward layers, and the cell update is a join
whose fork lies in an earlier time step.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxlrp.quotients import stabilize

from .helpers import attr
from .registry import backward

DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


def check_recurrent(ctx, node):
    kind = node.op_type
    if any(node.input[i] not in ctx.constants for i in (1, 2) if i < len(node.input)) or \
            (len(node.input) > 3 and node.input[3] and node.input[3] not in ctx.constants):
        return "needs constant weights W, R and bias B"
    if kind == "LSTM" and len(node.input) > 7 and node.input[7] and node.input[7] not in ctx.constants:
        return "needs constant peephole weights P"
    activations = attr(node, "activations")
    if activations is not None:
        per_direction = len(DEFAULT_ACTIVATIONS[kind])
        names = [a.decode() if isinstance(a, bytes) else a for a in activations]
        if names != DEFAULT_ACTIVATIONS[kind] * (len(names) // per_direction):
            return f"only the default activations {DEFAULT_ACTIVATIONS[kind]} are supported"
    x_shape = ctx.shapes.get(node.input[0])
    if not x_shape or x_shape[attr(node, "layout", 0)] is None:
        return "needs a static sequence length (give --input-shape)"
    return None


class Unrolled:
    """One direction of one recurrent node: constants, per-step forward values, the backward recurrence."""

    def __init__(self, ctx, node, direction: int, reverse: bool, steps: int, x: str, lengths: str | None):
        self.ctx, self.node, self.b = ctx, node, ctx.b
        self.direction, self.reverse, self.steps, self.lengths = direction, reverse, steps, lengths
        self.eps = ctx.rule(node).epsilon
        c = ctx.constants
        self.w = c[node.input[1]][direction].astype(np.float64)
        self.r = c[node.input[2]][direction].astype(np.float64)
        self.hidden = self.r.shape[1]
        gates = self.w.shape[0] // self.hidden
        bias = c[node.input[3]][direction].astype(np.float64) if len(node.input) > 3 and node.input[3] else \
            np.zeros(2 * gates * self.hidden)
        self.wb, self.rb = bias[:gates * self.hidden], bias[gates * self.hidden:]
        self.clip = attr(node, "clip")
        self.x = self.in_processing_order(x)  # [T, B, I]
        self.masks = None
        if lengths is not None:  # m_t[b] = t < length[b], as [T, B, 1]
            b = self.b
            time = b.const(np.arange(steps).reshape(steps, 1), "time", np.int64)
            self.masks = b.op("Cast", [b.op("Less", [time, b.op("Unsqueeze", [lengths, b.const([0], "axes",
                                                                                              np.int64)])])],
                              "valid", to=onnx.TensorProto.FLOAT)
            self.masks = b.op("Unsqueeze", [self.masks, b.const([2], "axes", np.int64)], "valid")

    def in_processing_order(self, t: str) -> str:
        """``t`` [T, B, ...] in the order the recurrence visits the steps (each sample's valid prefix reversed for
        the reverse direction)."""
        if not self.reverse:
            return t
        b = self.b
        if self.lengths is None:
            return b.op("Slice", [t, b.const([-1], "start", np.int64), b.const([-(2 ** 62)], "end", np.int64),
                                  b.const([0], "axes", np.int64), b.const([-1], "step", np.int64)], "reversed")
        return b.op("ReverseSequence", [t, self.lengths], "reversed", batch_axis=1, time_axis=0)

    def step(self, t: str, index: int) -> str:
        return self.b.op("Gather", [t, self.b.const(index, "step", np.int64)], "step", axis=0)

    def constant(self, value: np.ndarray, hint: str) -> str:
        return self.b.const(np.ascontiguousarray(value, dtype=np.float32), hint)

    def gate(self, pre: str, activation: str) -> str:
        if self.clip is not None:
            pre = self.b.op("Clip", [pre, self.b.const(-self.clip), self.b.const(self.clip)], "clipped")
        return self.b.op(activation, [pre], "gate")

    def masked(self, new: str, old: str, index: int) -> str:
        """``m_t new + (1 - m_t) old``: a step past a sample's length keeps ``old``."""
        if self.masks is None:
            return new
        b = self.b
        m = self.step(self.masks, index)
        return b.op("Add", [old, b.op("Mul", [m, b.op("Sub", [new, old], "delta")], "masked")], "masked")

    def stack(self, per_step: list[str]) -> str:
        b = self.b
        axes = b.const([0], "axes", np.int64)
        return b.op("Concat", [b.op("Unsqueeze", [s, axes], "step") for s in per_step], "steps", axis=0)


class LSTMDirection(Unrolled):
    """Gate order i, o, f, c (ONNX): ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``, peepholes ``p_i, p_o, p_f``."""

    def forward(self, h0: str, c0: str):
        """Per step: ``h_{t-1}``, ``q_t = (i g / stab(c_t)) / stab(pre_g)`` and ``f c_{t-1} / stab(c_t)``."""
        b, hid = self.b, self.hidden
        node = self.node
        peep = self.ctx.constants[node.input[7]][self.direction].astype(np.float64) \
            if len(node.input) > 7 and node.input[7] else None
        xw = b.op("Add", [b.op("MatMul", [self.x, self.constant(self.w.T, "W_T")], "xW"),
                          self.constant(self.wb + self.rb, "bias")], "xW")
        r_t = self.constant(self.r.T, "R_T")
        h, c = h0, c0
        self.h_prev, self.q, self.keep = [], [], []
        for t in range(self.steps):
            pre = b.op("Add", [self.step(xw, t), b.op("MatMul", [h, r_t], "hR")], "pre")
            pi, po, pf, pg = b.op("Split", [pre, b.const([hid] * 4, "split", np.int64)], "pre", n_out=4, axis=-1)
            if peep is not None:
                pi = b.op("Add", [pi, b.op("Mul", [c, self.constant(peep[:hid], "p_i")])], "pre_i")
                pf = b.op("Add", [pf, b.op("Mul", [c, self.constant(peep[2 * hid:], "p_f")])], "pre_f")
            i = self.gate(pi, "Sigmoid")
            f = b.op("Sub", [b.const(1.0, "one"), i], "f") if attr(node, "input_forget", 0) else \
                self.gate(pf, "Sigmoid")
            if self.clip is not None:
                pg = b.op("Clip", [pg, b.const(-self.clip), b.const(self.clip)], "clipped")
            g = b.op("Tanh", [pg], "g")
            kept, signal = b.op("Mul", [f, c], "f_c"), b.op("Mul", [i, g], "i_g")
            c_new = b.op("Add", [kept, signal], "c")
            stab_c = stabilize(b, c_new, self.eps)
            self.h_prev.append(h)
            self.keep.append(b.op("Div", [kept, stab_c], "keep_ratio"))
            self.q.append(b.op("Div", [b.op("Div", [signal, stab_c], "signal_ratio"), stabilize(b, pg, self.eps)],
                               "q"))
            if peep is not None:
                po = b.op("Add", [po, b.op("Mul", [c_new, self.constant(peep[hid:2 * hid], "p_o")])], "pre_o")
            h_new = b.op("Mul", [self.gate(po, "Sigmoid"), b.op("Tanh", [c_new], "tanh_c")], "h")
            h, c = self.masked(h_new, h, t), self.masked(c_new, c, t)

    def backward(self, r_y: str | None, r_h: str, r_c: str) -> tuple[str, str, str]:
        """Returns ``(R_X, R_h0, R_c0)``."""
        b, hid = self.b, self.hidden
        r_g = self.constant(self.r[3 * hid:], "R_g")  # [H out, H in]: s @ R_g = R_g^T s per sample
        s_steps = [None] * self.steps
        for t in reversed(range(self.steps)):
            m = self.step(self.masks, t) if self.masks is not None else None
            r_out = r_h if r_y is None else b.op("Add", [r_h, self.step(r_y, t) if m is None else
                                                          b.op("Mul", [m, self.step(r_y, t)], "R_y")], "R_h")
            r_cell = b.op("Add", [r_c, r_out if m is None else b.op("Mul", [m, r_out], "R_h")], "R_c")
            s = b.op("Mul", [r_cell, self.q[t]], "s")
            s_steps[t] = s if m is None else b.op("Mul", [m, s], "s")
            r_h_new = b.op("Mul", [self.h_prev[t], b.op("MatMul", [s_steps[t], r_g], "RgT_s")], "R_h")
            r_c_new = b.op("Mul", [r_cell, self.keep[t]], "R_c")
            r_h, r_c = self.masked(r_h_new, r_out, t), self.masked(r_c_new, r_c, t)
        w_g = self.constant(self.w[3 * hid:], "W_g")  # [H, I]
        r_x = b.op("Mul", [self.x, b.op("MatMul", [self.stack(s_steps), w_g], "WgT_s")], "R_x")
        return self.in_processing_order(r_x), r_h, r_c


class GRUDirection(Unrolled):
    """Gate order z, r, h (ONNX): ``h_t = (1 - z) n + z h_{t-1}``,
    ``n = tanh(W_n x + b_Wn + r (h R_n^T + b_Rn))`` (linear_before_reset) or ``tanh(W_n x + b + (r h) R_n^T)``."""

    def forward(self, h0: str, c0: str | None = None):
        b, hid = self.b, self.hidden
        before_reset = bool(attr(self.node, "linear_before_reset", 0))
        w_zr, w_n = self.w[:2 * hid], self.w[2 * hid:]
        xw_zr = b.op("Add", [b.op("MatMul", [self.x, self.constant(w_zr.T, "Wzr_T")], "xW"),
                             self.constant(self.wb[:2 * hid] + self.rb[:2 * hid], "bias_zr")], "xW_zr")
        xw_n = b.op("Add", [b.op("MatMul", [self.x, self.constant(w_n.T, "Wn_T")], "xW"),
                            self.constant(self.wb[2 * hid:] + (0 if before_reset else self.rb[2 * hid:]), "bias_n")],
                    "xW_n")
        r_zr, r_n = self.constant(self.r[:2 * hid].T, "Rzr_T"), self.constant(self.r[2 * hid:].T, "Rn_T")
        rb_n = self.constant(self.rb[2 * hid:], "Rb_n")
        h = h0
        self.h_prev, self.direct, self.q, self.reset = [], [], [], []
        for t in range(self.steps):
            zr = b.op("Add", [self.step(xw_zr, t), b.op("MatMul", [h, r_zr], "hR")], "pre_zr")
            pz, pr = b.op("Split", [zr, b.const([hid, hid], "split", np.int64)], "pre", n_out=2, axis=-1)
            z, r = self.gate(pz, "Sigmoid"), self.gate(pr, "Sigmoid")
            if before_reset:
                recurrent = b.op("Mul", [r, b.op("Add", [b.op("MatMul", [h, r_n], "hR"), rb_n], "hR_b")], "r_hR")
            else:
                recurrent = b.op("MatMul", [b.op("Mul", [r, h], "r_h"), r_n], "rh_R")
            pn = b.op("Add", [self.step(xw_n, t), recurrent], "pre_n")
            if self.clip is not None:
                pn = b.op("Clip", [pn, b.const(-self.clip), b.const(self.clip)], "clipped")
            n = b.op("Tanh", [pn], "n")
            signal = b.op("Mul", [b.op("Sub", [b.const(1.0, "one"), z], "one_minus_z"), n], "signal")
            kept = b.op("Mul", [z, h], "z_h")
            h_new = b.op("Add", [signal, kept], "h")
            stab_h = stabilize(b, h_new, self.eps)
            self.h_prev.append(h)
            self.reset.append(r)
            self.direct.append(b.op("Div", [kept, stab_h], "keep_ratio"))
            self.q.append(b.op("Div", [b.op("Div", [signal, stab_h], "signal_ratio"), stabilize(b, pn, self.eps)],
                               "q"))
            h = self.masked(h_new, h, t)

    def backward(self, r_y: str | None, r_h: str, r_c: str | None = None) -> tuple[str, str, None]:
        b, hid = self.b, self.hidden
        before_reset = bool(attr(self.node, "linear_before_reset", 0))
        r_n = self.constant(self.r[2 * hid:], "R_n")  # [H out, H in]
        s_steps = [None] * self.steps
        for t in reversed(range(self.steps)):
            m = self.step(self.masks, t) if self.masks is not None else None
            r_out = r_h if r_y is None else b.op("Add", [r_h, self.step(r_y, t) if m is None else
                                                          b.op("Mul", [m, self.step(r_y, t)], "R_y")], "R_h")
            s = b.op("Mul", [r_out, self.q[t]], "s")
            s_steps[t] = s if m is None else b.op("Mul", [m, s], "s")
            if before_reset:  # h_k reaches pre_n_j through r_j R_n[j, k]
                through = b.op("MatMul", [b.op("Mul", [self.reset[t], s_steps[t]], "r_s"), r_n], "RnT_rs")
            else:  # through (r h)_k R_n[j, k]
                through = b.op("Mul", [self.reset[t], b.op("MatMul", [s_steps[t], r_n], "RnT_s")], "r_RnT_s")
            r_h_new = b.op("Add", [b.op("Mul", [self.h_prev[t], through], "R_h"),
                                   b.op("Mul", [r_out, self.direct[t]], "R_h")], "R_h")
            r_h = self.masked(r_h_new, r_out, t)
        w_n = self.constant(self.w[2 * hid:], "W_n")
        r_x = b.op("Mul", [self.x, b.op("MatMul", [self.stack(s_steps), w_n], "WnT_s")], "R_x")
        return self.in_processing_order(r_x), r_h, None


def recurrent(ctx, node, r_out):
    """Both directions, in the layout the node reads (``layout = 1``: batch first)."""
    b = ctx.b
    layout = attr(node, "layout", 0)
    direction = attr(node, "direction", "forward")
    directions = [False, True] if direction == "bidirectional" else [direction == "reverse"]
    x = ctx.value(node.input[0])
    if layout:
        x = b.op("Transpose", [x], "x", perm=[1, 0, 2])
    steps = ctx.shapes[node.input[0]][layout]
    hidden = attr(node, "hidden_size")
    lengths = node.input[4] if len(node.input) > 4 and node.input[4] else None
    if lengths is not None and lengths in ctx.constants and np.all(ctx.constants[lengths] == steps):
        lengths = None  # every sample uses the whole sequence
    if lengths is not None:  # int32 in the LSTM/GRU signature, int64 for ReverseSequence and the step masks
        lengths = b.op("Cast", [lengths], "lengths", to=onnx.TensorProto.INT64)
    cell = LSTMDirection if node.op_type == "LSTM" else GRUDirection
    r_y, r_yh = r_out[0] if len(r_out) > 0 else None, r_out[1] if len(r_out) > 1 else None
    r_yc = r_out[2] if len(r_out) > 2 else None
    if r_y is not None and layout:  # [B, T, D, H] -> [T, D, B, H]
        r_y = b.op("Transpose", [r_y], "R_y", perm=[1, 2, 0, 3])
    states = {}
    for name, index, r in (("h", 5, r_yh), ("c", 6, r_yc)):
        initial = node.input[index] if len(node.input) > index and node.input[index] else None
        if initial is not None:
            initial = ctx.value(initial)
            if layout:
                initial = b.op("Transpose", [initial], f"initial_{name}", perm=[1, 0, 2])
        if r is not None and layout:
            r = b.op("Transpose", [r], f"R_y{name}", perm=[1, 0, 2])
        states[name] = (initial, r)
    zeros = b.op("Expand", [b.const(np.zeros((1, hidden), np.float32), "zero_state"),
                            b.op("Concat", [b.op("Gather", [b.op("Shape", [x]), b.const([1], "batch", np.int64)]),
                                            b.const([hidden], "hidden", np.int64)], "state_shape", axis=0)],
                    "zeros")
    r_x_total, r_h0, r_c0 = None, [], []
    for d, reverse in enumerate(directions):
        unrolled = cell(ctx, node, d, reverse, steps, x, lengths)

        def pick(state, d=d):
            initial, r = states[state]
            return (b.op("Gather", [initial, b.const(d, "direction", np.int64)], "state", axis=0)
                    if initial is not None else zeros,
                    b.op("Gather", [r, b.const(d, "direction", np.int64)], "R_state", axis=0)
                    if r is not None else zeros)

        (h0, rh), (c0, rc) = pick("h"), pick("c")
        unrolled.forward(h0, c0)
        r_y_d = None if r_y is None else unrolled.in_processing_order(
            b.op("Gather", [r_y, b.const(d, "direction", np.int64)], "R_y", axis=1))
        r_x, rh0, rc0 = unrolled.backward(r_y_d, rh, rc)
        r_x_total = r_x if r_x_total is None else b.op("Add", [r_x_total, r_x], "R_x")
        r_h0.append(rh0)
        r_c0.append(rc0)
    out = {0: b.op("Transpose", [r_x_total], "R_x", perm=[1, 0, 2]) if layout else r_x_total}
    for index, parts in ((5, r_h0), (6, r_c0)):
        if len(node.input) > index and node.input[index] in ctx.tensors and parts[0] is not None:
            axes = b.const([0], "axes", np.int64)
            stacked = b.op("Concat", [b.op("Unsqueeze", [p, axes], "R") for p in parts], "R_state", axis=0)
            out[index] = b.op("Transpose", [stacked], "R_state", perm=[1, 0, 2]) if layout else stacked
    return out


backward("LSTM", data_inputs=(0, 5, 6), kind="recurrent", check=check_recurrent)(recurrent)
backward("GRU", data_inputs=(0, 5), kind="recurrent", check=check_recurrent)(recurrent)
