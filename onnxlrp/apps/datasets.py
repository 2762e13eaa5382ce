"""The data ``onnxlrp evaluate`` runs on: ``builtin:digits``, a ``.npz`` with ``images`` and ``labels``, or a
folder with one sub-folder per class index."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import first_line, reason, show
from onnxlrp.naming import escape_terminal

from .files import models_dir
from .preprocess import make_preprocess

__all__ = ["Dataset", "load_dataset"]


@dataclass
class Dataset:
    """Samples in the model's input space, their labels, and where they came from."""

    x: np.ndarray  # float32 [N, C, ...] in the model's input space (preprocessed)
    labels: np.ndarray  # int64 [N]
    source: str


def _as_batch(images: np.ndarray, chw: tuple[int, ...], where: str) -> np.ndarray:
    """uint8 (/255) or float images [N, H, W], [N, C, H, W] or [N, H, W, C] -> float32 [N, C, H, W]."""
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer):
        x = images.astype(np.float32)
    else:
        raise OnnxlrpError(f"{where}: images have dtype {images.dtype}; expected uint8 or float")
    want = tuple(chw)
    if x.shape[1:] == want:
        return x
    if len(want) == 3 and want[0] == 1 and x.shape[1:] == want[1:]:
        return x[:, None]
    if len(want) == 3 and x.ndim == 4 and x.shape[1:] == (want[1], want[2], want[0]):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise OnnxlrpError(f"{where}: images have shape {list(x.shape)}; the model takes [N, {', '.join(map(str, want))}]")


def _from_npz(path: Path, where: str) -> tuple[np.ndarray, np.ndarray]:
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            raise OnnxlrpError(f"{where}: not a .npz file (expected a numpy .npz with arrays images and labels)")
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("images", "labels") if k not in data.files]
            if missing:
                raise OnnxlrpError(f"{where}: no array {', '.join(missing)} (a .npz needs 'images' and 'labels')")
            return np.asarray(data["images"]), np.asarray(data["labels"])
    except OnnxlrpError:
        raise
    except FileNotFoundError:
        raise OnnxlrpError(f"{where}: no such file") from None
    except (OSError, ValueError, EOFError) as err:
        raise OnnxlrpError(f"{where}: not a readable .npz with images and labels ({first_line(err)})") from None


def _from_folder(folder: Path, chw: tuple[int, ...], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from onnxlrp.images import list_images, load_image

    where = show(folder)
    if len(chw) != 3 or chw[0] not in (1, 3):
        raise OnnxlrpError(f"{where}: an image folder needs a model taking [N, 1|3, H, W], not {list(chw)}")
    try:
        subdirs = sorted((e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")),
                         key=lambda e: e.name)
    except OSError as err:
        raise OnnxlrpError(f"{where}: cannot list the data folder ({reason(err)})") from None
    classes = []
    for e in subdirs:
        if not e.name.isdigit():
            raise OnnxlrpError(f"{where}: sub-folder {escape_terminal(e.name)!r} is not a class index (0, 1, 2, ...)")
        classes.append((int(e.name), folder / e.name))
    if not classes:
        raise OnnxlrpError(f"{where}: no class sub-folders (expected one folder per class index: 0/, 1/, ...)")
    classes.sort()
    images, labels = [], []
    for label, sub in classes:
        for p in list_images([sub]):
            if limit is not None and len(images) >= limit:
                break
            images.append(load_image(p, channels=chw[0], size=(chw[1], chw[2])))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_dataset(data: str, chw: tuple[int, ...], preprocess: str = "none", limit: int | None = None) -> Dataset:
    """``builtin:digits``, a ``.npz`` with ``images``/``labels``, or a folder with one sub-folder per class index."""
    if limit is not None and limit < 1:
        raise OnnxlrpError(f"--limit must be at least 1, got {limit}")
    channels = chw[0] if len(chw) >= 1 else 1
    if data == "builtin:digits":
        path = models_dir() / "digits_test.npz"
        images, labels = _from_npz(path, "builtin:digits")
        images = images[:limit]
        x = _as_batch(images, chw, "builtin:digits")
        source = "builtin:digits"
    elif isinstance(data, str) and data.startswith("builtin:"):
        raise OnnxlrpError(f"--data {escape_terminal(data)!r}: unknown built-in data set (available: builtin:digits)")
    else:
        path = Path(data)
        where = show(path)
        if path.is_dir():
            x, labels = _from_folder(path, chw, limit)
        elif path.exists():
            images, labels = _from_npz(path, where)
            images = images[:limit]
            x = _as_batch(images, chw, where)
        else:
            raise OnnxlrpError(f"{where}: no such data file or folder")
        source = str(path)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise OnnxlrpError(f"{escape_terminal(source)}: labels must be integers [N], got {labels.dtype} "
                           f"{list(labels.shape)}")
    labels = labels[:limit].astype(np.int64)
    if len(labels) != len(x):
        raise OnnxlrpError(f"{escape_terminal(source)}: {len(x)} images but {len(labels)} labels")
    if len(x) == 0:
        raise OnnxlrpError(f"{escape_terminal(source)}: no samples")
    if not np.all(np.isfinite(x)):
        raise OnnxlrpError(f"{escape_terminal(source)}: images contain NaN or infinite values")
    x = make_preprocess(preprocess, channels)(x) if len(chw) >= 1 else x
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), labels, source)
