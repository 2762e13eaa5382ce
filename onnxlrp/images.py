"""Read input images safely and turn them into model inputs.

Only plain raster formats are decoded (PNG, JPEG, BMP, GIF, TIFF, WebP and the PPM family); a file
in any other format -- EPS or PDF renamed ``.png`` included -- is refused before any decoder (or
Ghostscript) sees it.  Every failure is an :class:`~onnxlrp.errors.OnnxlrpError` with one line
naming the file and the cause.

Color handling (what :func:`load_image` does with each kind of image):

- 8-bit images are scaled to [0, 1] by 255; 16-bit grayscale (``I;16`` / ``I``) by 65535; 32-bit
  float images (``F``) are clipped to [0, 1].
- Alpha channels (RGBA, LA, palette transparency) are dropped, not composited.
- CMYK (and YCbCr, LAB...) is converted to RGB with Pillow's ``convert("RGB")``: a plain formula,
  no ICC color management.
- A 3-channel model given a grayscale image gets the gray plane replicated to R, G and B; a
  1-channel model given a color image gets ITU-R 601-2 luma (Pillow's ``convert("L")``:
  ``L = R*299/1000 + G*587/1000 + B*114/1000``).
- When ``size`` differs from the image, each channel is resized with bilinear interpolation
  (Pillow's, which also low-pass filters when shrinking).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io.parse import stat_path, stat_regular_file
from onnxlrp.messages import first_line, reason, show

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "RASTER_FORMATS", "decode_image", "list_images", "load_image"]

#: Pillow format names that may be decoded.  Anything else is refused before decoding.
RASTER_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
#: File extensions :func:`list_images` picks up when it expands a folder (compared lower-case).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
#: Largest image (width * height) decoded, and largest requested output size: 64 MPixel.
MAX_PIXELS = 64 * 1024 * 1024

_GRAY_MODES = ("1", "L", "LA", "La")


def _check_file(path: Path) -> None:
    stat_regular_file(path, what="image", folder_message="is a folder, not an image file",
                      empty_message="empty file (0 bytes), not an image")


def _check_size_arg(size: tuple[int, int] | None, max_pixels: int) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise OnnxlrpError(f"invalid image size {size!r}: expected (height, width)") from None
    if height <= 0 or width <= 0:
        raise OnnxlrpError(f"invalid image size {height}x{width}: height and width must be positive")
    if height * width > max_pixels:
        raise OnnxlrpError(f"requested image size {height}x{width} exceeds the limit of {max_pixels} pixels")
    return height, width


def _convert(im: Image.Image, target: str) -> Image.Image:
    if im.mode == target:
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the direct route warns; alpha is dropped below anyway
    try:
        return im.convert(target)
    except ValueError:
        # Some modes (PA, LAB...) have no direct route; go through RGBA.
        return im.convert("RGBA").convert(target)


def _to_array(im: Image.Image, channels: int) -> np.ndarray:
    """Decoded Pillow image -> float32 [H, W, C] in [0, 1] with the requested channel count."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (PNG, TIFF, PGM with maxval > 255); "I" holds the same values in 32 bits.
        planes = np.clip(np.asarray(im, dtype=np.float64) / 65535.0, 0.0, 1.0).astype(np.float32)[:, :, None]
    elif mode == "F":
        planes = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)[:, :, None]
    else:
        # Grayscale stays one plane; everything else (RGB(A/X), P, PA, CMYK, YCbCr, LAB, HSV) becomes RGB.
        im = _convert(im, "L" if mode in _GRAY_MODES else "RGB")
        if channels == 1:
            im = _convert(im, "L")  # ITU-R 601-2 luma
        planes = np.asarray(im, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        if planes.ndim == 2:
            planes = planes[:, :, None]
    if planes.shape[2] == 1 and channels == 3:
        planes = np.repeat(planes, 3, axis=2)
    return planes


def _resize(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    if planes.shape[:2] == (height, width):
        return planes
    out = np.empty((height, width, planes.shape[2]), dtype=np.float32)
    for c in range(planes.shape[2]):
        channel = Image.fromarray(np.ascontiguousarray(planes[:, :, c], dtype=np.float32))
        out[:, :, c] = np.asarray(channel.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def load_image(
    path: str | os.PathLike[str],
    *,
    channels: int,
    size: tuple[int, int] | None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Read one image file as a float32 array ``[channels, height, width]`` with values in [0, 1].

    ``channels`` is 1 (grayscale model) or 3 (RGB model).  ``size`` is ``(height, width)`` -- note
    the order, the same as the array's -- or ``None`` to keep the image's own size.  Images larger
    than ``max_pixels`` (width * height) are refused before decoding (decompression bombs), as is a
    requested ``size`` larger than that.  See the module docstring for how color modes, bit depths
    and alpha are handled.
    """
    path = Path(path)
    shown = show(path)
    if channels not in (1, 3):
        raise OnnxlrpError(f"{shown}: cannot make a {channels}-channel model input from an image (only 1 or 3)")
    target_size = _check_size_arg(size, max_pixels)
    _check_file(path)
    return _decode(path, shown, channels, target_size, max_pixels)


def decode_image(
    data: bytes,
    shown: str,
    *,
    channels: int,
    size: tuple[int, int] | None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """:func:`load_image` for an image held in memory (e.g. a Parquet cell): the same formats, checks and
    conversions; errors name ``shown`` (an already printable name, such as ``data.parquet row 12``)."""
    if channels not in (1, 3):
        raise OnnxlrpError(f"{shown}: cannot make a {channels}-channel model input from an image (only 1 or 3)")
    target_size = _check_size_arg(size, max_pixels)
    if not data:
        raise OnnxlrpError(f"{shown}: empty (0 bytes), not an image")
    return _decode(io.BytesIO(data), shown, channels, target_size, max_pixels)


def _decode(source: Path | io.BytesIO, shown: str, channels: int, target_size: tuple[int, int] | None,
            max_pixels: int) -> np.ndarray:
    formats = ", ".join(RASTER_FORMATS)
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and raises above twice that;
            # both are errors here.  Pillow's other warnings (odd metadata...) are not the user's business.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(source, formats=list(RASTER_FORMATS))
            except UnidentifiedImageError:
                raise OnnxlrpError(f"{shown}: not an image in a supported format ({formats})") from None
            with im:
                width, height = im.size
                if width <= 0 or height <= 0:
                    raise OnnxlrpError(f"{shown}: image has no pixels ({width}x{height})")
                if width * height > max_pixels:
                    raise OnnxlrpError(
                        f"{shown}: image is {width}x{height} pixels, more than the limit of {max_pixels}"
                        " (possible decompression bomb)"
                    )
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    raise OnnxlrpError(f"animated images are not supported: {shown} has {frames} frames")
                im.load()
                planes = _to_array(im, channels)
    except OnnxlrpError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise OnnxlrpError(f"{shown}: image too large (possible decompression bomb): {first_line(err)}") from None
    except MemoryError:
        raise OnnxlrpError(f"{shown}: not enough memory to decode the image") from None
    except FileNotFoundError:
        raise OnnxlrpError(f"{shown}: no such file") from None
    except PermissionError:
        raise OnnxlrpError(f"{shown}: cannot read image (permission denied)") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is a corrupt file to the user
        raise OnnxlrpError(f"{shown}: truncated or corrupt image ({first_line(err)})") from None
    if target_size is not None:
        planes = _resize(planes, target_size)
    return np.ascontiguousarray(planes.transpose(2, 0, 1), dtype=np.float32)


def list_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand the command-line image arguments into a list of files.

    A file is kept as given (whatever its extension; :func:`load_image` checks its content).  A
    folder is replaced by the image files directly inside it (not recursive), sorted by name, chosen
    by extension (:data:`IMAGE_EXTENSIONS`, any case); hidden files are skipped.  A missing path, or a
    folder without images, is an error.  Order is kept and each file appears once.
    """
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    for raw in paths:
        p = Path(raw)
        shown = show(p)
        st = stat_path(p, "no such file or folder")
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(p) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as err:
                raise OnnxlrpError(f"{shown}: cannot list folder ({reason(err)})") from None
            found = [
                p / e.name
                for e in entries
                if not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS and e.is_file()
            ]
            if not found:
                exts = " ".join(sorted(IMAGE_EXTENSIONS))
                raise OnnxlrpError(f"{shown}: folder holds no image files ({exts})")
            for f in found:
                add(f)
        else:
            add(p)
    return out
