"""External data: tensors whose bytes live in a file next to the model.

For a model file every reference is validated *before* any byte is read -- a relative location inside the model's
folder, no ``..``, no symbolic link on the way, a regular file with one link, offset and length inside the file and
matching the tensor -- and then the bytes are read into ``raw_data`` here (onnx's own external-data loader is never
used).  A model given in memory has no folder its locations could be relative to: :func:`refuse_external_data`
refuses it, naming the tensor (pass the model's path instead).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from onnx import ModelProto, TensorProto

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import quote, reason, show

from .tensors import expected_bytes, is_external, iter_tensors, tensor_numel

__all__ = ["load_external_data", "refuse_external_data"]

_DRIVE = re.compile(r"^[A-Za-z]:")
_READ_CHUNK = 64 * 2**20


def _external_info(t: TensorProto, label: str, where: str) -> tuple[str, int, int | None]:
    info: dict[str, str] = {}
    for entry in t.external_data:
        info[entry.key] = entry.value
    location = info.get("location")
    if not location:
        raise OnnxlrpError(f"{where}{label} is stored externally but has no location")
    try:
        offset = int(info.get("offset", "0") or "0")
        length = int(info["length"]) if info.get("length") not in (None, "") else None
    except ValueError:
        raise OnnxlrpError(f"{where}{label}: external data offset/length is not a number") from None
    if offset < 0:
        raise OnnxlrpError(f"{where}{label}: negative external data offset ({offset})")
    if length is not None and length < 0:
        raise OnnxlrpError(f"{where}{label}: negative external data length ({length})")
    return location, offset, length


def _external_components(location: str, label: str, where: str) -> list[str]:
    here = f"{where}{label}: external data location {quote(location)}"
    if any(ord(c) < 32 or ord(c) == 127 for c in location):
        raise OnnxlrpError(f"{here} contains control characters")
    if location.startswith(("/", "\\")) or os.path.isabs(location):
        raise OnnxlrpError(f"{here} is an absolute path; it must be relative to the model's folder")
    if _DRIVE.match(location):
        raise OnnxlrpError(f"{here} names a drive; it must be relative to the model's folder")
    parts = [p for p in re.split(r"[\\/]+", location) if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise OnnxlrpError(f"{here} contains '..'; it must stay inside the model's folder")
    if not parts:
        raise OnnxlrpError(f"{here} does not name a file")
    return parts


def _open_external(folder: Path, parts: list[str], label: str, where: str, location: str) -> tuple[int, int]:
    """Walk from the model folder to the data file with lstat, refusing symlinks; open it. -> (fd, size)"""
    target = folder.joinpath(*parts)
    shown_target = show(target)
    here = f"{where}{label}: external data {quote(location)}"
    cur = folder
    st = None
    for i, part in enumerate(parts):
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            raise OnnxlrpError(f"{where}{label}: external data file not found: {shown_target}") from None
        except OSError as err:
            raise OnnxlrpError(f"{here}: cannot access {shown_target} ({reason(err)})") from None
        if stat.S_ISLNK(st.st_mode):
            raise OnnxlrpError(f"{here} goes through a symbolic link ({show(cur)}); refusing to follow it")
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise OnnxlrpError(f"{where}{label}: external data file not found: {shown_target}")
    assert st is not None
    if not stat.S_ISREG(st.st_mode):
        raise OnnxlrpError(f"{here}: {shown_target} is not a regular file")
    if st.st_nlink != 1:
        raise OnnxlrpError(f"{here}: {shown_target} has {st.st_nlink} hard links; refusing a linked data file")
    real_folder = os.path.realpath(folder)
    real_target = os.path.realpath(target)
    if os.path.commonpath([real_folder, real_target]) != real_folder:
        raise OnnxlrpError(f"{here} resolves outside the model's folder")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except OSError as err:
        raise OnnxlrpError(f"{here}: cannot open {shown_target} ({reason(err)})") from None
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode) or fst.st_nlink != 1:
        os.close(fd)
        raise OnnxlrpError(f"{here}: {shown_target} changed while being opened")
    return fd, fst.st_size


def load_external_data(model: ModelProto, folder: Path, where: str) -> None:
    """Validate every external reference first, then read them all into raw_data (``where``: the message prefix)."""
    plan: list[tuple[TensorProto, str, list[str], str, int, int]] = []
    for t, label in iter_tensors(model):
        if not is_external(t):
            continue
        location, offset, length = _external_info(t, label, where)
        parts = _external_components(location, label, where)
        n = tensor_numel(t, label, where)
        expected = expected_bytes(t, n, label, where)
        assert expected is not None  # STRING refused by check_tensor_sizes
        fd, size = _open_external(folder, parts, label, where, location)
        os.close(fd)
        if offset > size:
            raise OnnxlrpError(
                f"{where}{label}: external data offset {offset} is past the end of the file ({size} bytes)"
            )
        if length is None:
            length = size - offset  # onnx's rule: no length means "to the end of the file"
        if offset + length > size:
            raise OnnxlrpError(
                f"{where}{label}: external data bytes {offset}..{offset + length} run past the end of the file "
                f"({size} bytes)"
            )
        if length != expected:
            raise OnnxlrpError(
                f"{where}{label}: external data length {length} does not match the tensor's shape and type "
                f"({expected} bytes)"
            )
        plan.append((t, label, parts, location, offset, length))
    for t, label, parts, location, offset, length in plan:
        fd, size = _open_external(folder, parts, label, where, location)
        try:
            if offset + length > size:
                raise OnnxlrpError(f"{where}{label}: external data file shrank while being read")
            chunks = []
            pos, left = offset, length
            while left:
                chunk = os.pread(fd, min(left, _READ_CHUNK), pos)
                if not chunk:
                    raise OnnxlrpError(f"{where}{label}: external data file shrank while being read")
                chunks.append(chunk)
                pos += len(chunk)
                left -= len(chunk)
        except OSError as err:
            raise OnnxlrpError(f"{where}{label}: cannot read external data ({reason(err)})") from None
        finally:
            os.close(fd)
        data = b"".join(chunks)
        del chunks
        t.ClearField("external_data")
        t.ClearField("data_location")
        t.raw_data = data


def refuse_external_data(model: ModelProto, where: str) -> None:
    """Refuse a model given in memory whose tensors refer to external files: no file is read on its behalf."""
    for t, label in iter_tensors(model):
        if is_external(t):
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            raise OnnxlrpError(
                f"{where}{label} refers to external data ({quote(location)}), which a model given in memory cannot "
                "bring; pass the model's path instead, so that its external data is read (and checked) from its folder"
            )
