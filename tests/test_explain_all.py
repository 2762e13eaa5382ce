"""``onnxlrp explain --target all`` (issue 22): a heatmap per class in one figure, the maps as ``[classes, ...]``."""

import netspec as ns
import numpy as np
import onnx
import reference as ref
from PIL import Image

from onnxlrp.cli import main


def bias_free_relu_net(rng):
    """A conv net without biases: positively homogeneous, so LRP-0 is gradient x input and sums to the logit."""
    return [ns.conv(rng, 1, 3, 3, pad=1, bias=False), ns.Relu(), ns.MaxPool((2, 2), (2, 2)), ns.Flatten(),
            ns.dense(rng, 48, 6, bias=False), ns.Relu(), ns.dense(rng, 6, 4, bias=False)]


def test_every_class_is_explained_in_one_array_and_one_figure(tmp_path, capsys):
    rng = np.random.default_rng(0)
    layers = bias_free_relu_net(rng)
    model_path = tmp_path / "net.onnx"
    onnx.save(ns.to_onnx(layers, (1, 1, 8, 8)), model_path)
    pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    out = tmp_path / "out"
    assert main(["explain", str(model_path), str(tmp_path / "img.png"), "--target", "all", "--rule", "lrp0",
                 "-o", str(out)]) == 0
    assert "all 4 classes" in capsys.readouterr().out
    maps = np.load(out / "img.npy")
    assert maps.shape == (4, 1, 8, 8)

    x = pixels[None, None].astype(np.float64) / 255
    logits = ref.forward(layers, x)[0]
    h = 1e-6
    for k in range(4):  # LRP-0 on a bias-free ReLU net: x * d f_k / dx (float64 central differences)
        grad = np.zeros(64)
        for d in range(64):
            e = np.zeros(64)
            e[d] = h
            grad[d] = (ref.forward(layers, x + e.reshape(x.shape))[0, k] -
                       ref.forward(layers, x - e.reshape(x.shape))[0, k]) / (2 * h)
        expected = (x.reshape(-1) * grad).reshape(1, 8, 8)
        assert np.abs(maps[k] - expected).max() <= 1e-4 * np.abs(expected).max()
        np.testing.assert_allclose(maps[k].sum(), logits[k], rtol=1e-4)

    figure = np.asarray(Image.open(out / "img.png").convert("RGB"))
    assert figure.shape[1] == 5 * 190 and figure.shape[0] == 230  # the input and 4 classes, one row
    red, blue = figure[..., 0].astype(int) - figure[..., 2], figure[..., 2].astype(int) - figure[..., 0]
    assert red.max() > 100 and blue.max() > 100  # both signs drawn


def test_target_all_error_lists_it(tmp_path, capsys):
    rng = np.random.default_rng(1)
    model_path = tmp_path / "net.onnx"
    onnx.save(ns.to_onnx(bias_free_relu_net(rng), (1, 1, 8, 8)), model_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "img.png")
    assert main(["explain", str(model_path), str(tmp_path / "img.png"), "--target", "every", "-o",
                 str(tmp_path / "o")]) == 1
    assert "expected a class index, 'predicted' or 'all'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
