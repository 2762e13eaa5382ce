"""Where the apps read bundled data and write their outputs: the bundled models folder, the output folder, and
files written atomically (through :func:`onnxlrp.io.write_atomic`)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import write_atomic
from onnxlrp.messages import reason, show

__all__ = ["PATH_TYPES", "check_out_dir", "ensure_dir", "models_dir", "write_bytes", "write_npy"]

#: What the apps accept as a path (anything else, e.g. a ModelProto, is named "the model" in messages).
PATH_TYPES = (str, os.PathLike)


def models_dir() -> Path:
    """The folder of the bundled ``onnxlrp.models`` package (a real folder: the package is not zipped)."""
    root = resources.files("onnxlrp.models")
    if not isinstance(root, Path):
        raise OnnxlrpError("the bundled models are not installed as plain files (zipped package?)")
    return root


def write_bytes(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_npy(path: Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return write_atomic(path, write)


def ensure_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` (and its parents); a file in the way is a one-line error."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OnnxlrpError(f"{show(out)}: is a file, not a folder (choose another output folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OnnxlrpError(f"{show(out)}: a file is in the way of the output folder") from None
    except OSError as err:
        raise OnnxlrpError(f"cannot create the output folder {show(out)}: {reason(err)}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OnnxlrpError(f"{show(out)}: the output folder is not writable")
    return out


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Refuse an output folder that is a file, before anything is computed."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OnnxlrpError(f"{show(out)}: is a file, not a folder (choose another output folder)")
