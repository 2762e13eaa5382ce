"""Parquet data sets: one ``.parquet`` file, or every ``.parquet`` file under a folder (recursive, sorted by relative
path), read row group by row group with pyarrow (an optional dependency).

The sample column holds either encoded images (``binary``, or a struct with a ``bytes`` field as Hugging Face
``datasets`` writes its Image feature), decoded like image files, or tensors (lists of numbers, flat or nested),
holding each sample's values in the model's input layout (``uint8`` divided by 255).  Without ``--column``, the
column is the one named ``image``, ``img``, ``pixels``, ``tensor``, ``x`` or ``input`` (in that order), else the
only binary, struct or list column.  Labels (evaluate) come from ``label`` or ``labels``, or ``--label-column``.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import first_line, show
from onnxlrp.naming import escape_terminal

from .sources import InputSpec, Loaded, Source, _digest, _walk

__all__ = ["PARQUET_SUFFIXES", "ParquetSource"]

PARQUET_SUFFIXES = (".parquet", ".pq")
SAMPLE_COLUMNS = ("image", "img", "pixels", "tensor", "x", "input")
LABEL_COLUMNS = ("label", "labels")


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise OnnxlrpError("reading Parquet needs pyarrow: pip install 'onnxlrp[parquet]'") from None
    return pq


def _column_kind(field_type) -> str | None:
    """"image" (encoded bytes), "tensor" (lists of numbers) or None for a column type that holds neither."""
    import pyarrow as pa

    t = field_type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "image"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "image"
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            return "tensor"
    return None


class ParquetSource(Source):
    """Samples of the rows of one or more Parquet files; see the module docstring."""

    kind = "parquet"

    def __init__(self, path: Path, spec: InputSpec, *, column: str | None = None, label_column: str | None = None,
                 labels: bool = False):
        pq = _pyarrow()
        self.path, self.spec, self.where = path, spec, show(path)
        self.listing_errors = []
        if path.is_dir():
            listed = [(rel, st) for rel, st in _walk(path, PARQUET_SUFFIXES, self.listing_errors)
                      if not rel.split("/")[-1].startswith("_")]
            files = [(path / rel, rel, st) for rel, st in listed]
        else:
            files = [(path, path.name, os.stat(path))]
        self.files: list[tuple[Path, str]] = []
        self.row_groups: list[list[int]] = []  # per file: the first row of each row group, then the file's rows
        lines, schema = [], None
        for file, rel, st in files:
            try:
                meta = pq.ParquetFile(file).metadata
                file_schema = meta.schema.to_arrow_schema()
            except Exception as err:  # noqa: BLE001 - any failure to read a footer is a corrupt file
                self.listing_errors.append((rel, f"{show(file)}: not a readable Parquet file ({first_line(err)})"))
                continue
            schema = schema or file_schema
            starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            self.files.append((file, rel))
            self.row_groups.append([int(s) for s in starts])
            lines.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{meta.num_rows}")
        if schema is None:
            first = self.listing_errors[0][1] if self.listing_errors else f"{self.where}: no Parquet files"
            raise OnnxlrpError(first)
        self.column, self.column_kind = self._sample_column(schema, column)
        self.label_column = self._label_column(schema, label_column) if labels or label_column else None
        self.has_labels = self.label_column is not None
        if labels and not self.has_labels:
            raise OnnxlrpError(f"{self.where}: no label column (name it 'label', or give --label-column)")
        if self.column_kind == "image" and spec.layout is None:
            raise OnnxlrpError(f"{self.where}: column {escape_terminal(self.column)!r} holds images, but the model "
                               f"does not take images (its input is [N, {', '.join(map(str, spec.dims))}])")
        rows = [g[-1] for g in self.row_groups]
        self.file_starts = [int(s) for s in np.cumsum([0] + rows)]
        self.count = self.file_starts[-1]
        self._lines = lines + [f"column\t{self.column}\t{self.label_column}"]
        self._cache: tuple[tuple[int, int], object] | None = None

    def _sample_column(self, schema, column: str | None) -> tuple[str, str]:
        names = schema.names
        if column is not None:
            if column not in names:
                raise OnnxlrpError(f"{self.where}: no column {escape_terminal(column)!r} (columns: "
                                   f"{', '.join(escape_terminal(n) for n in names)})")
            kind = _column_kind(schema.field(column).type)
            if kind is None:
                raise OnnxlrpError(f"{self.where}: column {escape_terminal(column)!r} ({schema.field(column).type}) "
                                   "holds neither encoded images (binary) nor tensors (lists of numbers)")
            return column, kind
        usable = [n for n in names if _column_kind(schema.field(n).type) is not None]
        named = [n for n in SAMPLE_COLUMNS for u in usable if u.lower() == n]
        chosen = named[0] if named else usable[0] if len(usable) == 1 else None
        if chosen is None:
            listed = ", ".join(escape_terminal(n) for n in usable) or "none"
            raise OnnxlrpError(f"{self.where}: which column holds the samples? give --column (image or tensor "
                               f"columns: {listed})")
        chosen = next(u for u in usable if u.lower() == chosen.lower())
        return chosen, _column_kind(schema.field(chosen).type)

    def _label_column(self, schema, label_column: str | None) -> str | None:
        import pyarrow as pa

        name = label_column or next((n for n in schema.names if n.lower() in LABEL_COLUMNS), None)
        if name is None:
            return None
        if name not in schema.names:
            raise OnnxlrpError(f"{self.where}: no label column {escape_terminal(name)!r}")
        if not pa.types.is_integer(schema.field(name).type):
            raise OnnxlrpError(f"{self.where}: label column {escape_terminal(name)!r} holds "
                               f"{schema.field(name).type}, not integers")
        return name

    def __getstate__(self):
        return self.__dict__ | {"_cache": None}

    def _locate(self, i: int) -> tuple[int, int]:
        f = int(np.searchsorted(self.file_starts, i, side="right")) - 1
        return f, i - self.file_starts[f]

    def name(self, i: int) -> str:
        f, row = self._locate(i)
        return f"{self.files[f][1]}[{row}]"

    def fingerprint(self) -> str:
        return _digest(self._lines)

    def _row_group(self, f: int, g: int):
        if self._cache is None or self._cache[0] != (f, g):
            import pyarrow.parquet as pq

            columns = [self.column] + ([self.label_column] if self.label_column else [])
            self._cache = ((f, g), pq.ParquetFile(self.files[f][0]).read_row_group(g, columns=columns))
        return self._cache[1]

    def _pieces(self, start: int, stop: int):
        """(file, row group, first row, last row + 1 within the group, first sample id) covering [start, stop)."""
        i = start
        while i < stop:
            f, row = self._locate(i)
            starts = self.row_groups[f]
            g = int(np.searchsorted(starts, row, side="right")) - 1
            end = min(starts[g + 1], row + stop - i)
            yield f, g, row - starts[g], end - starts[g], i
            i += end - row

    def read(self, start: int, stop: int, pool: Executor) -> Loaded:
        ids, parts, labels, errors = [], [], [], []
        for f, g, a, b, first in self._pieces(start, stop):
            try:
                table = self._row_group(f, g).slice(a, b - a)
                got, got_errors = self._samples(table.column(self.column), first, pool)
                got_labels = (table.column(self.label_column).to_numpy(zero_copy_only=False)
                              if self.label_column else None)
            except Exception as err:  # noqa: BLE001 - a row group that cannot be read: its rows are errors
                why = f"{show(self.files[f][0])}: cannot read row group {g} ({first_line(err)})"
                errors.extend((i, why) for i in range(first, first + b - a))
                continue
            errors.extend(got_errors)
            for j, sample in got:
                if got_labels is not None and got_labels[j - first] is None:
                    errors.append((j, f"{escape_terminal(self.name(j))}: no label"))
                    continue
                ids.append(j)
                parts.append(sample)
                if got_labels is not None:
                    labels.append(int(got_labels[j - first]))
        raw = np.stack(parts) if parts else np.zeros((0, *self.spec.raw_dims), np.float32)
        label_of = dict(zip(ids, labels, strict=True)) if self.has_labels else {}
        ids, raw = self._finite(ids, raw, errors)
        errors.sort()
        return Loaded(np.asarray(ids, np.int64), raw,
                      np.asarray([label_of[i] for i in ids], np.int64) if self.has_labels else None, errors,
                      self.spec.layout is not None)

    def _samples(self, column, first: int, pool: Executor):
        """[(id, raw sample)] and [(id, reason)] for one slice of the sample column."""
        if self.column_kind == "image":
            return self._images(column, first, pool)
        return self._tensors(column, first)

    def _images(self, column, first: int, pool: Executor):
        import pyarrow as pa

        from onnxlrp.images import decode_image

        values = column.combine_chunks()
        if pa.types.is_struct(values.type):
            values = values.field("bytes")
        cells = values.to_pylist()
        c, h, w = self.spec.raw_dims

        def decode(j: int):
            data = cells[j]
            shown = escape_terminal(self.name(first + j))
            if data is None:
                return f"{shown}: no image (null)"
            try:
                return decode_image(data, shown, channels=c, size=(h, w))
            except OnnxlrpError as err:
                return str(err)

        got, errors = [], []
        for j, out in enumerate(pool.map(decode, range(len(cells)))):
            (errors.append((first + j, out)) if isinstance(out, str) else got.append((first + j, out)))
        return got, errors

    def _tensors(self, column, first: int):
        import pyarrow as pa
        import pyarrow.compute as pc

        level = column.combine_chunks()
        n = len(level)
        row_of = np.arange(n)
        while pa.types.is_list(level.type) or pa.types.is_large_list(level.type) or \
                pa.types.is_fixed_size_list(level.type):
            parent = pc.list_parent_indices(level).to_numpy()
            row_of = row_of[parent]
            level = pc.list_flatten(level)
        dtype = np.uint8 if pa.types.is_uint8(level.type) else np.float32
        values = level.to_numpy(zero_copy_only=False).astype(np.float64)
        counts = np.bincount(row_of, minlength=n)
        ends = np.cumsum(counts)
        want = int(np.prod(self.spec.dims))
        got, errors = [], []
        for j in range(n):
            shown = escape_terminal(self.name(first + j))
            if counts[j] != want:
                errors.append((first + j, f"{shown}: holds {counts[j]} values, the model takes "
                                          f"{want} ([{', '.join(map(str, self.spec.dims))}])"))
                continue
            sample = values[ends[j] - want : ends[j]].reshape(1, *self.spec.dims).astype(dtype)
            sample = self._to_raw(sample)
            got.append((first + j, sample[0]))
        return got, errors

    def _to_raw(self, sample: np.ndarray) -> np.ndarray:
        """One tensor in the model's layout as a raw sample (images: [C, H, W]; uint8 divided by 255)."""
        x = sample.astype(np.float32) / np.float32(255.0) if sample.dtype == np.uint8 else sample.astype(np.float32)
        if self.spec.layout is not None and self.spec.layout.name == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x
