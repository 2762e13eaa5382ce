"""Load untrusted ONNX files safely and save compiled models atomically.

Whatever the input, :func:`load_model` either returns a checked :class:`onnx.ModelProto` or raises
:class:`~onnxlrp.errors.OnnxlrpError` with one line naming the file and the cause.  In order it:

1. reads the file (a regular file, at most ``max_bytes``) and parses it with protobuf; anything that
   does not parse, or parses into something without ``ir_version``, graph or nodes, is "not an ONNX
   model";
2. checks the IR version and the opset versions against the installed onnx;
3. checks every tensor (initializers, ``Constant`` values, sparse tensors, tensors in subgraphs and
   functions): the product of its dims must match the bytes it holds, and the total of all claimed
   tensor bytes must stay under ``max_bytes`` -- before anything is allocated from those dims;
4. validates every external-data reference *before* reading any byte (relative location inside the
   model's folder, no ``..``, no symlink on the way, a regular file with one link, offset/length
   inside the file and matching the tensor), then reads the bytes into ``raw_data`` itself (onnx's
   own external-data loader is never used);
5. refuses resource bombs (:func:`check_resource_bombs`), checks the graph structure and sorts the
   nodes topologically (:func:`check_structure`);
6. runs ``onnx.checker.check_model(full_check=False)`` and ``onnx.shape_inference.infer_shapes`` on
   a light copy of the model (large initializers replaced by graph inputs of the same type and
   shape), in a child process when ``isolate=True`` so that a native crash of onnx becomes an error
   instead of killing the caller; the inferred ``value_info`` is copied back into the model.

Unknown operator domains are *not* refused here: the compiler calls :func:`check_domains` for the
nodes on the relevance path only.

:func:`save_model_atomic` writes a model so that the destination either keeps its old content or
gets the complete new one -- never a partial file, also on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto

from onnxlrp.errors import OnnxlrpError
from onnxlrp.naming import escape_terminal

__all__ = [
    "DEFAULT_MAX_BYTES",
    "KNOWN_DOMAINS",
    "MAX_BOMB_ELEMENTS",
    "ORT_MAX_IR_VERSION",
    "check_domains",
    "check_resource_bombs",
    "check_structure",
    "check_tensor_sizes",
    "clamp_ir_version",
    "load_model",
    "save_model_atomic",
]

#: Default limit on the total bytes of all tensors a model claims (and on the model file's size).
DEFAULT_MAX_BYTES = 16 * 2**30
#: Operator domains the compiler knows; see :func:`check_domains`.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
#: Largest tensor (in elements) a shape-making op (ConstantOfShape, Expand, Tile, Range...) may create.
MAX_BOMB_ELEMENTS = 2**31
#: Highest IR version the supported onnxruntime releases load; :func:`clamp_ir_version` writes at most this.
ORT_MAX_IR_VERSION = 10
#: Seconds the isolated onnx check may take.
ISOLATE_TIMEOUT_S = 600
#: Serialized size above which :func:`save_model_atomic` moves initializers to a ``.data`` file.
#: protobuf cannot write messages of 2 GiB or more; keep a margin for the rest of the model.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
#: Initializers at least this large go to the ``.data`` file when external data is used.
_EXTERNAL_MIN_TENSOR_BYTES = 1024
_EXTERNAL_ALIGN = 4096
#: Initializers larger than this are replaced by graph inputs in the copy handed to onnx's checker.
_LIGHT_MIN_TENSOR_BYTES = 64 * 1024
_PROTOBUF_MAX_BYTES = 2**31 - 1
_CHUNK = 8 * 2**20

# Bits per element of each tensor data type (None: variable size, i.e. STRING).
_BITS: dict[int, int | None] = {}
for _name, _bits in {
    "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "STRING": None,
    "BOOL": 8, "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128,
    "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "UINT4": 4,
    "INT4": 4, "FLOAT4E2M1": 4, "FLOAT8E8M0": 8, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6,
}.items():  # fmt: skip
    if hasattr(TensorProto, _name):
        _BITS[getattr(TensorProto, _name)] = _bits

# Which typed field holds which data type, and how many elements one entry holds.
_INT32_TYPES = {
    getattr(TensorProto, n)
    for n in (
        "INT32", "INT16", "INT8", "UINT16", "UINT8", "BOOL", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2", "FLOAT6E2M3",
        "FLOAT6E3M2",
    )
    if hasattr(TensorProto, n)
}  # fmt: skip
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _field_for(dtype: int) -> tuple[str, int]:
    """(typed field, elements packed in one entry) for a data type; ("", 1) when unknown."""
    if dtype in (TensorProto.FLOAT, TensorProto.COMPLEX64):
        return "float_data", 1
    if dtype in (TensorProto.DOUBLE, TensorProto.COMPLEX128):
        return "double_data", 1
    if dtype == TensorProto.INT64:
        return "int64_data", 1
    if dtype in (TensorProto.UINT32, TensorProto.UINT64):
        return "uint64_data", 1
    if dtype == TensorProto.STRING:
        return "string_data", 1
    if dtype in _INT32_TYPES:
        bits = _BITS[dtype] or 8
        return "int32_data", {4: 2, 2: 4}.get(bits, 1)
    return "", 1


# ----------------------------------------------------------------------------------------------
# small helpers


def _show(path: str | os.PathLike[str]) -> str:
    return escape_terminal(os.fspath(path))


def _q(name: str) -> str:
    """A model-provided name, quoted and made inert for the terminal (and cut when huge)."""
    text = escape_terminal(name)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"'{text}'"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    line = text.splitlines()[0]
    return escape_terminal(line[:500])


def _reason(err: OSError) -> str:
    return escape_terminal(err.strerror or str(err))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _prefix(source: str | os.PathLike[str] | None) -> str:
    return f"{_show(source)}: " if source is not None else "model: "


def _node_label(node: NodeProto) -> str:
    if node.name:
        return f"node {_q(node.name)} ({escape_terminal(node.op_type)[:100]})"
    return f"{escape_terminal(node.op_type)[:100]} node"


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


# ----------------------------------------------------------------------------------------------
# tensors


def _iter_tensors(model: ModelProto) -> Iterator[tuple[TensorProto, str]]:
    """Every tensor in the model with a description of where it is (no data is touched)."""

    def from_attrs(node: NodeProto, where: str) -> Iterator[tuple[TensorProto, str]]:
        for attr in node.attribute:
            label = f"{where}{_node_label(node)} attribute {_q(attr.name)}"
            if attr.HasField("t"):
                yield attr.t, label
            for t in attr.tensors:
                yield t, label
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values, label + " (sparse values)"
                yield attr.sparse_tensor.indices, label + " (sparse indices)"
            for sp in attr.sparse_tensors:
                yield sp.values, label + " (sparse values)"
                yield sp.indices, label + " (sparse indices)"
            if attr.HasField("g"):
                yield from from_graph(attr.g, f"{where}subgraph of {_node_label(node)}: ")
            for g in attr.graphs:
                yield from from_graph(g, f"{where}subgraph of {_node_label(node)}: ")

    def from_graph(graph: GraphProto, where: str) -> Iterator[tuple[TensorProto, str]]:
        for t in graph.initializer:
            yield t, f"{where}initializer {_q(t.name)}"
        for sp in graph.sparse_initializer:
            yield sp.values, f"{where}sparse initializer {_q(sp.values.name)} (values)"
            yield sp.indices, f"{where}sparse initializer {_q(sp.values.name)} (indices)"
        for node in graph.node:
            yield from from_attrs(node, where)

    yield from from_graph(model.graph, "")
    for func in model.functions:
        for node in func.node:
            yield from from_attrs(node, f"function {_q(func.name)}: ")
    for info in model.training_info:
        yield from from_graph(info.initialization, "training initialization: ")
        yield from from_graph(info.algorithm, "training algorithm: ")


def _is_external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def _tensor_numel(t: TensorProto, label: str, prefix: str) -> int:
    n = 1
    for d in t.dims:
        if d < 0:
            raise OnnxlrpError(f"{prefix}{label} has a negative dimension ({d})")
        n *= d
    return n


def _expected_bytes(t: TensorProto, n: int, label: str, prefix: str) -> int | None:
    """Bytes the tensor's dims and type call for (None for STRING)."""
    if t.data_type not in _BITS:
        raise OnnxlrpError(f"{prefix}{label} has an unknown data type ({t.data_type})")
    bits = _BITS[t.data_type]
    if bits is None:
        return None
    return (n * bits + 7) // 8


