"""Pixel checks of the PNGs written by onnxlrp.heatmap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxlrp.heatmap import relevance_to_rgb, save_heatmap, save_plot


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _reddish(p) -> bool:
    return p[0] > 200 and p[2] < 100


def _blueish(p) -> bool:
    return p[2] > 200 and p[0] < 100


def _whiteish(p) -> bool:
    return min(p) > 240


REL = np.array([[1.0, -1.0], [0.0, 0.25]])


def test_colours_in_png(tmp_path):
    path = save_heatmap(tmp_path / "h.png", REL)
    assert Path(path) == tmp_path / "h.png"
    px = _read(path)
    assert px.shape == (2, 2, 3)
    assert _reddish(px[0, 0])
    assert _blueish(px[0, 1])
    assert _whiteish(px[1, 0])
    # weak positive: still red-tinted, lighter than the maximum
    assert px[1, 1, 0] > 240 and px[1, 1, 2] < 240 and px[1, 1, 2] > px[0, 0, 2]


def test_symmetric_normalisation():
    # max |R| comes from the negative side: +1 must be a half-saturated red, -4 fully blue
    rgb = relevance_to_rgb(np.array([[1.0, -4.0]])).astype(int)
    assert _blueish(rgb[0, 1]) and rgb[0, 1, 0] < 10
    assert rgb[0, 0, 0] > 240 and 150 < rgb[0, 0, 2] < 220


def test_channel_sum():
    r = np.array([[[2.0, 0.0]], [[-3.0, 0.0]]])  # [C=2, H=1, W=2]: pixel 0 sums to -1
    rgb = relevance_to_rgb(r).astype(int)
    assert rgb.shape == (1, 2, 3)
    assert _blueish(rgb[0, 0]) and _whiteish(rgb[0, 1])


def test_all_zero_map_is_neutral(tmp_path):
    rgb = relevance_to_rgb(np.zeros((3, 5)))
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 5, 3)
    assert (rgb == 255).all()
    px = _read(save_heatmap(tmp_path / "z.png", np.zeros((1, 3, 5))))
    assert (px == 255).all()


def test_nan_relevance_does_not_propagate():
    rgb = relevance_to_rgb(np.array([[np.nan, 1.0]]))
    assert _whiteish(rgb[0, 0].astype(int)) and _reddish(rgb[0, 1].astype(int))


def test_overlay_changes_pixels(tmp_path):
    plain = _read(save_heatmap(tmp_path / "a.png", REL))
    gray = np.zeros((2, 2))  # black image
    over = _read(save_heatmap(tmp_path / "b.png", REL, image=gray))
    assert not np.array_equal(plain, over)
    np.testing.assert_allclose(over, np.rint(0.6 * plain), atol=1)  # alpha blend with black
    rgb_image = np.zeros((3, 2, 2))
    rgb_image[1] = 1.0  # green image, channels first
    green = relevance_to_rgb(REL, image=rgb_image, alpha=0.5).astype(int)
    np.testing.assert_allclose(green[1, 0], [128, 255, 128], atol=1)  # white * .5 + green * .5
    np.testing.assert_array_equal(relevance_to_rgb(REL, image=rgb_image, alpha=1.0), relevance_to_rgb(REL))
    uint8_image = np.full((2, 2, 3), 255, dtype=np.uint8)  # channels last, uint8
    np.testing.assert_array_equal(relevance_to_rgb(np.zeros((2, 2)), image=uint8_image), 255)
    with pytest.raises(ValueError):
        relevance_to_rgb(REL, image=np.zeros((3, 3)))


def test_scale(tmp_path):
    rel = np.zeros((28, 28))
    rel[3, 5] = 1.0
    px = _read(save_heatmap(tmp_path / "s.png", rel, scale=4))
    assert px.shape == (112, 112, 3)
    assert all(_reddish(px[y, x]) for y in range(12, 16) for x in range(20, 24))
    assert _whiteish(px[11, 20]) and _whiteish(px[12, 24])
    with pytest.raises(ValueError):
        save_heatmap(tmp_path / "bad.png", rel, scale=0)


def test_save_plot(tmp_path):
    path = save_plot(
        tmp_path / "sub" / "p.png",
        [1, 5, 10, 50],
        {"rlrp": [0.2, 0.5, 0.8, 0.9], "lrp0": [0.1, 0.2, 0.4, 0.9]},
        title="masked accuracy",
        xlabel="% kept",
        ylabel="accuracy",
    )
    px = _read(path)
    assert px.shape == (400, 640, 3)
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 10  # something was drawn
    with pytest.raises(ValueError):
        save_plot(tmp_path / "q.png", [1, 2], {"a": [1, 2, 3]}, title="t", xlabel="x", ylabel="y")


def test_no_pyplot_state():
    code = (
        "import sys, tempfile, os, numpy as np\n"
        "from onnxlrp.heatmap import save_plot, save_heatmap\n"
        "d = tempfile.mkdtemp()\n"
        "save_plot(os.path.join(d, 'p.png'), [0, 1], {'a': [0, 1]}, title='t', xlabel='x', ylabel='y')\n"
        "save_heatmap(os.path.join(d, 'h.png'), np.ones((2, 2)))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["PYTHONPATH"] = str(root)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)
