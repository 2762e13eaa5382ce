"""Small networks (netspec layer lists) shared by the reference self-checks and the compiler tests."""

import netspec as ns
from netspec import (
    AvgPool,
    Concat,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool,
    Relu,
    Residual,
    Sum,
)


def m_mlp(rng):
    return [ns.dense(rng, 5, 8), ns.batchnorm(rng, 8), Relu(), ns.dense(rng, 8, 6), Relu(),
            ns.dense(rng, 6, 3, bias=False)], (3, 5)


def m_cnn(rng):
    return [
        ns.conv(rng, 2, 4, 3, pad=1), ns.batchnorm(rng, 4), Relu(),
        ns.conv(rng, 4, 4, (3, 2), stride=(2, 1), pad=(1, 0, 0, 1)), Relu(),       # asymmetric pads/kernel
        ns.conv(rng, 4, 6, 3, dilation=2, pad=2, groups=2, bias=False), Relu(),  # dilation + groups
        ns.conv(rng, 6, 6, 3, pad=1, groups=6), Relu(),                           # depthwise
        Flatten(), ns.dense(rng, 6 * 3 * 6, 4),
    ], (2, 2, 6, 6)


def m_maxpool(rng):
    return [
        ns.conv(rng, 2, 3, 3, pad=1), Relu(),
        MaxPool((3, 3), (2, 2), (1, 1, 1, 1), ceil_mode=1),  # overlapping, padded, 7 -> 4 (ceil)
        MaxPool((2, 2), (1, 1), (0, 0, 1, 1)),               # overlapping, end padding
        Flatten(), ns.dense(rng, 3 * 4 * 4, 3),
    ], (2, 2, 7, 7)


def m_maxpool_tiles(rng):
    return [
        ns.conv(rng, 2, 3, 3, pad=1), Relu(),
        MaxPool((2, 2), (2, 2)),                             # windows that tile the input
        MaxPool((3, 2), (3, 2)),                             # anisotropic tiles
        Flatten(), ns.dense(rng, 3 * 2 * 2, 3),
    ], (2, 2, 12, 8)


def m_maxpool_ceil_drop(rng):
    # ceil_mode window that would start in the end padding is dropped (ORT/PyTorch); ONNX shape
    # inference keeps it (3 instead of 2), so only a global pool may follow in an ONNX graph
    return [ns.conv(rng, 1, 2, 1, ndim=1), MaxPool((2,), (2,), (1, 1), ceil_mode=1), GlobalAvgPool(), Flatten(),
            ns.dense(rng, 2, 2)], (1, 1, 3)


def m_avgpool(rng):
    return [
        ns.conv(rng, 2, 3, 3, pad=1), Relu(),
        AvgPool((3, 3), (2, 2), (1, 1, 1, 1), count_include_pad=1),
        AvgPool((2, 2), (1, 1), (1, 0, 0, 1), count_include_pad=0),
        AvgPool((2, 2), (2, 2), (0, 0, 1, 1), count_include_pad=1, ceil_mode=1),
        Flatten(), ns.dense(rng, 3 * 2 * 2, 3),
    ], (2, 2, 6, 6)


def m_global(rng):
    return [
        ns.conv(rng, 2, 4, 3, pad=1), Relu(),
        Concat([[GlobalAvgPool()], [GlobalMaxPool()]]),
        Flatten(), ns.dense(rng, 8, 3),
    ], (2, 2, 5, 5)


def m_residual(rng):
    return [
        ns.conv(rng, 2, 4, 3, pad=1), Relu(),
        Residual([ns.conv(rng, 4, 4, 3, pad=1), ns.batchnorm(rng, 4), Relu(), ns.conv(rng, 4, 4, 3, pad=1)], []),
        Relu(),
        Residual([ns.conv(rng, 4, 6, 3, stride=2, pad=1), ns.batchnorm(rng, 6), Relu(),
                  ns.conv(rng, 6, 6, 3, pad=1), ns.batchnorm(rng, 6)],
                 [ns.conv(rng, 4, 6, 1, stride=2, bias=False), ns.batchnorm(rng, 6)]),
        Relu(), GlobalAvgPool(), Flatten(), ns.dense(rng, 6, 3),
    ], (2, 2, 6, 6)


def m_nested(rng):
    inner = Residual([ns.conv(rng, 3, 3, 3, pad=1), Relu(), ns.conv(rng, 3, 3, 1)], [])
    return [
        ns.conv(rng, 2, 3, 3, pad=1), Relu(),
        Residual([inner, Relu(), Residual([ns.conv(rng, 3, 3, 3, pad=1)], [ns.conv(rng, 3, 3, 1)])], []),
        Relu(), Flatten(), ns.dense(rng, 3 * 5 * 5, 3),
    ], (1, 2, 5, 5)


def m_concat(rng):
    return [
        ns.conv(rng, 2, 3, 3, pad=1), Relu(),
        Concat([
            [ns.conv(rng, 3, 2, 1), Relu()],
            [ns.conv(rng, 3, 2, 3, pad=1), Relu(), ns.conv(rng, 2, 2, 3, pad=1)],
            [MaxPool((3, 3), (1, 1), (1, 1, 1, 1))],
            [],  # identity branch (DenseNet-like)
        ]),
        Relu(), Flatten(), ns.dense(rng, 10 * 5 * 5, 3),
    ], (2, 2, 5, 5)


def m_sum3(rng):
    return [
        ns.conv(rng, 2, 3, 3, pad=1), Relu(),
        Sum([[ns.conv(rng, 3, 3, 3, pad=1)], [ns.conv(rng, 3, 3, 1), Relu()], []]),
        Relu(), Flatten(), ns.dense(rng, 3 * 4 * 4, 3),
    ], (2, 2, 4, 4)


def m_depthwise_strided(rng):
    return [
        ns.conv(rng, 2, 4, 3, pad=1), Relu(),
        ns.conv(rng, 4, 4, 3, stride=2, pad=1, groups=4), Relu(),                    # depthwise, stride 2
        ns.conv(rng, 4, 8, 3, stride=(2, 3), pad=(0, 1, 1, 0), groups=4), Relu(),   # depthwise x2, uneven
        Flatten(), ns.dense(rng, 8 * 2 * 2, 3),
    ], (2, 2, 9, 10)


def m_conv1d(rng):
    return [
        ns.conv(rng, 2, 4, 3, pad=1, ndim=1), Relu(),
        ns.conv(rng, 4, 4, 3, stride=2, dilation=2, pad=(2, 1), groups=2, ndim=1), Relu(),
        MaxPool((2,), (1,), (0, 1)), AvgPool((3,), (1,), (1, 1)),
        Flatten(), ns.dense(rng, 4 * 4, 3),
    ], (2, 2, 9)


def m_conv3d(rng):
    return [ns.conv(rng, 1, 2, 2, pad=(1, 0, 0, 0, 1, 0), ndim=3), Relu(), GlobalAvgPool(), Flatten(),
            ns.dense(rng, 2, 2)], (1, 1, 3, 3, 3)


ZOO = {
    "mlp": m_mlp, "cnn": m_cnn, "maxpool": m_maxpool, "maxpool_tiles": m_maxpool_tiles,
    "maxpool_ceil_drop": m_maxpool_ceil_drop,
    "avgpool": m_avgpool, "global": m_global, "residual": m_residual, "nested": m_nested,
    "concat": m_concat, "sum3": m_sum3, "depthwise_strided": m_depthwise_strided, "conv1d": m_conv1d,
    "conv3d": m_conv3d,
}
