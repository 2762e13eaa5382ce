"""Tensor checks: every tensor's dims must match the data it holds, and the total it claims must stay bounded.

All of this is decided from the numbers in the protobuf alone, before anything is allocated from a tensor's dims: a
tensor claiming 2**62 elements with 4 bytes is refused here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import gib, node_label, prefix, quote
from onnxlrp.scopes import subgraphs

__all__ = ["DEFAULT_MAX_BYTES", "check_tensor_sizes", "expected_bytes", "is_external", "iter_tensors", "tensor_numel"]

#: Default limit on the total bytes of all tensors a model claims (and on the model file's size).
DEFAULT_MAX_BYTES = 16 * 2**30

# Bits per element of each tensor data type (None: variable size, i.e. STRING).
BITS: dict[int, int | None] = {}
for _name, _bits in {
    "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "STRING": None,
    "BOOL": 8, "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128,
    "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "UINT4": 4,
    "INT4": 4, "FLOAT4E2M1": 4, "FLOAT8E8M0": 8, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6,
}.items():  # fmt: skip
    if hasattr(TensorProto, _name):
        BITS[getattr(TensorProto, _name)] = _bits

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
TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def field_for(dtype: int) -> tuple[str, int]:
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
        bits = BITS[dtype] or 8
        return "int32_data", {4: 2, 2: 4}.get(bits, 1)
    return "", 1


def iter_tensors(model: ModelProto) -> Iterator[tuple[TensorProto, str]]:
    """Every tensor in the model with a description of where it is (no data is touched)."""

    def from_attrs(node: NodeProto, where: str) -> Iterator[tuple[TensorProto, str]]:
        for attr in node.attribute:
            label = f"{where}{node_label(node)} attribute {quote(attr.name)}"
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
                yield from from_graph(attr.g, f"{where}subgraph of {node_label(node)}: ")
            for g in attr.graphs:
                yield from from_graph(g, f"{where}subgraph of {node_label(node)}: ")

    def from_graph(graph: GraphProto, where: str) -> Iterator[tuple[TensorProto, str]]:
        for t in graph.initializer:
            yield t, f"{where}initializer {quote(t.name)}"
        for sp in graph.sparse_initializer:
            yield sp.values, f"{where}sparse initializer {quote(sp.values.name)} (values)"
            yield sp.indices, f"{where}sparse initializer {quote(sp.values.name)} (indices)"
        for node in graph.node:
            yield from from_attrs(node, where)

    yield from from_graph(model.graph, "")
    for func in model.functions:
        for node in func.node:
            yield from from_attrs(node, f"function {quote(func.name)}: ")
    for info in model.training_info:
        yield from from_graph(info.initialization, "training initialization: ")
        yield from from_graph(info.algorithm, "training algorithm: ")


def _iter_sparse(model: ModelProto) -> Iterator[tuple[onnx.SparseTensorProto, str]]:
    def from_graph(graph: GraphProto) -> Iterator[tuple[onnx.SparseTensorProto, str]]:
        for sp in graph.sparse_initializer:
            yield sp, f"sparse initializer {quote(sp.values.name)}"
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor, f"{node_label(node)} attribute {quote(attr.name)}"
                for sp in attr.sparse_tensors:
                    yield sp, f"{node_label(node)} attribute {quote(attr.name)}"
            for g in subgraphs(node):
                yield from from_graph(g)

    yield from from_graph(model.graph)


def is_external(t: TensorProto) -> bool:
    """True when the tensor's data lives in an external file."""
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def tensor_numel(t: TensorProto, label: str, where: str) -> int:
    """The product of the tensor's dims; a negative dim is an error."""
    n = 1
    for d in t.dims:
        if d < 0:
            raise OnnxlrpError(f"{where}{label} has a negative dimension ({d})")
        n *= d
    return n


def expected_bytes(t: TensorProto, n: int, label: str, where: str) -> int | None:
    """Bytes ``n`` elements of the tensor's data type take (None for STRING)."""
    if t.data_type not in BITS:
        raise OnnxlrpError(f"{where}{label} has an unknown data type ({t.data_type})")
    bits = BITS[t.data_type]
    if bits is None:
        return None
    return (n * bits + 7) // 8


def _check_one_tensor(t: TensorProto, label: str, where: str) -> int:
    """Check that a tensor's dims agree with the data present; return the bytes it claims."""
    n = tensor_numel(t, label, where)
    expected = expected_bytes(t, n, label, where)
    shape = "[" + ", ".join(str(d) for d in t.dims) + "]"
    present = [f for f in TYPED_FIELDS if len(getattr(t, f))]
    if is_external(t):
        if expected is None:
            raise OnnxlrpError(f"{where}{label}: STRING tensors cannot be stored as external data")
        return expected
    raw_len = len(t.raw_data) if t.HasField("raw_data") else 0
    if raw_len:
        present.append("raw_data")
    if len(present) > 1:
        raise OnnxlrpError(f"{where}{label} holds data in several fields ({', '.join(present)})")
    if not present:
        if n:
            raise OnnxlrpError(f"{where}{label} has shape {shape} ({n} elements) but holds no data")
        return 0
    if present[0] == "raw_data":
        if expected is None:
            raise OnnxlrpError(f"{where}{label}: STRING tensors cannot use raw_data")
        if raw_len != expected:
            raise OnnxlrpError(
                f"{where}{label} has shape {shape} ({n} elements, {expected} bytes) but holds {raw_len} bytes"
            )
        return expected
    field, per_entry = field_for(t.data_type)
    if present[0] != field:
        raise OnnxlrpError(f"{where}{label} stores its data type {t.data_type} in the wrong field ({present[0]})")
    count = len(getattr(t, field))
    complex_factor = 2 if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
    want = -(-n * complex_factor // per_entry)
    if count != want:
        raise OnnxlrpError(f"{where}{label} has shape {shape} ({n} elements) but holds {count} values in {field}")
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
    where = prefix(source)
    total = 0
    for t, label in iter_tensors(model):
        total += _check_one_tensor(t, label, where)
    for sp, label in _iter_sparse(model):
        dense = tensor_numel(sp, label, where) * (BITS.get(sp.values.data_type) or 8) // 8
        total += dense
    if total > max_bytes:
        raise OnnxlrpError(
            f"{where}tensors claim {gib(total)}, more than the limit of {gib(max_bytes)} (max_bytes={max_bytes})"
        )
    return total
