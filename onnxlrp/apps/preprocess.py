"""Preprocessing: from images in [0, 1] to the model's input space (``none``, ``imagenet``, ``caffe`` or a TOML
file).

``x = (image[order] * scale - mean) / std`` per channel: ``order`` reverses RGB to BGR for Caffe-era models, and
``scale``, ``mean`` and ``std`` are given per channel of the model's input, in its order (BGR for a BGR model)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import first_line, quote, show
from onnxlrp.naming import escape_terminal

__all__ = ["CAFFE_MEAN_BGR", "IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "Preprocess", "make_preprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The ImageNet mean in 0-255 units, B, G, R: what Caffe models (and Keras' ``preprocess_input(mode="caffe")``)
#: subtract from BGR pixels in 0-255, without dividing by a standard deviation.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PRESETS = ("none", "imagenet", "caffe")
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass
class Preprocess:
    """``x = (image * scale - mean) / std`` per channel, ``image`` in [0, 1] (RGB), its channels reversed first when
    ``bgr``; ``scale``, ``mean`` and ``std`` are in the model's channel order."""

    scale: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    name: str
    bgr: bool = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x``: a batch ``[B, C, ...]`` (channel axis 1)."""
        if self.bgr:
            x = x[:, ::-1]
        shape = (-1,) + (1,) * (x.ndim - 2)
        out = (x * self.scale.reshape(shape) - self.mean.reshape(shape)) / self.std.reshape(shape)
        return out.astype(np.float32)


def _channel_values(values, key: str, channels: int, where: str) -> np.ndarray:
    if isinstance(values, bool) or not isinstance(values, (int, float, list)):
        raise OnnxlrpError(f"{where}: {key} must be a number or a list of numbers")
    items = values if isinstance(values, list) else [values]
    if not items or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise OnnxlrpError(f"{where}: {key} must be a number or a list of numbers")
    if len(items) not in (1, channels):
        raise OnnxlrpError(f"{where}: {key} has {len(items)} values for a {channels}-channel input")
    arr = np.broadcast_to(np.asarray(items, dtype=np.float64), (channels,)).copy()
    if not np.all(np.isfinite(arr)):
        raise OnnxlrpError(f"{where}: {key} must be finite")
    return arr


def make_preprocess(spec: str, channels: int) -> Preprocess:
    """``"none"`` (identity), ``"imagenet"`` (RGB mean/std), ``"caffe"`` (BGR in 0-255 minus :data:`CAFFE_MEAN_BGR`)
    or a TOML file with ``scale``, ``mean``, ``std`` and ``channels = "rgb" | "bgr"``."""
    ones, zeros = np.ones(channels), np.zeros(channels)
    if spec in (None, "", "none"):
        return Preprocess(ones, zeros, ones, "none")
    if spec in ("imagenet", "caffe") and channels != 3:
        raise OnnxlrpError(f"--preprocess {spec} needs a 3-channel (RGB or BGR) model input, this one has {channels}")
    if spec == "imagenet":
        return Preprocess(ones, np.array(IMAGENET_MEAN), np.array(IMAGENET_STD), "imagenet")
    if spec == "caffe":
        return Preprocess(np.full(3, 255.0), np.array(CAFFE_MEAN_BGR), ones, "caffe", bgr=True)
    path = Path(spec)
    where = show(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnnxlrpError(f"{where}: no such preprocessing file (or use {', '.join(PRESETS)})") from None
    except IsADirectoryError:
        raise OnnxlrpError(f"{where}: is a folder, not a preprocessing TOML file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise OnnxlrpError(f"{where}: not a valid preprocessing TOML file ({first_line(err)})") from None
    unknown = sorted(set(data) - {"scale", "mean", "std", "channels"})
    if unknown:
        raise OnnxlrpError(f"{where}: unknown key(s) {', '.join(map(escape_terminal, unknown))}; "
                           "valid: scale, mean, std, channels")
    order = data.get("channels", "rgb")
    if not isinstance(order, str) or order.lower() not in CHANNEL_ORDERS:
        raise OnnxlrpError(f"{where}: channels must be \"rgb\" or \"bgr\", not {quote(str(order))}")
    bgr = order.lower() == "bgr"
    if bgr and channels != 3:
        raise OnnxlrpError(f"{where}: channels = \"bgr\" needs a 3-channel model input, this one has {channels}")
    scale = _channel_values(data.get("scale", 1.0), "scale", channels, where)
    mean = _channel_values(data.get("mean", 0.0), "mean", channels, where)
    std = _channel_values(data.get("std", 1.0), "std", channels, where)
    if np.any(std == 0):
        raise OnnxlrpError(f"{where}: std must not be 0")
    return Preprocess(scale, mean, std, path.name, bgr=bgr)
