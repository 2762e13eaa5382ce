"""Checks of the numpy reference itself (netspec.to_onnx + reference.py)."""

import netspec as ns
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import reference as ref
from netspec import (
    AvgPool,
    Concat,
    Conv,
    Dense,
    Flatten,
    MaxPool,
    Relu,
    Residual,
)
from spec_zoo import ZOO, m_cnn, m_concat, m_mlp, m_nested, m_residual

# ==========================================================================
# model zoo
# ==========================================================================


def run_ort(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


# ==========================================================================
# forward vs onnxruntime
# ==========================================================================


@pytest.mark.parametrize("name", list(ZOO))
def test_forward_matches_onnxruntime(name):
    rng = np.random.default_rng(1)
    layers, shape = ZOO[name](rng)
    x = rng.normal(size=shape).astype(np.float32)
    model = ns.to_onnx(layers, shape)
    assert model.ir_version == 10
    if name != "maxpool_ceil_drop":  # there ONNX shape inference disagrees with onnxruntime (see m_maxpool_ceil_drop)
        onnx.checker.check_model(model, full_check=True)
    y_ort = run_ort(model, x)
    y_ref = ref.forward(layers, x)
    assert y_ort.shape == y_ref.shape
    np.testing.assert_allclose(y_ort, y_ref, atol=1e-5, rtol=0)
    assert np.abs(y_ref).max() > 1e-3  # not a trivially zero network


def test_forward_mlp_matmul_softmax_static_batch():
    rng = np.random.default_rng(2)
    layers, shape = m_mlp(rng)
    x = rng.normal(size=shape).astype(np.float32)
    model = ns.to_onnx(layers, shape, dense_as="matmul", softmax=True, dynamic_batch=False,
                       input_name="inp", output_name="prob")
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "Gemm" not in ops and "MatMul" in ops and ops[-1] == "Softmax"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_value == shape[0]
    logits = ref.forward(layers, x)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(run_ort(model, x), e / e.sum(axis=1, keepdims=True), atol=1e-5)
    # the gemm variant with softmax exposes the logits as an intermediate tensor
    m2 = ns.to_onnx(layers, shape, softmax=True)
    assert "logits" in {o for n in m2.graph.node for o in n.output}
    assert [n.op_type for n in m2.graph.node].count("Gemm") == 3


def test_dynamic_batch():
    rng = np.random.default_rng(3)
    layers, shape = m_residual(rng)
    model = ns.to_onnx(layers, (1,) + shape[1:])
    x = rng.normal(size=(3,) + shape[1:]).astype(np.float32)
    np.testing.assert_allclose(run_ort(model, x), ref.forward(layers, x), atol=1e-5)


def test_batchnorm_folding_is_exact():
    rng = np.random.default_rng(4)
    layers, shape = m_residual(rng)
    x = rng.normal(size=shape)
    folded = ref.fold_batchnorm(layers)
    assert not any(isinstance(L, ns.BatchNorm) for L in folded)
    np.testing.assert_allclose(ref.forward(folded, x), ref.forward(layers, x), rtol=1e-12, atol=1e-12)


def test_flat_connectivity_is_all_ones_kernel():
    rng = np.random.default_rng(5)
    L = ns.conv(rng, 4, 4, 3, stride=2, pad=(1, 0, 1, 1), dilation=(1, 2), groups=2)
    ones = Conv(np.ones_like(L.W), None, L.strides, L.pads, L.dilations, L.groups)
    M1, _, _ = ref.linear_matrix(ones, (4, 6, 7))
    _, _, C = ref.linear_matrix(L, (4, 6, 7))
    np.testing.assert_array_equal(M1, C)
    assert 0 < C.sum() < C.size


# ==========================================================================
# classic LRP: conservation, gradient x input, per-rule loop forms
# ==========================================================================


def biasfree_resnet(rng):
    return [
        ns.conv(rng, 2, 4, 3, pad=1, bias=False), Relu(),
        Residual([ns.conv(rng, 4, 4, 3, pad=1, bias=False), Relu(), ns.conv(rng, 4, 4, 3, pad=1, bias=False)], []),
        Relu(),
        # projection shortcut: 3x3 (a 1x1 conv over 4 ReLU channels would often see z == 0 -> 0/0 in LRP-0)
        Residual([ns.conv(rng, 4, 4, 3, stride=2, pad=1, bias=False)],
                 [ns.conv(rng, 4, 4, 3, stride=2, pad=1, bias=False)]),
        Relu(), AvgPool((2, 2), (1, 1), (0, 0, 1, 1), count_include_pad=1), MaxPool((2, 2), (1, 1)),
        Flatten(), ns.dense(rng, 4 * 2 * 2, 5, bias=False), Relu(), ns.dense(rng, 5, 3, bias=False),
    ]


def biasfree_cnn(rng):
    return [
        ns.conv(rng, 2, 4, 3, pad=1, bias=False), Relu(), MaxPool((2, 2), (2, 2)),
        Residual([ns.conv(rng, 4, 4, 3, pad=1, bias=False), Relu()], []), Relu(),
        Flatten(), ns.dense(rng, 4 * 3 * 3, 6, bias=False), Relu(), ns.dense(rng, 6, 3, bias=False),
    ]


def biasfree_seq(rng):
    return [
        ns.conv(rng, 2, 4, 3, pad=1, bias=False), Relu(), MaxPool((2, 2), (2, 2)),
        ns.conv(rng, 4, 4, 3, pad=1, bias=False), Relu(),
        Flatten(), ns.dense(rng, 4 * 3 * 3, 6, bias=False), Relu(), ns.dense(rng, 6, 3, bias=False),
    ]


# Inputs are scaled up (bias-free ReLU nets are positively homogeneous) so that the fixed
# eps = 1e-6 of the Norm rule at joins / avg pools leaks less than rtol 1e-6.
SCALE = 100.0


def _target_logit(layers, x, target=None):
    logits = ref.forward(layers, x).reshape(x.shape[0], -1)
    t = np.argmax(logits, axis=1) if target is None else np.full(x.shape[0], target)
    return logits[np.arange(x.shape[0]), t]


@pytest.mark.parametrize("rule,params", [("lrp0", {}), ("epsilon", {"eps": 1e-9})])
def test_conservation_lrp0_epsilon(rule, params):
    rng = np.random.default_rng(10)
    layers = biasfree_resnet(rng)
    x = SCALE * rng.normal(size=(2, 2, 6, 6))
    for target in (None, 1):
        R = ref.lrp(layers, x, rule, target=target, **params)
        assert R.shape == x.shape and np.all(np.isfinite(R))
        np.testing.assert_allclose(R.sum(axis=(1, 2, 3)), _target_logit(layers, x, target), rtol=1e-6)


def test_lrp0_equals_gradient_times_input():
    rng = np.random.default_rng(11)
    layers = biasfree_resnet(rng)
    x = SCALE * rng.normal(size=(1, 2, 6, 6))
    t = int(np.argmax(ref.forward(layers, x)[0]))
    R = ref.lrp(layers, x, "lrp0", target=t)[0]
    # central finite differences of the numpy forward, all perturbations in one batch
    h, n = 1e-6, x.size
    E = np.eye(n).reshape((n,) + x.shape[1:]) * h
    f = ref.forward(layers, np.concatenate([x + E, x - E]))[:, t]
    grad = ((f[:n] - f[n:]) / (2 * h)).reshape(x.shape[1:])
    np.testing.assert_allclose(R, grad * x[0], rtol=1e-4, atol=1e-9 * np.abs(R).max())


def test_zplus_alphabeta_conservation_positive_inputs():
    rng = np.random.default_rng(12)
    layers = biasfree_cnn(rng)
    x = SCALE * rng.uniform(0.0, 1.0, size=(3, 2, 6, 6))
    logit = _target_logit(layers, x)
    assert np.all(logit > 0)
    for rule in ("zplus", "alphabeta"):
        R = ref.lrp(layers, x, rule, eps=1e-12)
        np.testing.assert_allclose(R.sum(axis=(1, 2, 3)), logit, rtol=1e-6)
    # alpha-beta with alpha - beta = 1 puts negative relevance somewhere; z+ does not
    assert ref.lrp(layers, x, "alphabeta", eps=1e-12).min() < 0 <= ref.lrp(layers, x, "zplus", eps=1e-12).min()


@pytest.mark.parametrize("rule", ["gamma", "flat", "wsquare"])
def test_conservation_bias_free(rule):
    # flat / w^2 also send relevance to dead neurons; at a residual join whose inputs are both 0
    # the Norm rule drops it, so conservation is checked on a sequential net
    rng = np.random.default_rng(13)
    layers = biasfree_seq(rng)
    x = rng.normal(size=(2, 2, 6, 6))
    R = ref.lrp(layers, x, rule, eps=1e-12)
    np.testing.assert_allclose(R.sum(axis=(1, 2, 3)), _target_logit(layers, x), rtol=1e-6)


def test_composite_rule_list_and_zbox_conservation():
    rng = np.random.default_rng(14)
    layers = biasfree_cnn(rng)
    assert len(list(ns.iter_linear(layers))) == 4
    x = SCALE * rng.uniform(-1.0, 1.0, size=(2, 2, 6, 6))
    composite = [("zbox", {"low": -SCALE, "high": SCALE}), ("gamma", {"gamma": 0.5}), "epsilon", ("epsilon", {})]
    R = ref.lrp(layers, x, composite, eps=1e-12)
    np.testing.assert_allclose(R.sum(axis=(1, 2, 3)), _target_logit(layers, x), rtol=1e-6)
    # same rule for all layers via list == via name; changing the first-layer rule changes the map
    np.testing.assert_allclose(ref.lrp(layers, x, ["gamma"] * 4), ref.lrp(layers, x, "gamma"))
    assert not np.allclose(ref.lrp(layers, x, ["epsilon"] + ["gamma"] * 3), ref.lrp(layers, x, "gamma"))
    with pytest.raises(ValueError):
        ref.lrp(layers, x, ["gamma"] * 3)


def _stab(z, eps):
    return z + eps if z >= 0 else z - eps


def loop_rule(rule, W, b, x, R, eps=1e-6, gamma=0.25, alpha=2.0, beta=1.0, low=None, high=None):
    """Per-sample loop-form implementation of each rule on one dense layer."""
    n_out, n_in = W.shape
    p, n = (lambda v: max(v, 0.0)), (lambda v: min(v, 0.0))
    Rin = np.zeros(n_in)
    for j in range(n_out):
        if rule in ("lrp0", "epsilon"):
            e = 0.0 if rule == "lrp0" else eps
            z = sum(W[j, i] * x[i] for i in range(n_in)) + b[j]
            for i in range(n_in):
                Rin[i] += x[i] * W[j, i] / _stab(z, e) * R[j]
        elif rule == "zplus":
            z = sum(p(W[j, i]) * p(x[i]) + n(W[j, i]) * n(x[i]) for i in range(n_in)) + p(b[j])
            for i in range(n_in):
                Rin[i] += (p(W[j, i]) * p(x[i]) + n(W[j, i]) * n(x[i])) / _stab(z, eps) * R[j]
        elif rule == "alphabeta":
            za = sum(p(W[j, i]) * p(x[i]) + n(W[j, i]) * n(x[i]) for i in range(n_in)) + p(b[j])
            zb = sum(n(W[j, i]) * p(x[i]) + p(W[j, i]) * n(x[i]) for i in range(n_in)) + n(b[j])
            for i in range(n_in):
                Rin[i] += alpha * (p(W[j, i]) * p(x[i]) + n(W[j, i]) * n(x[i])) / _stab(za, eps) * R[j]
                Rin[i] -= beta * (n(W[j, i]) * p(x[i]) + p(W[j, i]) * n(x[i])) / _stab(zb, eps) * R[j]
        elif rule == "gamma":
            z = sum(W[j, i] * x[i] for i in range(n_in)) + b[j]
            wp = [W[j, i] + gamma * p(W[j, i]) for i in range(n_in)]
            wn = [W[j, i] + gamma * n(W[j, i]) for i in range(n_in)]
            if z > 0:   # positive output: favour positive contributions
                c = [wp[i] * p(x[i]) + wn[i] * n(x[i]) for i in range(n_in)]
                d = sum(c) + b[j] + gamma * p(b[j])
            elif z < 0:
                c = [wn[i] * p(x[i]) + wp[i] * n(x[i]) for i in range(n_in)]
                d = sum(c) + b[j] + gamma * n(b[j])
            else:
                continue
            for i in range(n_in):
                Rin[i] += c[i] / _stab(d, eps) * R[j]
        elif rule == "flat":
            for i in range(n_in):
                Rin[i] += R[j] / _stab(float(n_in), eps)
        elif rule == "wsquare":
            d = sum(W[j, k] ** 2 for k in range(n_in)) + b[j] ** 2
            for i in range(n_in):
                Rin[i] += W[j, i] ** 2 / _stab(d, eps) * R[j]
        elif rule == "zbox":
            c = [W[j, i] * x[i] - p(W[j, i]) * low[i] - n(W[j, i]) * high[i] for i in range(n_in)]
            d = sum(c) + b[j] - p(b[j]) - n(b[j])
            for i in range(n_in):
                Rin[i] += c[i] / _stab(d, eps) * R[j]
    return Rin


@pytest.mark.parametrize("rule", ["lrp0", "epsilon", "zplus", "alphabeta", "gamma", "flat", "wsquare", "zbox"])
def test_rule_matches_loop_form_on_dense(rule):
    rng = np.random.default_rng(20)
    W, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    x = rng.normal(size=(2, 5))
    low, high = -2.0 - rng.uniform(size=5), 2.0 + rng.uniform(size=5)
    params = {"eps": 0.05}  # a visible stabilizer
    if rule == "zbox":
        params.update(low=low, high=high)
    if rule == "gamma":
        params["gamma"] = 0.4
    R = ref.lrp([Dense(W, b)], x, rule, **params)
    logits = x @ W.T + b
    for s in range(2):
        t = int(np.argmax(logits[s]))
        Rout = np.zeros(3)
        Rout[t] = logits[s, t]
        expected = loop_rule(rule, W, b, x[s], Rout, low=low, high=high,
                             **{k: v for k, v in params.items() if k not in ("low", "high")})
        np.testing.assert_allclose(R[s], expected, rtol=1e-10, atol=1e-12)
    assert np.abs(R).max() > 0


def test_gamma_negative_output_branch():
    # a target with a negative logit exercises the z < 0 half of the gamma rule
    rng = np.random.default_rng(21)
    W, b = rng.normal(size=(4, 5)), rng.normal(size=4)
    x = rng.normal(size=(1, 5))
    logits = (x @ W.T + b)[0]
    t = int(np.argmin(logits))
    assert logits[t] < 0
    R = ref.lrp([Dense(W, b)], x, "gamma", target=t, gamma=0.3)
    Rout = np.zeros(4)
    Rout[t] = logits[t]
    np.testing.assert_allclose(R[0], loop_rule("gamma", W, b, x[0], Rout, gamma=0.3), rtol=1e-10)


def test_maxpool_first_argmax_and_overlap():
    # ties go to the FIRST arg-max; overlapping windows add up
    x = np.array([[[[1.0, 3.0, 3.0], [0.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]])
    layers = [MaxPool((2, 2), (1, 1)), Flatten(), Dense(np.ones((1, 4)))]
    R = ref.lrp(layers, x, "epsilon", eps=0.0)[0, 0]
    expected = np.zeros((3, 3))
    expected[0, 1] = 3.0 + 3.0  # windows (0,0) and (0,1): first 3 is (0,1)
    expected[1, 1] = 2.0        # window (1,0)
    expected[1, 2] = 3.0        # window (1,1)
    np.testing.assert_allclose(R, expected)


# ==========================================================================
# R-LRP
# ==========================================================================


def hand_net():
    return [Dense(np.array([[1.0, -1.0], [3.0, 1.0]]), np.array([0.5, 0.0])), Relu(),
            Dense(np.array([[1.0, 1.0], [-1.0, 0.5]]))]


def test_rlrp_dense_hand_example():
    # x = [1, 2]: h = relu([-0.5, 5]) = [0, 5]; y = [5, 2.5]; target 0, z_out = [5, 0]
    # Eq. 8 layer 2: z_h = 1/2 * [0 * (1*5), 5 * (1*5)] = [0, 12.5]
    # Eq. 8 layer 1: z_x = 1/2 * [1 * (1*0 + 3*12.5), 2 * (-1*0 + 1*12.5)] = [18.75, 12.5]
    # normalized to sum|z| = 5: [3, 2]
    x = np.array([[1.0, 2.0]])
    np.testing.assert_allclose(ref.rlrp(hand_net(), x, normalize=False), [[18.75, 12.5]])
    np.testing.assert_allclose(ref.rlrp(hand_net(), x), [[3.0, 2.0]])
    # target 1: z_out = [0, 2.5]; z_h = 1/2*[0, 5*(0.5*2.5)] = [0, 3.125];
    # z_x = 1/2*[1*3*3.125, 2*1*3.125] = [4.6875, 3.125] -> * 2.5/7.8125 = [1.5, 1.0]
    np.testing.assert_allclose(ref.rlrp(hand_net(), x, target=1), [[1.5, 1.0]])


def test_rlrp_dense_eq8_generic():
    rng = np.random.default_rng(30)
    layers = [ns.dense(rng, 6, 5), Relu(), ns.dense(rng, 5, 4), Relu(), ns.dense(rng, 4, 3)]
    x = rng.normal(size=(2, 6))
    Z = ref.rlrp(layers, x, normalize=False)
    W1, W2, W3 = (L.W for L in layers[::2])
    for s in range(2):
        a1 = np.maximum(W1 @ x[s] + layers[0].b, 0)
        a2 = np.maximum(W2 @ a1 + layers[2].b, 0)
        y = W3 @ a2 + layers[4].b
        z = np.zeros(3)
        z[np.argmax(y)] = y.max()
        z = a2 * (W3.T @ z) / 4   # Eq. 8 with N^(l) = 4
        z = a1 * (W2.T @ z) / 5
        z = x[s] * (W1.T @ z) / 6
        np.testing.assert_allclose(Z[s], z, rtol=1e-12)


def test_rlrp_abs_sum_equals_abs_logit():
    rng = np.random.default_rng(31)
    for build in (m_residual, m_concat, m_cnn, m_nested):
        layers, shape = build(rng)
        x = rng.normal(size=shape)
        for target in (None, 0):
            Z = ref.rlrp(layers, x, target=target)
            assert Z.shape == x.shape and np.all(np.isfinite(Z))
            np.testing.assert_allclose(np.abs(Z).reshape(shape[0], -1).sum(axis=1),
                                       np.abs(_target_logit(layers, x, target)), rtol=1e-10)


def test_rlrp_card_conv_3x3_pad1():
    rng = np.random.default_rng(32)
    card = ref.rlrp_card(ns.conv(rng, 2, 5, 3, pad=1), (2, 4, 4))
    expected = 5 * np.array([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]])
    np.testing.assert_array_equal(card, np.stack([expected, expected]))
    # groups: only the output channels of the input's group count
    card_g = ref.rlrp_card(ns.conv(rng, 2, 6, 3, pad=1, groups=2), (2, 4, 4))
    np.testing.assert_array_equal(card_g, np.stack([3 * expected // 5] * 2))
    # stride 2, no padding, 5x5: rows/cols 0,4 in 1 window, 2 in 2 windows
    card_s = ref.rlrp_card(ns.conv(rng, 1, 1, 3, stride=2), (1, 5, 5))[0]
    c1 = np.array([1, 1, 2, 1, 1])
    np.testing.assert_array_equal(card_s, np.outer(c1, c1))
    # max pool 2x2 stride 1 on 3x3: windows containing each input
    card_p = ref.rlrp_card(MaxPool((2, 2), (1, 1)), (1, 3, 3))[0]
    np.testing.assert_array_equal(card_p, [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


def test_rlrp_conv_eq12_single_layer():
    rng = np.random.default_rng(33)
    L = ns.conv(rng, 1, 2, 3, pad=1, stride=1)
    layers = [L, Flatten(), Dense(np.ones((1, 2 * 4 * 4)))]
    x = rng.normal(size=(1, 1, 4, 4))
    Z = ref.rlrp(layers, x, normalize=False)[0, 0]
    y = ref.forward([L], x)[0]
    # Eq. 8 through the all-ones Dense: z_j = x_j * 1 * logit / 32
    zt = y.reshape(-1) * ref.forward([L, Flatten(), Dense(np.ones((1, 32)))], x)[0, 0] / 32
    zt = zt.reshape(2, 4, 4)
    card = ref.rlrp_card(L, (1, 4, 4))[0]
    expected = np.zeros((4, 4))
    for i1 in range(4):
        for i2 in range(4):
            acc = 0.0
            for co in range(2):
                for j1 in range(4):
                    for j2 in range(4):
                        p1, p2 = i1 - j1 + 1, i2 - j2 + 1
                        if 0 <= p1 < 3 and 0 <= p2 < 3:
                            acc += L.W[co, 0, p1, p2] * zt[co, j1, j2]
            expected[i1, i2] = card[i1, i2] / 32 / 9 * x[0, 0, i1, i2] * acc  # Eq. 12
    np.testing.assert_allclose(Z, expected, rtol=1e-12)


def test_rlrp_maxpool_ties_all_argmax():
    x = np.array([[[[1.0, 3.0, 3.0], [0.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]])
    layers = [MaxPool((2, 2), (1, 1)), Flatten(), Dense(np.array([[1.0, 2.0, 3.0, 4.0]]))]
    Z = ref.rlrp(layers, x, normalize=False)[0, 0]
    y = 3 * 1 + 3 * 2 + 2 * 3 + 3 * 4  # 27
    zj = np.array([1.0, 2.0, 3.0, 4.0]) * np.array([3.0, 3.0, 2.0, 3.0]) * y / 4  # Eq. 8 into the pool output
    card = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]])
    acc = np.zeros((3, 3))
    acc[0, 1] += zj[0] + zj[1]  # (0,1) is an arg-max of windows 0 and 1
    acc[0, 2] += zj[1]          # tie in window 1: (0,2) also gets the full term
    acc[1, 2] += zj[1] + zj[3]  # tie in window 1, arg-max of window 3
    acc[1, 1] += zj[2]
    expected = card / 4 / 4 * x[0, 0] * acc
    np.testing.assert_allclose(Z, expected, rtol=1e-12)


def test_rlrp_residual_and_concat_normalization():
    rng = np.random.default_rng(35)
    B = [ns.dense(rng, 4, 4), Relu(), ns.dense(rng, 4, 4)]
    S = [ns.dense(rng, 4, 4)]
    head = ns.dense(rng, 4, 2)
    x = rng.normal(size=(2, 4))
    net = ref._Net()
    a = net.seq([Residual(B, S), Relu()], x)
    zj = ref.initial_relevance(net.seq([head], a))
    zjoin = net.rlrp_seq([head], a, zj)  # relevance at the join output
    sj = zjoin.sum(axis=1, keepdims=True)
    cb, cs = net.rlrp_seq(B, x, zjoin), net.rlrp_seq(S, x, zjoin)
    assert np.all(cb.sum(axis=1) != 0) and np.all(cs.sum(axis=1) != 0)
    expected = cb * sj / cb.sum(axis=1, keepdims=True) + cs * sj / cs.sum(axis=1, keepdims=True)
    got = ref.rlrp([Residual(B, S), Relu(), head], x, normalize=False)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # identity shortcut: its contribution is z_join itself
    got_id = ref.rlrp([Residual(B, []), Relu(), head], x, normalize=False)
    a = net.seq([Residual(B, []), Relu()], x)
    zjoin = net.rlrp_seq([head], a, ref.initial_relevance(net.seq([head], a)))
    cb = net.rlrp_seq(B, x, zjoin)
    np.testing.assert_allclose(got_id, cb * zjoin.sum(1, keepdims=True) / cb.sum(1, keepdims=True) + zjoin,
                               rtol=1e-10)
    # concat: each branch normalized against ITS slice
    head2 = ns.dense(rng, 8, 2)
    a = net.seq([Concat([B, []])], x)
    zc = net.rlrp_seq([head2], a, ref.initial_relevance(net.seq([head2], a)))
    s1, s2 = zc[:, :4], zc[:, 4:]
    c1 = net.rlrp_seq(B, x, s1)
    expected = c1 * s1.sum(1, keepdims=True) / c1.sum(1, keepdims=True) + s2
    np.testing.assert_allclose(ref.rlrp([Concat([B, []]), head2], x, normalize=False), expected, rtol=1e-10)


def test_rlrp_zero_branch_contributes_nothing():
    # a branch whose contribution sums to exactly 0 (dead ReLU) contributes 0
    dead = [Dense(-np.eye(3), np.full(3, -10.0)), Relu(), Dense(np.eye(3))]
    layers = [Residual(dead, []), Dense(np.ones((1, 3)))]
    x = np.array([[1.0, 2.0, 3.0]])
    Z = ref.rlrp(layers, x, normalize=False)
    zjoin = x / 3 * 1.0 * ref.forward(layers, x)[0, 0]  # Eq. 8 into the join output
    np.testing.assert_allclose(Z, zjoin)  # only the identity shortcut remains
