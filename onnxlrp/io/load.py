"""The one load path: :func:`read_model` gives a model file and a ``ModelProto`` handed over in memory the same
checks, in the same order, with the same one-line errors (``FILE: ...`` or ``model: ...``)."""

from __future__ import annotations

import os
from pathlib import Path

from onnx import ModelProto

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import show

from .bombs import check_resource_bombs
from .checker import native_check
from .digest import bytes_digest, model_digest
from .external import load_external_data, refuse_external_data
from .parse import check_basic, check_versions, parse_model, read_model_file
from .structure import check_structure
from .tensors import DEFAULT_MAX_BYTES, check_tensor_sizes

__all__ = ["IN_MEMORY", "load_model", "read_model"]

#: How a model given in memory is named in messages (a file is named by its path).
IN_MEMORY = "model"


def read_model(model_or_path, *, isolate: bool = False, max_bytes: int = DEFAULT_MAX_BYTES,
               check: bool = True) -> tuple[ModelProto, str]:
    """A checked model and the sha256 (hex) of its source, from a file path or a ``ModelProto``.

    Both go through the same checks, in this order (an OnnxlrpError of one line at the first that fails):

    1. a file is read (a regular file of at most ``max_bytes``, under 2 GiB) and parsed; anything that does not
       parse is "not an ONNX model".  A ``ModelProto`` starts at step 2;
    2. ``ir_version``, a graph and nodes must be present, text must be valid UTF-8 (:func:`~.parse.check_basic`);
       IR and opset versions must be known to the installed onnx (:func:`~.parse.check_versions`);
    3. every tensor's dims must match its data and all together claim at most ``max_bytes``
       (:func:`~.tensors.check_tensor_sizes`);
    4. external data: a file's references are validated and read into ``raw_data``
       (:func:`~.external.load_external_data`); a ``ModelProto`` that refers to external files is refused
       (:func:`~.external.refuse_external_data`): no file is read on behalf of a model given in memory;
    5. resource bombs are refused (:func:`~.bombs.check_resource_bombs`), the structure is checked and the nodes are
       sorted topologically (:func:`~.structure.check_structure`);
    6. unless ``check=False``, onnx's checker and shape inference run on a light copy, in a child process when
       ``isolate`` (:func:`~.checker.native_check`); the inferred ``value_info`` is copied into the model.

    A ``ModelProto`` given in memory is not modified: steps 5 and 6 work on a copy, which is returned.  Messages
    name a file by its path and a model given in memory as ``model``.

    The digest (:mod:`~onnxlrp.io.digest`) is the sha256 of the file's bytes, or of the ``ModelProto``'s
    serialization (computed piece by piece, so models past protobuf's 2 GiB limit are hashed too).
    """
    if isinstance(model_or_path, ModelProto):
        return _check_in_memory(model_or_path, isolate=isolate, max_bytes=max_bytes, check=check)
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise OnnxlrpError(f"expected an onnx.ModelProto or the path of an ONNX file, "
                           f"got {type(model_or_path).__name__}")
    return _load_file(Path(model_or_path), isolate=isolate, max_bytes=max_bytes, check=check)


def load_model(path: str | os.PathLike[str], *, isolate: bool = False, max_bytes: int = DEFAULT_MAX_BYTES,
               check: bool = True) -> ModelProto:
    """Load an ONNX file that may be hostile: :func:`read_model` without the digest.

    ``isolate=True`` runs onnx's checker and shape inference in a child process (``sys.executable``)
    so that a crash inside onnx's native code becomes ``OnnxlrpError("onnx crashed while checking
    FILE (signal 11, SIGSEGV)")``.  It costs one interpreter start plus ``import onnx``: about 0.45 s
    on a small model (2 CPU cores); the weights are not sent to the child.  ``max_bytes`` bounds both
    the file and the total bytes all tensors claim.  ``check=False`` skips onnx's checker and shape
    inference (every other check still runs).

    The returned model has all external data read into ``raw_data``, its nodes topologically
    sorted, and the ``value_info`` shape inference found.  Unknown operator domains are not refused
    (see :func:`~.structure.check_domains`).
    """
    return _load_file(Path(path), isolate=isolate, max_bytes=max_bytes, check=check)[0]


def _load_file(path: Path, *, isolate: bool, max_bytes: int, check: bool) -> tuple[ModelProto, str]:
    shown = show(path)
    data = read_model_file(path, max_bytes)
    digest = bytes_digest(data)
    model = parse_model(data, shown)
    del data
    check_versions(model, shown)
    check_tensor_sizes(model, max_bytes, source=path)
    load_external_data(model, Path(os.path.abspath(path.parent)), f"{shown}: ")
    check_resource_bombs(model, source=path)
    check_structure(model, source=path)
    if check:
        native_check(model, shown, isolate)
    return model, digest


def _check_in_memory(model: ModelProto, *, isolate: bool, max_bytes: int, check: bool) -> tuple[ModelProto, str]:
    check_basic(model, IN_MEMORY)
    check_versions(model, IN_MEMORY)
    check_tensor_sizes(model, max_bytes)
    refuse_external_data(model, f"{IN_MEMORY}: ")
    check_resource_bombs(model)
    digest = model_digest(model)
    checked = ModelProto()
    checked.CopyFrom(model)  # not through SerializeToString: that fails past 2 GiB
    check_structure(checked)
    if check:
        native_check(checked, IN_MEMORY, isolate)
    return checked, digest
