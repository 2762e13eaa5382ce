"""The sha256 a compiled model records as ``onnxlrp.source_sha256``.

- A model read from a file: the sha256 of the file's bytes (the bytes that were parsed; external data files are
  not included).
- A model given in memory: the sha256 of its protobuf serialization, ``sha256(model.SerializeToString())``, which
  is also the sha256 of the file ``onnx.save`` writes for a model without external data.  protobuf cannot build
  that serialization past 2 GiB, so the hash is fed the same bytes piece by piece
  (:func:`onnxlrp.io.wire.serialized_pieces`): large tensors' ``raw_data`` on their own, the rest field by field.
"""

from __future__ import annotations

import hashlib

from google.protobuf.message import Message

from .wire import serialized_pieces

__all__ = ["bytes_digest", "model_digest"]


def bytes_digest(data: bytes) -> str:
    """The sha256 (hex) of ``data``."""
    return hashlib.sha256(data).hexdigest()


def model_digest(model: Message) -> str:
    """``hashlib.sha256(model.SerializeToString()).hexdigest()``, for models of any size."""
    h = hashlib.sha256()
    for piece in serialized_pieces(model):
        h.update(piece)
    return h.hexdigest()