def _check_one_tensor(t: TensorProto, label: str, prefix: str) -> int:
    """Check that a tensor's dims agree with the data present; return the bytes it claims."""
    n = _tensor_numel(t, label, prefix)
    expected = _expected_bytes(t, n, label, prefix)
    shape = "[" + ", ".join(str(d) for d in t.dims) + "]"
    present = [f for f in _TYPED_FIELDS if len(getattr(t, f))]
    if _is_external(t):
        if expected is None:
            raise OnnxlrpError(f"{prefix}{label}: STRING tensors cannot be stored as external data")
        return expected
    raw_len = len(t.raw_data) if t.HasField("raw_data") else 0
    if raw_len:
        present.append("raw_data")
    if len(present) > 1:
        raise OnnxlrpError(f"{prefix}{label} holds data in several fields ({', '.join(present)})")
    if not present:
        if n:
            raise OnnxlrpError(f"{prefix}{label} has shape {shape} ({n} elements) but holds no data")
        return 0
    if present[0] == "raw_data":
        if expected is None:
            raise OnnxlrpError(f"{prefix}{label}: STRING tensors cannot use raw_data")
        if raw_len != expected:
            raise OnnxlrpError(
                f"{prefix}{label} has shape {shape} ({n} elements, {expected} bytes) but holds {raw_len} bytes"
            )
        return expected
    field, per_entry = _field_for(t.data_type)
    if present[0] != field:
        raise OnnxlrpError(f"{prefix}{label} stores its data type {t.data_type} in the wrong field ({present[0]})")
    count = len(getattr(t, field))
    complex_factor = 2 if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
    want = -(-n * complex_factor // per_entry)
    if count != want:
        raise OnnxlrpError(f"{prefix}{label} has shape {shape} ({n} elements) but holds {count} values in {field}")
    if expected is None:
        return sum(len(s) for s in t.string_data)
    return expected


def check_tensor_sizes(
    model: ModelProto, max_bytes: int = DEFAULT_MAX_BYTES, *, source: str | os.PathLike[str] | None = None
) -> int:
    """Check every tensor's dims against the data it holds; return the total claimed bytes.

    Raises OnnxlrpError for a negative dim, an unknown data type, data that does not match the shape
    (a tensor claiming 2**62 elements with 4 bytes is caught here, from the numbers alone), and for a
    total (external data and dense size of sparse tensors included) above ``max_bytes``.
    """
    prefix = _prefix(source)
    total = 0
    for t, label in _iter_tensors(model):
        total += _check_one_tensor(t, label, prefix)
    for sp, label in _iter_sparse(model):
        dense = _tensor_numel(sp, label, prefix) * (_BITS.get(sp.values.data_type) or 8) // 8
        total += dense
    if total > max_bytes:
        raise OnnxlrpError(
            f"{prefix}tensors claim {_gib(total)}, more than the limit of {_gib(max_bytes)} (max_bytes={max_bytes})"
        )
    return total


def _iter_sparse(model: ModelProto) -> Iterator[tuple[onnx.SparseTensorProto, str]]:
    def from_graph(graph: GraphProto) -> Iterator[tuple[onnx.SparseTensorProto, str]]:
        for sp in graph.sparse_initializer:
            yield sp, f"sparse initializer {_q(sp.values.name)}"
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor, f"{_node_label(node)} attribute {_q(attr.name)}"
                for sp in attr.sparse_tensors:
                    yield sp, f"{_node_label(node)} attribute {_q(attr.name)}"
            for g in _subgraphs(node):
                yield from from_graph(g)

    yield from from_graph(model.graph)


# ----------------------------------------------------------------------------------------------
# reading the file


def stat_regular_file(path: str | os.PathLike[str], *, what: str, folder_message: str,
                      empty_message: str) -> os.stat_result:
    """``os.stat`` of a file the user gave, refusing (one line each) a missing path, a folder, anything but a
    regular file, and an empty file."""
    shown = _show(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise OnnxlrpError(f"{shown}: no such file") from None
    except OSError as err:
        raise OnnxlrpError(f"{shown}: cannot read {what} ({_reason(err)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise OnnxlrpError(f"{shown}: {folder_message}")
    if not stat.S_ISREG(st.st_mode):
        raise OnnxlrpError(f"{shown}: not a regular file")
    if st.st_size == 0:
        raise OnnxlrpError(f"{shown}: {empty_message}")
    return st


def _read_model_file(path: Path, max_bytes: int) -> bytes:
    shown = _show(path)
    st = stat_regular_file(path, what="model", folder_message="is a folder, not an ONNX model file",
                           empty_message="not an ONNX model (the file is empty)")
    if st.st_size > min(max_bytes, _PROTOBUF_MAX_BYTES):
        raise OnnxlrpError(
            f"{shown}: file is {_gib(st.st_size)}, larger than an ONNX file can be "
            f"(limit {_gib(min(max_bytes, _PROTOBUF_MAX_BYTES))}; big weights belong in external data)"
        )
    try:
        # O_NONBLOCK: a FIFO swapped in after the stat must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise OnnxlrpError(f"{shown}: cannot read model ({_reason(err)})") from None
    with os.fdopen(fd, "rb") as f:
        fst = os.fstat(f.fileno())
        if not stat.S_ISREG(fst.st_mode):
            raise OnnxlrpError(f"{shown}: not a regular file")
        try:
            data = f.read(min(max_bytes, _PROTOBUF_MAX_BYTES) + 1)
        except OSError as err:
            raise OnnxlrpError(f"{shown}: cannot read model ({_reason(err)})") from None
    if len(data) > min(max_bytes, _PROTOBUF_MAX_BYTES):
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


def _parse(data: bytes, shown: str) -> ModelProto:
    for magic, what in _MAGIC.items():
        if data.startswith(magic):
            raise OnnxlrpError(f"{shown}: not an ONNX model (the file looks like {what})")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as err:  # noqa: BLE001 - DecodeError, RecursionError, anything protobuf raises
        raise OnnxlrpError(f"{shown}: not an ONNX model (cannot parse it: {_first_line(err)})") from None
    _check_basic(model, shown)
    return model


def _check_basic(model: ModelProto, shown: str) -> None:
    missing = []
    if not model.HasField("ir_version") or model.ir_version == 0:
        missing.append("no ir_version")
    if not model.HasField("graph"):
        missing.append("no graph")
    elif not len(model.graph.node):
        missing.append("no nodes")
    if missing:
        raise OnnxlrpError(f"{shown}: not an ONNX model ({', '.join(missing)})")
    _check_strings(model, shown)


def _check_strings(model: ModelProto, shown: str) -> None:
    """protobuf hands back invalid UTF-8 in onnx's (proto2) string fields as bytes; refuse it now, once."""
    bad = _find_bad_string(model)
    if bad is not None:
        raise OnnxlrpError(f"{shown}: not an ONNX model (invalid UTF-8 text in a {bad} field)")


def _find_bad_string(msg) -> str | None:  # noqa: ANN001 - any protobuf message
    """Name of the first string field (anywhere in ``msg``) that holds bytes instead of text."""
    for fd in msg.DESCRIPTOR.fields:
        if fd.type == fd.TYPE_STRING:
            value = getattr(msg, fd.name)
            values = value if fd.is_repeated else (value,)
            if any(not isinstance(v, str) for v in values):
                return fd.full_name
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
                found = _find_bad_string(sub)
                if found is not None:
                    return found
    return None


def _max_ml_opset() -> int:
    try:
        return int(onnx.defs.onnx_ml_opset_version())
    except Exception:  # noqa: BLE001 - older onnx
        return 5


def _check_versions(model: ModelProto, shown: str) -> None:
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
            raise OnnxlrpError(f"{shown}: invalid opset version {imp.version} for domain {_q(domain or 'ai.onnx')}")
        if domain in limits and imp.version > limits[domain]:
            raise OnnxlrpError(
                f"{shown}: opset {imp.version} of domain {_q(domain or 'ai.onnx')} is newer than the installed "
                f"onnx {onnx.__version__} supports (up to {limits[domain]}); re-export the model with an older opset"
            )


# ----------------------------------------------------------------------------------------------
# external data

_DRIVE = re.compile(r"^[A-Za-z]:")


def _external_info(t: TensorProto, label: str, prefix: str) -> tuple[str, int, int | None]:
    info: dict[str, str] = {}
    for entry in t.external_data:
        info[entry.key] = entry.value
    location = info.get("location")
    if not location:
        raise OnnxlrpError(f"{prefix}{label} is stored externally but has no location")
    try:
        offset = int(info.get("offset", "0") or "0")
        length = int(info["length"]) if info.get("length") not in (None, "") else None
    except ValueError:
        raise OnnxlrpError(f"{prefix}{label}: external data offset/length is not a number") from None
    if offset < 0:
        raise OnnxlrpError(f"{prefix}{label}: negative external data offset ({offset})")
    if length is not None and length < 0:
        raise OnnxlrpError(f"{prefix}{label}: negative external data length ({length})")
    return location, offset, length


def _external_components(location: str, label: str, prefix: str) -> list[str]:
    where = f"{prefix}{label}: external data location {_q(location)}"
    if any(ord(c) < 32 or ord(c) == 127 for c in location):
        raise OnnxlrpError(f"{where} contains control characters")
    if location.startswith(("/", "\\")) or os.path.isabs(location):
        raise OnnxlrpError(f"{where} is an absolute path; it must be relative to the model's folder")
    if _DRIVE.match(location):
        raise OnnxlrpError(f"{where} names a drive; it must be relative to the model's folder")
    parts = [p for p in re.split(r"[\\/]+", location) if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise OnnxlrpError(f"{where} contains '..'; it must stay inside the model's folder")
    if not parts:
        raise OnnxlrpError(f"{where} does not name a file")
    return parts


def _open_external(folder: Path, parts: list[str], label: str, prefix: str, location: str) -> tuple[int, int]:
    """Walk from the model folder to the data file with lstat, refusing symlinks; open it. -> (fd, size)"""
    target = folder.joinpath(*parts)
    shown_target = _show(target)
    where = f"{prefix}{label}: external data {_q(location)}"
    cur = folder
    st = None
    for i, part in enumerate(parts):
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            raise OnnxlrpError(f"{prefix}{label}: external data file not found: {shown_target}") from None
        except OSError as err:
            raise OnnxlrpError(f"{where}: cannot access {shown_target} ({_reason(err)})") from None
        if stat.S_ISLNK(st.st_mode):
            raise OnnxlrpError(f"{where} goes through a symbolic link ({_show(cur)}); refusing to follow it")
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise OnnxlrpError(f"{prefix}{label}: external data file not found: {shown_target}")
    assert st is not None
    if not stat.S_ISREG(st.st_mode):
        raise OnnxlrpError(f"{where}: {shown_target} is not a regular file")
    if st.st_nlink != 1:
        raise OnnxlrpError(f"{where}: {shown_target} has {st.st_nlink} hard links; refusing a linked data file")
    real_folder = os.path.realpath(folder)
    real_target = os.path.realpath(target)
    if os.path.commonpath([real_folder, real_target]) != real_folder:
        raise OnnxlrpError(f"{where} resolves outside the model's folder")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except OSError as err:
        raise OnnxlrpError(f"{where}: cannot open {shown_target} ({_reason(err)})") from None
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode) or fst.st_nlink != 1:
        os.close(fd)
        raise OnnxlrpError(f"{where}: {shown_target} changed while being opened")
    return fd, fst.st_size


def _load_external_data(model: ModelProto, folder: Path, prefix: str) -> None:
    """Validate every external reference first, then read them all into raw_data."""
    plan: list[tuple[TensorProto, str, list[str], str, int, int]] = []
    for t, label in _iter_tensors(model):
        if not _is_external(t):
            continue
        location, offset, length = _external_info(t, label, prefix)
        parts = _external_components(location, label, prefix)
        n = _tensor_numel(t, label, prefix)
        expected = _expected_bytes(t, n, label, prefix)
        assert expected is not None  # STRING refused by check_tensor_sizes
        fd, size = _open_external(folder, parts, label, prefix, location)
        os.close(fd)
        if offset > size:
            raise OnnxlrpError(
                f"{prefix}{label}: external data offset {offset} is past the end of the file ({size} bytes)"
            )
        if length is None:
            length = size - offset  # onnx's rule: no length means "to the end of the file"
        if offset + length > size:
            raise OnnxlrpError(
                f"{prefix}{label}: external data bytes {offset}..{offset + length} run past the end of the file "
                f"({size} bytes)"
            )
        if length != expected:
            raise OnnxlrpError(
                f"{prefix}{label}: external data length {length} does not match the tensor's shape and type "
                f"({expected} bytes)"
            )
        plan.append((t, label, parts, location, offset, length))
    for t, label, parts, location, offset, length in plan:
        fd, size = _open_external(folder, parts, label, prefix, location)
        try:
            if offset + length > size:
                raise OnnxlrpError(f"{prefix}{label}: external data file shrank while being read")
            chunks = []
            pos, left = offset, length
            while left:
                chunk = os.pread(fd, min(left, _CHUNK * 8), pos)
                if not chunk:
                    raise OnnxlrpError(f"{prefix}{label}: external data file shrank while being read")
                chunks.append(chunk)
                pos += len(chunk)
                left -= len(chunk)
        except OSError as err:
            raise OnnxlrpError(f"{prefix}{label}: cannot read external data ({_reason(err)})") from None
        finally:
            os.close(fd)
        data = b"".join(chunks)
        del chunks
        t.ClearField("external_data")
        t.ClearField("data_location")
        t.raw_data = data


# ----------------------------------------------------------------------------------------------
# constants and resource bombs


def _small_values(t: TensorProto, limit: int = 4096) -> list[float] | None:
    """Values of a small numeric, non-external tensor (without onnx.numpy_helper); None if unsure."""
    if _is_external(t):
        return None
    n = 1
    for d in t.dims:
        if d < 0:
            return None
        n *= d
    if n > limit:
        return None
    dtype_map = {
        TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.FLOAT: np.float32,
        TensorProto.DOUBLE: np.float64, TensorProto.INT16: np.int16, TensorProto.INT8: np.int8,
        TensorProto.UINT8: np.uint8, TensorProto.UINT16: np.uint16, TensorProto.UINT32: np.uint32,
        TensorProto.UINT64: np.uint64,
    }  # fmt: skip
    np_type = dtype_map.get(t.data_type)
    if np_type is None:
        return None
    if t.HasField("raw_data") and t.raw_data:
        raw = t.raw_data
        if len(raw) != n * np.dtype(np_type).itemsize:
            return None
        return [v.item() for v in np.frombuffer(raw, dtype=np.dtype(np_type).newbyteorder("<"))]
    field, _ = _field_for(t.data_type)
    values = list(getattr(t, field)) if field else []
    if len(values) != n:
        return None
    return values


def _constants(graph: GraphProto) -> dict[str, list[float]]:
    """Name -> values for the small constants of a graph (initializers and Constant nodes)."""
    out: dict[str, list[float]] = {}
    for t in graph.initializer:
        vals = _small_values(t)
        if vals is not None:
            out[t.name] = vals
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        for attr in node.attribute:
            vals = None
            if attr.name == "value" and attr.HasField("t"):
                vals = _small_values(attr.t)
            elif attr.name == "value_int":
                vals = [attr.i]
            elif attr.name == "value_ints" and len(attr.ints) <= 4096:
                vals = list(attr.ints)
            elif attr.name == "value_float":
                vals = [attr.f]
            elif attr.name == "value_floats" and len(attr.floats) <= 4096:
                vals = list(attr.floats)
            if vals is not None:
                out[node.output[0]] = vals
    return out


def _prod(values: Iterable[float]) -> int:
    p = 1
    for v in values:
        p *= max(int(v), 0)
    return p


def check_resource_bombs(
    model: ModelProto, *, max_elements: int = MAX_BOMB_ELEMENTS, source: str | os.PathLike[str] | None = None
) -> None:
    """Refuse ops whose constant inputs ask for a huge tensor, before anything runs or allocates.

    Looked at (constants = initializers and ``Constant`` nodes; computed shapes are not followed):
    ``ConstantOfShape`` (product of the shape), ``Expand`` (product of the target shape, a lower bound
    of the output), ``Tile`` (product of the repeats), ``Range`` (``ceil((limit - start) / delta)``;
    ``delta == 0`` is refused), ``Resize``/``Upsample`` with constant ``sizes``, and ``Pad`` (largest
    padding of one axis).  More than ``max_elements`` elements is refused, also in subgraphs.
    """
    prefix = _prefix(source)

    def visit(graph: GraphProto, outer: dict[str, list[float]]) -> None:
        consts = dict(outer)
        consts.update(_constants(graph))
        for node in graph.node:
            _check_bomb_node(node, consts, max_elements, prefix)
            for g in _subgraphs(node):
                visit(g, consts)

    visit(model.graph, {})


def _check_bomb_node(node: NodeProto, consts: dict[str, list[float]], max_elements: int, prefix: str) -> None:
    if node.domain not in ("", "ai.onnx"):
        return

    def const(i: int) -> list[float] | None:
        if len(node.input) > i and node.input[i]:
            return consts.get(node.input[i])
        return None

    def int_const(i: int) -> list[int] | None:
        values = const(i)
        if values is None or not all(isinstance(v, int) for v in values):
            return None  # shapes are int64; anything else is for onnx's checker to refuse
        return [int(v) for v in values]

    def refuse(what: str, count: int) -> None:
        raise OnnxlrpError(
            f"{prefix}{_node_label(node)} would create {what} of {count} elements (limit {max_elements}); "
            "refusing the model"
        )

    def negative(values: list[float]) -> None:
        if any(v < 0 for v in values):
            raise OnnxlrpError(f"{prefix}{_node_label(node)} has a negative size in its constant shape")

    op = node.op_type
    if op in ("ConstantOfShape", "Expand"):
        shape = int_const(0 if op == "ConstantOfShape" else 1)
        if shape is not None:
            negative(shape)
            count = _prod(shape)
            if count > max_elements:
                refuse("a tensor", count)
    elif op == "Tile":
        repeats = int_const(1)
        if repeats is not None:
            negative(repeats)
            data = const(0)
            count = _prod(repeats) * (len(data) if data is not None else 1)
            if count > max_elements:
                refuse("a tensor", count)
    elif op == "Range":
        start, limit, delta = const(0), const(1), const(2)
        if start and limit and delta and len(start) == len(limit) == len(delta) == 1:
            s, lim, d = float(start[0]), float(limit[0]), float(delta[0])
            steps = (lim - s) / d if d != 0 else math.inf
            if not all(math.isfinite(v) for v in (s, lim, d, steps)):
                raise OnnxlrpError(
                    f"{prefix}{_node_label(node)} has a zero or non-finite start, limit or step; refusing the model"
                )
            count = max(math.ceil(steps), 0)
            if count > max_elements:
                refuse("a range", count)
    elif op in ("Resize", "Upsample"):
        sizes = int_const(3) if op == "Resize" else None
        if sizes is not None:
            negative(sizes)
            count = _prod(sizes)
            if count > max_elements:
                refuse("a tensor", count)
        scales = const(2) if op == "Resize" else const(1)
        if scales is not None and any(not math.isfinite(v) or v > max_elements for v in scales):
            raise OnnxlrpError(
                f"{prefix}{_node_label(node)} scales by a non-finite or huge factor (limit {max_elements}); "
                "refusing the model"
            )
    elif op == "Pad":
        pads = int_const(1)
        if pads is not None and len(pads) % 2 == 0:
            half = len(pads) // 2
            widest = max((max(pads[i], 0) + max(pads[i + half], 0) for i in range(half)), default=0)
            if widest > max_elements:
                refuse("an axis", int(widest))


# ----------------------------------------------------------------------------------------------
# structure and domains


def _defined_in(graph: GraphProto) -> set[str]:
    names = {vi.name for vi in graph.input}
    names.update(t.name for t in graph.initializer)
    names.update(sp.values.name for sp in graph.sparse_initializer)
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def _outer_refs(graph: GraphProto) -> set[str]:
    """Names a (sub)graph uses without defining them: references to the enclosing scope."""
    defined = _defined_in(graph)
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for g in _subgraphs(node):
            used.update(_outer_refs(g))
    used.update(o.name for o in graph.output)
    return used - defined


def _check_graph_structure(graph: GraphProto, outer: set[str], prefix: str, where: str) -> None:
    if not len(graph.output):
        raise OnnxlrpError(f"{prefix}{where}has no outputs")
    seen_out: set[str] = set()
    for o in graph.output:
        if not o.name:
            raise OnnxlrpError(f"{prefix}{where}has an output without a name")
        if o.name in seen_out:
            raise OnnxlrpError(f"{prefix}{where}has two outputs named {_q(o.name)}")
        seen_out.add(o.name)
    seen_in: set[str] = set()
    for i in graph.input:
        if i.name in seen_in:
            raise OnnxlrpError(f"{prefix}{where}has two inputs named {_q(i.name)}")
        seen_in.add(i.name)

    available = set(outer) | seen_in
    available.update(t.name for t in graph.initializer)
    available.update(sp.values.name for sp in graph.sparse_initializer)
    producer: dict[str, int] = {}
    nodes = list(graph.node)
    for idx, node in enumerate(nodes):
        for o in node.output:
            if not o:
                continue
            if o in producer:
                raise OnnxlrpError(
                    f"{prefix}{where}tensor {_q(o)} is produced by two nodes "
                    f"({_node_label(nodes[producer[o]])} and {_node_label(node)})"
                )
            if o in seen_in or o in available - set(outer):
                raise OnnxlrpError(
                    f"{prefix}{where}{_node_label(node)} overwrites the graph input or initializer {_q(o)}"
                )
            producer[o] = idx

    deps: list[set[int]] = []
    for node in nodes:
        needed = {i for i in node.input if i}
        for g in _subgraphs(node):
            needed |= _outer_refs(g)
        mine: set[int] = set()
        for name in needed:
            if name in producer:
                mine.add(producer[name])
            elif name not in available:
                raise OnnxlrpError(
                    f"{prefix}{where}{_node_label(node)} uses {_q(name)}, which no node, input or initializer produces"
                )
        deps.append(mine)
    for o in graph.output:
        if o.name not in producer and o.name not in available:
            raise OnnxlrpError(f"{prefix}{where}output {_q(o.name)} is not produced by any node, input or initializer")

    order = _topological_order(deps)
    if order is None:
        raise OnnxlrpError(f"{prefix}{where}has a cycle: {_describe_cycle(nodes, deps)}")
    if order != list(range(len(nodes))):
        copies = []
        for i in order:
            c = NodeProto()
            c.CopyFrom(nodes[i])
            copies.append(c)
        del graph.node[:]
        graph.node.extend(copies)

    for node in graph.node:
        for g in _subgraphs(node):
            _check_graph_structure(g, available | set(producer), prefix, f"{where}subgraph of {_node_label(node)} ")


def _topological_order(deps: list[set[int]]) -> list[int] | None:
    """Kahn's algorithm, keeping the original order wherever the dependencies allow."""
    import heapq

    users: list[list[int]] = [[] for _ in deps]
    missing = [0] * len(deps)
    for i, mine in enumerate(deps):
        for d in mine:
            users[d].append(i)
            missing[i] += 1
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    return order if len(order) == len(deps) else None


def _describe_cycle(nodes: list[NodeProto], deps: list[set[int]]) -> str:
    # Follow dependencies from a node left over by Kahn's algorithm until one repeats.
    order = _topological_order(deps) or []
    done = set(order)
    start = next(i for i in range(len(nodes)) if i not in done)
    path: list[int] = []
    pos: dict[int, int] = {}
    cur = start
    while cur not in pos:
        pos[cur] = len(path)
        path.append(cur)
        cur = next(d for d in sorted(deps[cur]) if d not in done)
    cycle = path[pos[cur] :] + [cur]
    cycle.reverse()
    shown = [_node_label(nodes[i]) for i in cycle[:8]]
    return " -> ".join(shown) + (" -> ..." if len(cycle) > 8 else "")


def check_structure(model: ModelProto, *, source: str | os.PathLike[str] | None = None) -> ModelProto:
    """Check the graph's structure; sort its nodes topologically.  Returns ``model`` itself.

    Raises OnnxlrpError for: no graph outputs, an output without a name, two outputs (or inputs) with
    the same name, a tensor produced by two nodes or a node overwriting an input/initializer, a node
    input (or subgraph reference to the enclosing scope) that nothing produces, an output nothing
    produces, and a cycle (the message lists the nodes on it).

    Nodes that are not in topological order are accepted: they are reordered *in place* (stable:
    nodes keep their original order wherever the dependencies allow), in subgraphs too, and the same
    model object is returned.  A sorted model is left untouched.
    """
    _check_graph_structure(model.graph, set(), _prefix(source), "graph ")
    return model


def check_domains(
    model: ModelProto,
    nodes: Iterable[NodeProto] | None = None,
    *,
    source: str | os.PathLike[str] | None = None,
    known: Iterable[str] = KNOWN_DOMAINS,
) -> None:
    """Refuse nodes from operator domains onnxlrp does not know (see :data:`KNOWN_DOMAINS`).

    ``nodes`` defaults to every node of the main graph; the compiler passes only the nodes on the
    relevance path, so a custom op elsewhere in the model does not stop compilation.
    """
    known_set = set(known)
    for node in model.graph.node if nodes is None else nodes:
        if node.domain not in known_set:
            raise OnnxlrpError(
                f"{_prefix(source)}{_node_label(node)} uses the unknown operator domain {_q(node.domain)} "
                f"(known: {', '.join(_q(d) for d in sorted(known_set))})"
            )


# ----------------------------------------------------------------------------------------------
# onnx checker and shape inference (optionally in a child process)


def _copy_fields(src, dst, skip: set[str]) -> None:  # noqa: ANN001 - any protobuf message
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _light_copy(model: ModelProto) -> ModelProto:
    """The model without its large initializers, which become graph inputs of the same type/shape."""
    light = ModelProto()
    _copy_fields(model, light, {"graph"})
    graph = light.graph
    _copy_fields(model.graph, graph, {"initializer"})
    inputs = {vi.name for vi in model.graph.input}
    for t in model.graph.initializer:
        if t.ByteSize() <= _LIGHT_MIN_TENSOR_BYTES and not _is_external(t):
            graph.initializer.add().CopyFrom(t)
        elif t.name not in inputs:
            vi = graph.input.add()
            vi.name = t.name
            vi.type.tensor_type.elem_type = t.data_type
            shape = vi.type.tensor_type.shape
            for d in t.dims:
                shape.dim.add().dim_value = d
            if len(t.dims) == 0:
                vi.type.tensor_type.shape.SetInParent()
    return light


def _check_and_infer(data: bytes) -> bytes:
    """What runs in the child: onnx's checker and shape inference on a serialized (light) model.

    onnx's checker wants a shape on every main-graph output, which onnxruntime does not; outputs
    without one (a custom op's, say) are left out of the checker's copy only.
    """
    model = ModelProto()
    model.ParseFromString(data)
    outputs = list(model.graph.output)
    shaped = [o for o in outputs if not (o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape"))]
    if len(shaped) != len(outputs):
        del model.graph.output[:]
        model.graph.output.extend(shaped)
        onnx.checker.check_model(model, full_check=False)
        del model.graph.output[:]
        model.graph.output.extend(outputs)
    else:
        onnx.checker.check_model(model, full_check=False)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    return inferred.SerializeToString()


def _child_main() -> int:
    data = sys.stdin.buffer.read()
    try:
        out = _check_and_infer(data)
    except Exception as err:  # noqa: BLE001 - reported to the parent as text
        sys.stderr.write(_first_line(err) + "\n")
        return 3
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return 0


# Run by ``sys.executable -c``; argv[1] is the parent's sys.path as JSON.
_CHILD_CODE = (
    "import json, sys\n"
    "sys.path[:] = json.loads(sys.argv[1])\n"
    "from onnxlrp.loading import _child_main\n"
    "sys.exit(_child_main())\n"
)


def _run_isolated(light: bytes, shown: str) -> bytes:
    package_root = str(Path(__file__).resolve().parent.parent)
    child_path = [package_root] + [p for p in sys.path if p != package_root]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_CODE, json.dumps(child_path)],
            input=light,
            capture_output=True,
            timeout=ISOLATE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise OnnxlrpError(f"{shown}: onnx did not finish checking the model within {ISOLATE_TIMEOUT_S} s") from None
    except OSError as err:
        raise OnnxlrpError(f"{shown}: cannot start the isolated onnx check ({_reason(err)})") from None
    if proc.returncode < 0:
        sig = -proc.returncode
        try:
            name = f"signal {sig}, {signal.Signals(sig).name}"
        except ValueError:
            name = f"signal {sig}"
        raise OnnxlrpError(f"onnx crashed while checking {shown} ({name})")
    lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    detail = escape_terminal(lines[-1][:500]) if lines else "no message"
    if proc.returncode == 3:
        raise OnnxlrpError(f"{shown}: invalid ONNX model ({detail})")
    if proc.returncode != 0:
        raise OnnxlrpError(f"onnx failed while checking {shown} (exit code {proc.returncode}: {detail})")
    return proc.stdout


def _native_check(model: ModelProto, shown: str, isolate: bool) -> None:
    light = _light_copy(model)
    data = light.SerializeToString()
    del light
    if isolate:
        out = _run_isolated(data, shown)
    else:
        try:
            out = _check_and_infer(data)
        except Exception as err:  # noqa: BLE001 - ValidationError, InferenceError, anything onnx raises
            raise OnnxlrpError(f"{shown}: invalid ONNX model ({_first_line(err)})") from None
    inferred = ModelProto()
    try:
        inferred.ParseFromString(out)
    except Exception as err:  # noqa: BLE001
        raise OnnxlrpError(f"{shown}: onnx returned an unreadable model ({_first_line(err)})") from None
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(inferred.graph.value_info)
    if len(inferred.graph.output) == len(model.graph.output):
        for mine, theirs in zip(model.graph.output, inferred.graph.output, strict=True):
            if mine.name == theirs.name:
                mine.CopyFrom(theirs)


# ----------------------------------------------------------------------------------------------
# load


def load_model(
    path: str | os.PathLike[str],
    *,
    isolate: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    check: bool = True,
) -> ModelProto:
    """Load an ONNX file that may be hostile; see the module docstring for every step.

    ``isolate=True`` runs onnx's checker and shape inference in a child process (``sys.executable``)
    so that a crash inside onnx's native code becomes ``OnnxlrpError("onnx crashed while checking
    FILE (signal 11, SIGSEGV)")``.  It costs one interpreter start plus ``import onnx``: about 0.45 s
    on a small model (2 CPU cores); the weights are not sent to the child.  ``max_bytes`` bounds both
    the file and the total bytes all tensors claim.  ``check=False`` skips onnx's checker and shape
    inference (every other check still runs).

    The returned model has all external data read into ``raw_data``, its nodes topologically
    sorted, and the ``value_info`` shape inference found.  Unknown operator domains are not refused
    (see :func:`check_domains`).
    """
    path = Path(path)
    shown = _show(path)
    prefix = f"{shown}: "
    data = _read_model_file(path, max_bytes)
    model = _parse(data, shown)
    del data
    _check_versions(model, shown)
    check_tensor_sizes(model, max_bytes, source=path)
    _load_external_data(model, Path(os.path.abspath(path.parent)), prefix)
    check_resource_bombs(model, source=path)
    check_structure(model, source=path)
    if check:
        _native_check(model, shown, isolate)
    return model


# ----------------------------------------------------------------------------------------------
# save


def clamp_ir_version(model: ModelProto, max_ir: int = ORT_MAX_IR_VERSION) -> ModelProto:
    """Lower ``model.ir_version`` to at most ``max_ir`` (in place) and return the model.

    onnx 1.23 stamps new models with IR version 11+, which onnxruntime 1.2x refuses to load.
    """
    if model.ir_version > max_ir:
        model.ir_version = max_ir
    return model


def _serialize(model: ModelProto) -> bytes:
    return model.SerializeToString()


class _SaveInterrupted(BaseException):
    """Raised by the temporary SIGTERM handler inside save_model_atomic."""


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises _SaveInterrupted; the old handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_IGN, None):
        yield  # SIGTERM is ignored (or handled outside Python): leave it alone
        return

    def handler(signum: int, frame: object) -> None:
        raise _SaveInterrupted()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def umask_mode() -> int:
    """``0o666`` minus the umask (read without changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def _check_destination(path: Path) -> None:
    shown = _show(path)
    parent = path.parent
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        raise OnnxlrpError(f"cannot write {shown}: folder {_show(parent)} does not exist") from None
    except NotADirectoryError:
        raise OnnxlrpError(f"cannot write {shown}: {_show(parent)} is not a folder") from None
    except OSError as err:
        raise OnnxlrpError(f"cannot write {shown}: {_reason(err)}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise OnnxlrpError(f"cannot write {shown}: {_show(parent)} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OnnxlrpError(f"cannot write {shown}: folder {_show(parent)} is not writable")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise OnnxlrpError(f"cannot write {shown}: {_reason(err)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise OnnxlrpError(f"refusing to write {shown}: it is a symbolic link")
    if stat.S_ISDIR(st.st_mode):
        raise OnnxlrpError(f"cannot write {shown}: it is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise OnnxlrpError(f"refusing to write {shown}: it exists and is not a regular file")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        pos += os.write(fd, view[pos : pos + _CHUNK])


def _externalize(model: ModelProto, data_fd: int, location: str) -> ModelProto:
    """A copy of ``model`` whose big initializers live in the file ``data_fd`` (written here)."""
    skeleton = ModelProto()
    _copy_fields(model, skeleton, {"graph"})
    _copy_fields(model.graph, skeleton.graph, {"initializer"})
    offset = 0
    data_fields = {"raw_data", "external_data", "data_location", *_TYPED_FIELDS}
    for t in model.graph.initializer:
        out = skeleton.graph.initializer.add()
        if _is_external(t):
            raise OnnxlrpError(f"cannot save: initializer {_q(t.name)} still refers to external data")
        if t.ByteSize() < _EXTERNAL_MIN_TENSOR_BYTES or t.data_type == TensorProto.STRING:
            out.CopyFrom(t)
            continue
        if t.HasField("raw_data"):
            raw = t.raw_data
        else:
            from onnx import numpy_helper

            raw = numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
        _copy_fields(t, out, data_fields)
        pad = -offset % _EXTERNAL_ALIGN
        if pad:
            _write_all(data_fd, b"\0" * pad)
            offset += pad
        _write_all(data_fd, raw)
        out.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = out.external_data.add()
            entry.key = key
            entry.value = value
        offset += len(raw)
        del raw
    return skeleton


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_model_atomic(model: ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` so that ``path`` is either untouched or holds the complete model.

    - The folder must exist and be writable; a symbolic link (or a folder, or anything but a regular
      file) at ``path`` is refused -- the link is never written through.
    - The model goes to a hidden temp file in the same folder (``.NAME.XXXX.tmp``), is fsynced, and
      then renamed over ``path`` (``os.replace``); an existing file is replaced only after the whole
      write succeeded, and keeps its permission bits.
    - ``model.ir_version`` is clamped first (:func:`clamp_ir_version`, in place).
    - A model whose serialized size would pass 2 GiB is written with external data: its initializers
      of 1 KiB or more go to the sibling ``NAME.data`` (location relative, 4 KiB aligned), written
      and renamed the same way, just before the model file.
    - SIGTERM (when called from the main thread and SIGTERM is not ignored), Ctrl-C or any error
      during the save removes the temp files; SIGTERM is then re-delivered to the previous handler
      (by default the process ends) and KeyboardInterrupt propagates.  Errors are OnnxlrpError.

    Returns the path written.
    """
    path = Path(path)
    shown = _show(path)
    _check_destination(path)
    data_path = path.with_name(path.name + ".data")
    clamp_ir_version(model)
    folder = path.parent
    pending: list[tuple[str, Path]] = []  # (temp file, final name), in rename order
    interrupted = False
    try:
        with _sigterm_as_exception():
            try:
                if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
                    _check_destination(data_path)
                    dfd, dtmp = tempfile.mkstemp(dir=folder, prefix=f".{data_path.name}.", suffix=".tmp")
                    pending.append((dtmp, data_path))
                    try:
                        to_write = _externalize(model, dfd, data_path.name)
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
                    payload = _serialize(to_write)
                    del to_write
                    if len(payload) > _PROTOBUF_MAX_BYTES:
                        raise OnnxlrpError(f"cannot write {shown}: the model is over 2 GiB even without its weights")
                else:
                    payload = _serialize(model)
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
                pending.append((tmp, path))
                try:
                    _write_all(fd, payload)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                del payload
                for tmp_name, final in pending:
                    try:
                        mode = stat.S_IMODE(os.stat(final).st_mode)
                    except FileNotFoundError:
                        mode = umask_mode()
                    os.chmod(tmp_name, mode)
                while pending:
                    tmp_name, final = pending[0]
                    _check_destination(final)
                    os.replace(tmp_name, final)
                    pending.pop(0)
                _fsync_dir(folder)
            finally:
                for tmp_name, _final in pending:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp_name)
    except _SaveInterrupted:
        interrupted = True
    except OnnxlrpError:
        raise
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OnnxlrpError(f"cannot write {shown}: no space left on the device") from None
        raise OnnxlrpError(f"cannot write {shown}: {_reason(err)}") from None
    except (ValueError, TypeError, AttributeError, RuntimeError) as err:  # serialization failures
        raise OnnxlrpError(f"cannot write {shown}: {_first_line(err)}") from None
    if interrupted:
        # The previous handler is back; hand SIGTERM to it (by default this ends the process).
        os.kill(os.getpid(), signal.SIGTERM)
        raise OnnxlrpError(f"saving {shown} was interrupted by SIGTERM")
    return path
