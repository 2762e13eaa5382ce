"""Reading a model file and the first checks on what it holds: a protobuf ``ModelProto`` with an IR version, a graph
and nodes, valid UTF-8 text, and IR and opset versions the installed onnx knows."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx
from onnx import ModelProto

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import first_line, gib, quote, reason, show

__all__ = ["PROTOBUF_MAX_BYTES", "check_basic", "check_versions", "parse_model", "read_model_file", "stat_path",
           "stat_regular_file"]

#: protobuf cannot parse (or write) a message of 2 GiB or more.
PROTOBUF_MAX_BYTES = 2**31 - 1
#: Deepest message nesting accepted.  protobuf's parser stops at about 100 levels, so this only limits models built
#: in memory, before the recursive walks over the model (structure, tensors, scopes) could exhaust Python's stack.
MAX_NESTING = 200


def stat_path(path: str | os.PathLike[str], missing: str) -> os.stat_result:
    """``os.stat`` of a path the user gave (a file or a folder), one line when it cannot be had: ``missing`` for a
    path that does not exist, the OS's reason otherwise."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise OnnxlrpError(f"{show(path)}: {missing}") from None
    except OSError as err:
        raise OnnxlrpError(f"{show(path)}: cannot access ({reason(err)})") from None


def stat_regular_file(path: str | os.PathLike[str], *, what: str, folder_message: str,
                      empty_message: str) -> os.stat_result:
    """``os.stat`` of a file the user gave, refusing (one line each) a missing path, a folder, anything but a
    regular file, and an empty file."""
    shown = show(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise OnnxlrpError(f"{shown}: no such file") from None
    except OSError as err:
        raise OnnxlrpError(f"{shown}: cannot read {what} ({reason(err)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise OnnxlrpError(f"{shown}: {folder_message}")
    if not stat.S_ISREG(st.st_mode):
        raise OnnxlrpError(f"{shown}: not a regular file")
    if st.st_size == 0:
        raise OnnxlrpError(f"{shown}: {empty_message}")
    return st


def read_model_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a model file: a regular file of at most ``max_bytes`` (and under protobuf's 2 GiB)."""
    shown = show(path)
    limit = min(max_bytes, PROTOBUF_MAX_BYTES)
    st = stat_regular_file(path, what="model", folder_message="is a folder, not an ONNX model file",
                           empty_message="not an ONNX model (the file is empty)")
    if st.st_size > limit:
        raise OnnxlrpError(
            f"{shown}: file is {gib(st.st_size)}, larger than an ONNX file can be "
            f"(limit {gib(limit)}; big weights belong in external data)"
        )
    try:
        # O_NONBLOCK: a FIFO swapped in after the stat must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise OnnxlrpError(f"{shown}: cannot read model ({reason(err)})") from None
    with os.fdopen(fd, "rb") as f:
        fst = os.fstat(f.fileno())
        if not stat.S_ISREG(fst.st_mode):
            raise OnnxlrpError(f"{shown}: not a regular file")
        try:
            data = f.read(limit + 1)
        except OSError as err:
            raise OnnxlrpError(f"{shown}: cannot read model ({reason(err)})") from None
    if len(data) > limit:
        raise OnnxlrpError(f"{shown}: file grew while being read")
    return data


_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"%!PS": "a PostScript file",
    b"PK\x03\x04": "a ZIP archive",
    b"\x7fELF": "an executable",
    b"\x1f\x8b": "a gzip file",
}


def parse_model(data: bytes, shown: str) -> ModelProto:
    """Parse ``data`` into a ModelProto and run :func:`check_basic` on it."""
    for magic, what in _MAGIC.items():
        if data.startswith(magic):
            raise OnnxlrpError(f"{shown}: not an ONNX model (the file looks like {what})")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as err:  # noqa: BLE001 - DecodeError, RecursionError, anything protobuf raises
        raise OnnxlrpError(f"{shown}: not an ONNX model (cannot parse it: {first_line(err)})") from None
    check_basic(model, shown)
    return model


def check_basic(model: ModelProto, shown: str) -> None:
    """Refuse a model without ``ir_version``, graph or nodes, with invalid UTF-8 text, or nested deeper than protobuf
    parses (which only a model built in memory can be)."""
    missing = []
    if not model.HasField("ir_version") or model.ir_version == 0:
        missing.append("no ir_version")
    if not model.HasField("graph"):
        missing.append("no graph")
    elif not len(model.graph.node):
        missing.append("no nodes")
    if missing:
        raise OnnxlrpError(f"{shown}: not an ONNX model ({', '.join(missing)})")
    bad = _find_bad_string(model, 1)
    if bad is not None:
        raise OnnxlrpError(f"{shown}: not an ONNX model ({bad})")


def _find_bad_string(msg, depth: int) -> str | None:  # noqa: ANN001 - any protobuf message
    """What is wrong with the first string field (anywhere in ``msg``) that holds bytes instead of text, or with
    messages nested more than :data:`MAX_NESTING` deep; None when nothing is.

    protobuf hands back invalid UTF-8 in onnx's (proto2) string fields as bytes; it is refused here, once.
    """
    if depth > MAX_NESTING:
        return f"messages nested more than {MAX_NESTING} levels deep"
    for fd in msg.DESCRIPTOR.fields:
        if fd.type == fd.TYPE_STRING:
            value = getattr(msg, fd.name)
            values = value if fd.is_repeated else (value,)
            if any(not isinstance(v, str) for v in values):
                return f"invalid UTF-8 text in a {fd.full_name} field"
        elif fd.type == fd.TYPE_MESSAGE:
            if fd.is_repeated:
                subs = getattr(msg, fd.name)
                if fd.message_type.GetOptions().map_entry:  # pragma: no cover - onnx has no maps
                    continue
            elif msg.HasField(fd.name):
                subs = (getattr(msg, fd.name),)
            else:
                continue
            for sub in subs:
                found = _find_bad_string(sub, depth + 1)
                if found is not None:
                    return found
    return None


def _max_ml_opset() -> int:
    try:
        return int(onnx.defs.onnx_ml_opset_version())
    except Exception:  # noqa: BLE001 - older onnx
        return 5


def check_versions(model: ModelProto, shown: str) -> None:
    """Refuse an IR version or an opset (default and ML domains) newer than the installed onnx supports."""
    supported_ir = int(onnx.IR_VERSION)
    if model.ir_version < 0:
        raise OnnxlrpError(f"{shown}: invalid IR version {model.ir_version}")
    if model.ir_version > supported_ir:
        raise OnnxlrpError(
            f"{shown}: IR version {model.ir_version} is newer than the installed onnx {onnx.__version__} "
            f"supports (up to {supported_ir}); upgrade onnx or re-export the model"
        )
    limits = {"": int(onnx.defs.onnx_opset_version()), "ai.onnx": int(onnx.defs.onnx_opset_version())}
    limits["ai.onnx.ml"] = _max_ml_opset()
    for imp in model.opset_import:
        domain = imp.domain
        if imp.version < 1 and domain in limits:
            raise OnnxlrpError(f"{shown}: invalid opset version {imp.version} for domain {quote(domain or 'ai.onnx')}")
        if domain in limits and imp.version > limits[domain]:
            raise OnnxlrpError(
                f"{shown}: opset {imp.version} of domain {quote(domain or 'ai.onnx')} is newer than the installed "
                f"onnx {onnx.__version__} supports (up to {limits[domain]}); re-export the model with an older opset"
            )
