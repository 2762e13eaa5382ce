"""The sha256 a compiled model records as ``onnxlrp.source_sha256``, computed without one big serialization.

- A model read from a file: the sha256 of the file's bytes (the bytes that were parsed; external data files are
  not included).
- A model given in memory: the sha256 of its protobuf serialization, ``sha256(model.SerializeToString())``, which
  is also the sha256 of the file ``onnx.save`` writes for a model without external data.  protobuf cannot build
  that serialization past 2 GiB, so :func:`model_digest` produces the same bytes piece by piece: a message of at
  most :data:`WHOLE_MESSAGE_BYTES` is serialized whole; a bigger one is written field by field in field-number
  order, as protobuf writes it -- a field's tag, then for a sub-message its length (``ByteSize``) and its content
  (recursively), for a bytes or string field its length and the bytes as they are (a large ``raw_data`` goes to
  the hash without being copied into a serialization), for any other field the serialization of that field
  alone -- and the message's unknown fields last, as protobuf keeps them.
"""

from __future__ import annotations

import hashlib

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from onnxlrp.errors import OnnxlrpError

__all__ = ["WHOLE_MESSAGE_BYTES", "bytes_digest", "model_digest"]

#: Messages up to this size are serialized in one piece; bigger ones are streamed field by field.
WHOLE_MESSAGE_BYTES = 64 * 2**20

_LENGTH_DELIMITED = 2
_START_GROUP, _END_GROUP = 3, 4


def bytes_digest(data: bytes) -> str:
    """The sha256 (hex) of ``data``."""
    return hashlib.sha256(data).hexdigest()


def model_digest(model: Message) -> str:
    """``hashlib.sha256(model.SerializeToString()).hexdigest()``, for models of any size (see the module)."""
    h = hashlib.sha256()
    _feed(model, h)
    return h.hexdigest()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _feed(msg: Message, h) -> None:  # noqa: ANN001 - a hashlib object
    if msg.ByteSize() <= WHOLE_MESSAGE_BYTES:
        h.update(msg.SerializeToString())
        return
    for fd, value in sorted(msg.ListFields(), key=lambda item: item[0].number):
        values = value if fd.is_repeated else (value,)
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for item in values:
                h.update(_tag(fd.number, _LENGTH_DELIMITED) + _varint(item.ByteSize()))
                _feed(item, h)
        elif fd.type in (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING):
            for item in values:
                data = item.encode("utf-8") if isinstance(item, str) else item
                h.update(_tag(fd.number, _LENGTH_DELIMITED) + _varint(len(data)))
                h.update(data)
        else:
            h.update(_scalar_field(msg, fd, value))
    h.update(_unknown_fields(UnknownFieldSet(msg)))


def _scalar_field(msg: Message, fd: FieldDescriptor, value) -> bytes:  # noqa: ANN001 - a scalar or a container
    """The serialization of one scalar (or repeated scalar) field of ``msg`` on its own."""
    alone = type(msg)()
    if fd.is_repeated:
        getattr(alone, fd.name).extend(value)
    else:
        setattr(alone, fd.name, value)
    try:
        return alone.SerializeToString()
    except Exception as err:  # noqa: BLE001 - protobuf's limit on one message
        raise OnnxlrpError(f"model: field {fd.full_name} is too large to hash ({type(err).__name__}); "
                           "store large tensors in raw_data") from None


def _unknown_fields(fields: UnknownFieldSet) -> bytes:
    """Unknown fields encoded as protobuf keeps them (in the order they were parsed)."""
    out = bytearray()
    for field in fields:
        number, wire_type, data = field.field_number, field.wire_type, field.data
        out += _tag(number, wire_type)
        if wire_type == 0:
            out += _varint(data)
        elif wire_type == 1:
            out += data.to_bytes(8, "little")
        elif wire_type == 5:
            out += data.to_bytes(4, "little")
        elif wire_type == _LENGTH_DELIMITED:
            out += _varint(len(data)) + data
        elif wire_type == _START_GROUP:
            out += _unknown_fields(data) + _tag(number, _END_GROUP)
    return bytes(out)
