"""The protobuf serialization of an ONNX model, measured and produced piece by piece.

protobuf (upb) serializes a message to measure it -- ``ByteSize()`` builds the whole serialization -- and refuses
both past 2 GiB.  :func:`serialized_size` and :func:`serialized_pieces` give the same numbers and the same bytes
without ever building a serialization of a message that may hold bulk data:

- a message that cannot hold tensor data (a ``ValueInfoProto``, ``TypeProto``, ``OperatorSetIdProto``, a node
  without tensor or graph attributes, ...) is serialized whole (it is small);
- any other (:func:`streamed`) is written field by field in field-number order, as protobuf writes it: a field's
  tag, then for a sub-message its size and its pieces (recursively), for a bytes or string field its length and
  the bytes as they are -- a large ``raw_data`` is handed over on its own, read from the message only when its
  turn comes -- for any other field the serialization of that field alone; and the message's unknown fields last,
  as protobuf keeps them.

A bytes field is read twice (once for its length, once for its content), one at a time, so the memory used is at
most one copy of the largest tensor on top of the model.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from onnxlrp.errors import OnnxlrpError

__all__ = ["serialized_pieces", "serialized_size", "streamed"]

_LENGTH_DELIMITED = 2
_START_GROUP, _END_GROUP = 3, 4
#: Message types that may hold tensor data (directly or in a subgraph): always written field by field.
_BULK_TYPES = frozenset(f"onnx.{name}" for name in (
    "ModelProto", "GraphProto", "FunctionProto", "TrainingInfoProto", "TensorProto", "SparseTensorProto"))
_NODE, _ATTRIBUTE = "onnx.NodeProto", "onnx.AttributeProto"

# A piece of the serialization: bytes, or (message, field name, index or None) for a bytes field read when hashed.
Piece = bytes | tuple[Message, str, int | None]


def _attribute_holds_data(attr: Message) -> bool:
    return (attr.HasField("t") or attr.HasField("g") or attr.HasField("sparse_tensor") or len(attr.tensors) > 0
            or len(attr.graphs) > 0 or len(attr.sparse_tensors) > 0)


def streamed(msg: Message) -> bool:
    """Whether ``msg`` is written field by field (it may hold tensor data) rather than serialized whole."""
    name = msg.DESCRIPTOR.full_name
    if name == _NODE:
        return any(_attribute_holds_data(a) for a in msg.attribute)
    if name == _ATTRIBUTE:
        return _attribute_holds_data(msg)
    return name in _BULK_TYPES


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


def _field_alone(msg: Message, fd: FieldDescriptor) -> bytes:
    """The serialization of one scalar (or repeated scalar) field of ``msg`` on its own."""
    alone = type(msg)()
    if fd.is_repeated:
        getattr(alone, fd.name).extend(getattr(msg, fd.name))
    else:
        setattr(alone, fd.name, getattr(msg, fd.name))
    try:
        return alone.SerializeToString()
    except Exception as err:  # noqa: BLE001 - protobuf's limit on one message
        raise OnnxlrpError(f"model: field {fd.full_name} holds more than protobuf can write "
                           f"({type(err).__name__}); store large tensors in raw_data") from None


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


def _present(msg: Message, fd: FieldDescriptor) -> bool:
    return len(getattr(msg, fd.name)) > 0 if fd.is_repeated else msg.HasField(fd.name)


def _walk(msg: Message, pieces: list[Piece] | None) -> int:
    """The serialized size of ``msg``; its pieces are appended to ``pieces`` (unless None)."""
    if not streamed(msg):
        data = msg.SerializeToString()
        if pieces is not None:
            pieces.append(data)
        return len(data)
    total = 0
    for fd in sorted(msg.DESCRIPTOR.fields, key=lambda f: f.number):
        if not _present(msg, fd):
            continue
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for item in getattr(msg, fd.name) if fd.is_repeated else (getattr(msg, fd.name),):
                sub: list[Piece] | None = [] if pieces is not None else None
                size = _walk(item, sub)
                head = _tag(fd.number, _LENGTH_DELIMITED) + _varint(size)
                if pieces is not None:
                    pieces.append(head)
                    pieces.extend(sub)
                total += len(head) + size
        elif fd.type in (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING):
            count = len(getattr(msg, fd.name)) if fd.is_repeated else 1
            for index in range(count) if fd.is_repeated else (None,):
                value = getattr(msg, fd.name) if index is None else getattr(msg, fd.name)[index]
                data = value.encode("utf-8") if isinstance(value, str) else value
                head = _tag(fd.number, _LENGTH_DELIMITED) + _varint(len(data))
                if pieces is not None:
                    pieces.append(head)
                    pieces.append(data if isinstance(value, str) else (msg, fd.name, index))
                total += len(head) + len(data)
                del value, data
        else:
            data = _field_alone(msg, fd)
            if pieces is not None:
                pieces.append(data)
            total += len(data)
    unknown = _unknown_fields(UnknownFieldSet(msg))
    if pieces is not None:
        pieces.append(unknown)
    return total + len(unknown)


def serialized_size(msg: Message) -> int:
    """``len(msg.SerializeToString())``, also past 2 GiB, without building that serialization."""
    return _walk(msg, None)


def serialized_pieces(msg: Message) -> Iterator[bytes]:
    """Pieces whose concatenation is ``msg.SerializeToString()``, also past 2 GiB; large bytes fields come one at a
    time, read from the message when their turn comes."""
    pieces: list[Piece] = []
    _walk(msg, pieces)
    for piece in pieces:
        if isinstance(piece, bytes):
            yield piece
        else:
            owner, name, index = piece
            yield getattr(owner, name) if index is None else getattr(owner, name)[index]
