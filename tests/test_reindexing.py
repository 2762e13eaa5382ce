"""Pad in every mode and Slice with steps: relevance goes back to the element each output copies.

The reference (float64 numpy) pads or slices an array of flat indices with numpy's own ``np.pad`` / slicing, so the
copy map is numpy's, not the compiler's; then every input index gets the sum of the relevance of the outputs that
copy it, by a loop. The layer after the re-indexing is a dense layer under LRP-epsilon (its reference is the rule's
equation ``R_in = x * W (R / stab(z))``).
"""

import numpy as np
import onnx
import pytest
from helpers import explain
from onnx import TensorProto, helper, numpy_helper

EPS = 0.01


def dense_after(first: list[onnx.NodeProto], inits: list, in_shape, mid_shape, classes=3, seed=0):
    """``x -> first -> Flatten -> Gemm`` (W: [classes, prod(mid_shape)])."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(classes, int(np.prod(mid_shape)))).astype(np.float32)
    b = rng.normal(size=classes).astype(np.float32)
    nodes = first + [helper.make_node("Flatten", ["mid"], ["flat"]),
                     helper.make_node("Gemm", ["flat", "W", "b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [in_shape[0], classes])],
                              inits + [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w.astype(np.float64), b


def reference(x, copy_of_index, w, b):
    """Epsilon on the dense layer, then each input element gets the relevance of every output that copies it."""
    batch = len(x)
    mid = np.stack([x[i].reshape(-1)[copy_of_index.reshape(-1)] for i in range(batch)])  # [batch, mid]
    z = mid @ w.T + b
    r_z = np.zeros_like(z)
    r_z[np.arange(batch), z.argmax(1)] = z.max(1)
    stab = z + EPS * np.where(z >= 0, 1.0, -1.0)
    r_mid = mid * ((r_z / stab) @ w)
    r_x = np.zeros((batch, x[0].size))
    for j, i in enumerate(copy_of_index.reshape(-1)):
        r_x[:, i] += r_mid[:, j]
    return r_x.reshape(x.shape)


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap", "constant"])
def test_pad_modes(mode):
    shape = (2, 2, 4, 5)
    pads = [0, 0, 2, 1, 0, 0, 1, 3]  # begin (N, C, H, W), end (N, C, H, W)
    inits = [numpy_helper.from_array(np.array(pads, np.int64), "pads")]
    model, w, b = dense_after([helper.make_node("Pad", ["x", "pads"], ["mid"], mode=mode)], inits, shape,
                              (2, 4 + 3, 5 + 4))
    x = np.random.default_rng(1).normal(size=shape)
    index = np.arange(int(np.prod(shape[1:]))).reshape(shape[1:])
    width = [(0, 0), (pads[2], pads[6]), (pads[3], pads[7])]
    if mode == "constant":  # the padded zeros copy nothing: point them at a dummy slot that is dropped
        padded = np.pad(index, width, mode="constant", constant_values=index.size)
        x_ext = np.concatenate([x.reshape(2, -1), np.zeros((2, 1))], 1)
        expected = reference(x_ext, padded, w, b)[:, :-1].reshape(shape)
    else:
        expected = reference(x, np.pad(index, width, mode=mode), w, b)
    _, relevance, _ = explain(model, x.astype(np.float32), "epsilon", epsilon=EPS)
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("starts,ends,axes,steps,numpy_slice", [
    ([0, 4], [5, 0], [2, 3], [2, -1], (slice(None), slice(0, 5, 2), slice(4, 0, -1))),
    ([-1], [-100], [3], [-2], (slice(None), slice(None), slice(-1, None, -2))),
    ([1, 0], [100, 6], [1, 3], [3, 4], (slice(1, None, 3), slice(None), slice(0, 6, 4))),
])
def test_slice_with_steps(starts, ends, axes, steps, numpy_slice):
    shape = (2, 3, 5, 6)
    index = np.arange(int(np.prod(shape[1:]))).reshape(shape[1:])
    copied = index[numpy_slice]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n)
             for v, n in ((starts, "starts"), (ends, "ends"), (axes, "axes"), (steps, "steps"))]
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["mid"])
    model, w, b = dense_after([node], inits, shape, copied.shape)
    x = np.random.default_rng(2).normal(size=shape)
    expected = reference(x, copied, w, b)
    _, relevance, _ = explain(model, x.astype(np.float32), "epsilon", epsilon=EPS)
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert (relevance.reshape(2, -1)[:, np.setdiff1d(index, copied)] == 0).all()  # elements never read get none


def test_magnitude_of_a_conv_fourier_pair_splits_by_squares():
    """``y = sqrt(re^2 + im^2 + eps)`` of two strided 1-D convolutions of a reflect-padded waveform (a Conv-based STFT
    front-end): ``R_re = R re^2 / y^2``, ``R_im`` likewise; then epsilon on each convolution, the pad's copies added
    back. The reference computes the convolutions as explicit matrices by loops."""
    rng = np.random.default_rng(3)
    batch, length, kernel, hop, bins, pad = 2, 24, 8, 4, 3, 4
    t = np.arange(kernel)
    re = np.stack([np.cos(2 * np.pi * k * t / kernel) for k in range(bins)])[:, None].astype(np.float32)
    im = np.stack([-np.sin(2 * np.pi * k * t / kernel) for k in range(1, bins + 1)])[:, None].astype(np.float32)
    padded_len = length + 2 * pad
    frames = (padded_len - kernel) // hop + 1
    nodes = [helper.make_node("Pad", ["x", "pads"], ["xp"], mode="reflect"),
             helper.make_node("Conv", ["xp", "RE"], ["re"], strides=[hop]),
             helper.make_node("Conv", ["xp", "IM"], ["im"], strides=[hop]),
             helper.make_node("Pow", ["re", "two"], ["re2"]), helper.make_node("Mul", ["im", "im"], ["im2"]),
             helper.make_node("Add", ["re2", "im2"], ["power"]), helper.make_node("Add", ["power", "eps"], ["power_e"]),
             helper.make_node("Sqrt", ["power_e"], ["mid"])]
    inits = [numpy_helper.from_array(np.array([0, 0, pad, 0, 0, pad], np.int64), "pads"),
             numpy_helper.from_array(re, "RE"), numpy_helper.from_array(im, "IM"),
             numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.float32(1e-3), "eps")]
    model, w, b = dense_after(nodes, inits, (batch, 1, length), (bins, frames))
    x = rng.normal(size=(batch, 1, length))
    # reference: explicit matrices
    xp = np.pad(x[:, 0], [(0, 0), (pad, pad)], mode="reflect")
    conv = {}
    for name, kern in (("re", re[:, 0].astype(np.float64)), ("im", im[:, 0].astype(np.float64))):
        m = np.zeros((bins * frames, padded_len))
        for k in range(bins):
            for f in range(frames):
                m[k * frames + f, f * hop:f * hop + kernel] = kern[k]
        conv[name] = m
    a, c = xp @ conv["re"].T, xp @ conv["im"].T
    y = np.sqrt(a * a + c * c + 1e-3)
    z = y @ w.T + b
    r_z = np.zeros_like(z)
    r_z[np.arange(batch), z.argmax(1)] = z.max(1)
    r_y = y * ((r_z / (z + EPS * np.where(z >= 0, 1.0, -1.0))) @ w)
    r_xp = np.zeros_like(xp)
    for part, m in ((a, conv["re"]), (c, conv["im"])):
        r_part = r_y * part * part / (y * y)
        stab = part + EPS * np.where(part >= 0, 1.0, -1.0)
        r_xp += xp * ((r_part / stab) @ m)
    sources = np.pad(np.arange(length), (pad, pad), mode="reflect")
    expected = np.zeros((batch, length))
    for j, i in enumerate(sources):
        expected[:, i] += r_xp[:, j]
    _, relevance, _ = explain(model, x.astype(np.float32), "epsilon", epsilon=EPS)
    np.testing.assert_allclose(relevance[:, 0], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
