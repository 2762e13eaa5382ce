"""Saving a model atomically, with its weights in a ``.data`` file when the model is too big for one protobuf."""

from __future__ import annotations

import os
from pathlib import Path

from onnx import ModelProto, TensorProto, numpy_helper

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import first_line, quote, show

from .atomic import write_all, write_files_atomic
from .checker import copy_fields
from .parse import PROTOBUF_MAX_BYTES
from .tensors import TYPED_FIELDS, is_external
from .wire import serialized_size

__all__ = ["EXTERNAL_DATA_THRESHOLD", "ORT_MAX_IR_VERSION", "clamp_ir_version", "save_model_atomic"]

#: Highest IR version the supported onnxruntime releases load; :func:`clamp_ir_version` writes at most this.
ORT_MAX_IR_VERSION = 10
#: Serialized size above which :func:`save_model_atomic` moves initializers to a ``.data`` file.
#: protobuf cannot write messages of 2 GiB or more; keep a margin for the rest of the model.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
#: Initializers at least this large go to the ``.data`` file when external data is used.
_EXTERNAL_MIN_TENSOR_BYTES = 1024
_EXTERNAL_ALIGN = 4096


def clamp_ir_version(model: ModelProto, max_ir: int = ORT_MAX_IR_VERSION) -> ModelProto:
    """Lower ``model.ir_version`` to at most ``max_ir`` (in place) and return the model.

    onnx 1.23 stamps new models with IR version 11+, which onnxruntime 1.2x refuses to load.
    """
    if model.ir_version > max_ir:
        model.ir_version = max_ir
    return model


def _serialize(model: ModelProto) -> bytes:
    return model.SerializeToString()


def _externalize(model: ModelProto, data_fd: int, location: str) -> ModelProto:
    """A copy of ``model`` whose big initializers live in the file ``data_fd`` (written here)."""
    skeleton = ModelProto()
    copy_fields(model, skeleton, {"graph"})
    copy_fields(model.graph, skeleton.graph, {"initializer"})
    offset = 0
    data_fields = {"raw_data", "external_data", "data_location", *TYPED_FIELDS}
    for t in model.graph.initializer:
        out = skeleton.graph.initializer.add()
        if is_external(t):
            raise OnnxlrpError(f"cannot save: initializer {quote(t.name)} still refers to external data")
        if serialized_size(t) < _EXTERNAL_MIN_TENSOR_BYTES or t.data_type == TensorProto.STRING:
            out.CopyFrom(t)
            continue
        raw = t.raw_data if t.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
        copy_fields(t, out, data_fields)
        pad = -offset % _EXTERNAL_ALIGN
        if pad:
            write_all(data_fd, b"\0" * pad)
            offset += pad
        write_all(data_fd, raw)
        out.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = out.external_data.add()
            entry.key = key
            entry.value = value
        offset += len(raw)
        del raw
    return skeleton


def _write_file(tmp: Path, payload: bytes) -> None:
    fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        write_all(fd, payload)
    finally:
        os.close(fd)


def save_model_atomic(model: ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` so that ``path`` is either untouched or holds the complete model.

    The files go through :func:`~onnxlrp.io.atomic.write_files_atomic` (destination checks, hidden temp files,
    fsync, rename; nothing partial on an error, Ctrl-C or SIGTERM).  Besides:

    - ``model.ir_version`` is clamped first (:func:`clamp_ir_version`, in place).
    - A model whose serialized size would pass 2 GiB is written with external data: its initializers of 1 KiB or
      more go to the sibling ``NAME.data`` (location relative, 4 KiB aligned), renamed just before the model file.
    - A model that cannot be serialized is a one-line OnnxlrpError.

    Returns the path written.
    """
    path = Path(path)
    shown = show(path)
    clamp_ir_version(model)

    def serialize(to_write: ModelProto) -> bytes:
        try:
            return _serialize(to_write)
        except (ValueError, TypeError, AttributeError, RuntimeError) as err:  # serialization failures
            raise OnnxlrpError(f"cannot write {shown}: {first_line(err)}") from None

    if serialized_size(model) <= EXTERNAL_DATA_THRESHOLD:
        return write_files_atomic([(path, lambda tmp: _write_file(tmp, serialize(model)))])[-1]

    data_path = path.with_name(path.name + ".data")
    skeleton: list[ModelProto] = []

    def write_data(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            skeleton.append(_externalize(model, fd, data_path.name))
        finally:
            os.close(fd)

    def write_model(tmp: Path) -> None:
        payload = serialize(skeleton.pop())
        if len(payload) > PROTOBUF_MAX_BYTES:
            raise OnnxlrpError(f"cannot write {shown}: the model is over 2 GiB even without its weights")
        _write_file(tmp, payload)

    return write_files_atomic([(data_path, write_data), (path, write_model)])[-1]
