"""Images from users: decoded safely, converted predictably, refused with one clear line."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from onnxlrp.errors import OnnxlrpError
from onnxlrp.images import list_images, load_image


def _err(path: Path, **kwargs: object) -> str:
    kwargs.setdefault("channels", 3)
    kwargs.setdefault("size", None)
    with pytest.raises(OnnxlrpError) as err:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def test_rgb_png_to_rgb(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", channels=3, size=None)
    assert out.dtype == np.float32 and out.shape == (3, 5, 7)
    np.testing.assert_allclose(out, arr.transpose(2, 0, 1) / 255.0, atol=1e-7)


def test_decompression_bomb_header(tmp_path: Path) -> None:
    # A PNG whose header claims 100000 x 100000 pixels; it must be refused from the header alone.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    assert "decompression bomb" in _err(path)


def test_pixel_limit_parameter(tmp_path: Path) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    assert "more than the limit of 5000" in _err(tmp_path / "a.png", max_pixels=5000)


def test_pillow_bomb_warning_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # warns above 6000, raises above 12000
    assert "decompression bomb" in _err(tmp_path / "a.png", max_pixels=10**9)
    Image.new("RGB", (90, 90)).save(tmp_path / "b.png")
    assert "decompression bomb" in _err(tmp_path / "b.png", max_pixels=10**9)


def test_truncated_jpeg(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _err(tmp_path / "cut.jpg")


def test_truncated_png(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _err(tmp_path / "cut.png")


@pytest.mark.parametrize(
    "content",
    [
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
        b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
    ],
    ids=["eps", "pdf", "svg"],
)
def test_non_raster_renamed_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes) -> None:
    def ghostscript(*args: object, **kwargs: object) -> None:
        raise AssertionError("the EPS decoder was reached")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", ghostscript)
    path = tmp_path / "doc.png"
    path.write_bytes(content)
    assert "not an image in a supported format" in _err(path)


def test_empty_missing_and_folder(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty" in _err(tmp_path / "empty.png")
    assert "no such file" in _err(tmp_path / "missing.png")
    (tmp_path / "dir.png").mkdir()
    assert "folder" in _err(tmp_path / "dir.png")


def test_animated_gif(tmp_path: Path) -> None:
    frames = [Image.new("L", (8, 8), v) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    msg = _err(tmp_path / "anim.gif")
    assert msg == f"animated images are not supported: {tmp_path / 'anim.gif'} has 3 frames"


def test_single_frame_gif(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 200).save(tmp_path / "still.gif")
    out = load_image(tmp_path / "still.gif", channels=1, size=None)
    np.testing.assert_allclose(out, 200 / 255.0, atol=1e-6)


def test_16bit_grayscale_png(tmp_path: Path) -> None:
    arr = np.array([[0, 1, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_image(tmp_path / "g16.png", channels=1, size=None)
    np.testing.assert_allclose(out[0], arr / 65535.0, atol=1e-7)
    rgb = load_image(tmp_path / "g16.png", channels=3, size=None)
    assert rgb.shape == (3, 1, 4)
    np.testing.assert_allclose(rgb, np.repeat(out, 3, axis=0))


def test_cmyk_jpeg_converted_to_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    assert Image.open(tmp_path / "cyan.jpg").mode == "CMYK"
    out = load_image(tmp_path / "cyan.jpg", channels=3, size=None)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), [0.0, 1.0, 1.0], atol=0.03)


def test_grayscale_to_rgb_model_is_replicated(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(arr).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png", channels=3, size=None)
    assert out.shape == (3, 3, 4)
    for c in range(3):
        np.testing.assert_allclose(out[c], arr / 255.0, atol=1e-7)


def test_rgb_to_gray_model_uses_luma(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "red.png")
    out = load_image(tmp_path / "red.png", channels=1, size=None)
    assert out.shape == (1, 4, 4)
    np.testing.assert_allclose(out, round(255 * 299 / 1000) / 255.0, atol=1 / 255)


def test_rgba_alpha_dropped(tmp_path: Path) -> None:
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png", channels=3, size=None)
    np.testing.assert_allclose(out[:, 0, 0], np.array([10, 20, 30]) / 255.0, atol=1e-7)


def test_palette_and_bilevel(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), (0, 0, 255)).convert("P").save(tmp_path / "p.png")
    np.testing.assert_allclose(load_image(tmp_path / "p.png", channels=3, size=None)[:, 0, 0], [0, 0, 1], atol=1e-7)
    Image.new("1", (4, 4), 1).save(tmp_path / "b.bmp")
    np.testing.assert_allclose(load_image(tmp_path / "b.bmp", channels=1, size=None), 1.0)


def test_resize_bilinear_and_size_order(tmp_path: Path) -> None:
    arr = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (20, 1))  # 20 high, 40 wide, left-to-right ramp
    Image.fromarray(arr).save(tmp_path / "ramp.png")
    out = load_image(tmp_path / "ramp.png", channels=1, size=(10, 30))
    assert out.shape == (1, 10, 30)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.all(np.diff(out[0, 0]) >= 0)  # the ramp survives, along the width
    same = load_image(tmp_path / "ramp.png", channels=1, size=(20, 40))
    np.testing.assert_allclose(same[0], arr / 255.0, atol=1e-7)


@pytest.mark.parametrize("size", [(0, 10), (-1, 5), (100_000, 100_000), ("a", 3)])
def test_bad_sizes(tmp_path: Path, size: tuple[int, int]) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(OnnxlrpError, match="size"):
        load_image(tmp_path / "a.png", channels=3, size=size)


def test_bad_channel_count(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    assert "4-channel" in _err(tmp_path / "a.png", channels=4)


def test_other_formats_load(tmp_path: Path) -> None:
    img = Image.new("RGB", (6, 5), (255, 255, 255))
    for ext in ("bmp", "tif", "webp", "ppm"):
        img.save(tmp_path / f"w.{ext}", **({"lossless": True} if ext == "webp" else {}))
        out = load_image(tmp_path / f"w.{ext}", channels=3, size=None)
        assert out.shape == (3, 5, 6)
        np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_control_characters_in_file_name(tmp_path: Path) -> None:
    path = tmp_path / "x\x1b]0;pwned\x07.png"
    path.write_bytes(b"")
    with pytest.raises(OnnxlrpError) as err:
        load_image(path, channels=3, size=None)
    assert "\x1b" not in str(err.value) and "\x07" not in str(err.value) and "\\x1b]0;pwned\\x07" in str(err.value)


def test_list_images(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.PNG", "a.jpg", "c.txt", ".hidden.png", "d.webp"):
        (folder / name).write_bytes(b"x")
    (folder / "sub.png").mkdir()
    single = tmp_path / "single.data"
    single.write_bytes(b"x")
    got = list_images([folder, single, folder / "a.jpg"])
    assert got == [folder / "a.jpg", folder / "b.PNG", folder / "d.webp", single]
    with pytest.raises(OnnxlrpError, match="no such file or folder"):
        list_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxlrpError, match="no image files"):
        list_images([tmp_path / "empty"])
