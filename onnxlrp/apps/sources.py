"""The data sets ``onnxlrp explain`` and ``onnxlrp evaluate`` stream: an image folder (recursive), a ``.npy`` or
``.npz`` array file, or a Parquet file or folder of Parquet files (:mod:`.parquet`).

A source lists its samples once, in a fixed order, so that sample ``i`` is the same input on every run (resume and
the Ray engine rely on it), and reads any range ``[start, stop)`` on demand, so that a data set never has to fit in
memory.  What one sample cannot give (an unreadable or corrupt image, a tensor of the wrong size, NaN) comes back as
an error with its reason, and the run goes on without it; only a problem with the data set as a whole (no such
folder, an array of the wrong shape) is an :class:`~onnxlrp.errors.OnnxlrpError`.

Samples come out *raw*: images as ``[C, H, W]`` in [0, 1] (decoded files; ``uint8`` arrays divided by 255), other
inputs in the model's own sample shape; :class:`InputSpec` then makes the model's input (preprocessing, layout).
"""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io.load import IN_MEMORY
from onnxlrp.io.parse import stat_path
from onnxlrp.messages import first_line, quote, reason, show
from onnxlrp.naming import escape_terminal

from .files import PATH_TYPES
from .layout import ImageLayout, image_layout
from .models import input_shape
from .preprocess import Preprocess, make_preprocess

__all__ = ["ARRAY_SUFFIXES", "ArraySource", "ImageFolderSource", "InputSpec", "Loaded", "Source", "model_input_spec",
           "open_source"]

ARRAY_SUFFIXES = (".npy", ".npz")
#: Arrays a .npz may hold the samples in, in order of preference (else its only array).
SAMPLE_ARRAYS = ("images", "x", "inputs", "data")


@dataclass(frozen=True)
class InputSpec:
    """The model's data input: its sample dims (in its own layout), the image layout (None for an input that is not
    an image batch) and the preprocessing that maps raw samples to it."""

    dims: tuple[int, ...]
    layout: ImageLayout | None
    preprocess: Preprocess

    @property
    def raw_dims(self) -> tuple[int, ...]:
        """One raw sample's dims: ``[C, H, W]`` for images, else the model's sample dims."""
        if self.layout is None:
            return self.dims
        return self.layout.channels, self.layout.height, self.layout.width

    def to_model(self, raw: np.ndarray) -> np.ndarray:
        """A batch of raw samples as the model's input (preprocessed, in its layout), float32."""
        x = self.preprocess(raw) if len(raw) else raw.astype(np.float32)
        return self.layout.to_model(x) if self.layout is not None else np.ascontiguousarray(x, dtype=np.float32)

    def raw_from_array(self, batch: np.ndarray, where: str) -> np.ndarray:
        """Samples of an array file ``[n, ...]`` as raw samples ``[n, *raw_dims]`` (float32; uint8 divided by 255):
        images may come as ``[C, H, W]``, ``[H, W, C]`` or ``[H, W]`` (one channel); other inputs in the model's
        sample shape.  A shape that fits none is a one-line error naming ``where``."""
        if batch.dtype == np.uint8:
            x = batch.astype(np.float32) / np.float32(255.0)
        elif np.issubdtype(batch.dtype, np.floating) or np.issubdtype(batch.dtype, np.integer):
            x = batch.astype(np.float32)
        else:
            raise OnnxlrpError(f"{where}: samples have dtype {batch.dtype}; expected uint8, integers or floats")
        sample = tuple(x.shape[1:])
        raw = self.raw_dims
        if sample == raw:
            return x
        if self.layout is not None:
            c, h, w = raw
            if sample == (h, w, c):
                return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
            if c == 1 and sample == (h, w):
                return x[:, None]
        shapes = ([f"[{', '.join(map(str, raw))}]", f"[{raw[1]}, {raw[2]}, {raw[0]}]"] if self.layout is not None
                  else [f"[{', '.join(map(str, raw))}]"])
        raise OnnxlrpError(f"{where}: samples have shape [{', '.join(map(str, sample))}]; the model takes "
                           f"{' or '.join(shapes)}")


@dataclass
class Loaded:
    """What a read of samples ``[start, stop)`` gave: the ids and raw samples that could be read (in order), their
    labels (None when the source has none) and ``(id, reason)`` for the others."""

    ids: np.ndarray  # int64 [n]
    raw: np.ndarray  # float32 [n, *raw_dims]
    labels: np.ndarray | None = None  # int64 [n]
    errors: list[tuple[int, str]] = field(default_factory=list)
    images: bool = True  # raw samples are images in [0, 1] (a heatmap can be drawn over them)


class Source:
    """The interface of every data source; see the module docstring."""

    kind: str = ""
    where: str = ""  # the data set as printed
    count: int = 0
    has_labels: bool = False
    listing_errors: list[tuple[str, str]]  # (what, reason) for inputs that could not even be listed

    def name(self, i: int) -> str:
        """Sample ``i`` as the index names it (a relative path, ``FILE[row]``)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A sha256 of what was listed (names, sizes, modification times), so resume can tell the same data."""
        raise NotImplementedError

    def read(self, start: int, stop: int, pool: Executor) -> Loaded:
        raise NotImplementedError

    def _finite(self, ids: list[int], raw: np.ndarray, errors: list) -> tuple[list[int], np.ndarray]:
        """Drop samples with NaN or infinite values (listed in ``errors``)."""
        bad = ~np.isfinite(raw.reshape(len(raw), -1)).all(axis=1) if len(raw) else np.zeros(0, bool)
        for j in np.flatnonzero(bad):
            errors.append((ids[j], f"{escape_terminal(self.name(ids[j]))}: contains NaN or infinite values"))
        return [i for i, b in zip(ids, bad, strict=True) if not b], raw[~bad]


def _digest(lines: Sequence[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def _walk(folder: Path, suffixes, errors: list[tuple[str, str]]) -> list[tuple[str, os.stat_result]]:
    """Files under ``folder`` (recursive, symbolic links to folders not followed, hidden entries skipped) whose
    suffix is in ``suffixes``, as (relative POSIX path, stat), sorted by path; unreadable folders go to ``errors``."""
    found = []
    stack = [(folder, "")]
    while stack:
        path, rel = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as err:
            errors.append((rel or ".", f"{show(path)}: cannot list the folder ({reason(err)})"))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            sub = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append((Path(e.path), sub))
                elif Path(e.name).suffix.lower() in suffixes and e.is_file():
                    found.append((sub, e.stat()))
            except OSError as err:
                errors.append((sub, f"{show(e.path)}: cannot read ({reason(err)})"))
    found.sort(key=lambda item: item[0].split("/"))
    return found


class ImageFolderSource(Source):
    """Every image file under a folder (recursive, sorted by relative path).  With ``labels``, each image's label
    is the class index its first sub-folder is named by (``0/``, ``1/``, ...), as evaluate expects."""

    kind = "images"

    def __init__(self, folder: Path, spec: InputSpec, *, labels: bool = False):
        from onnxlrp.images import IMAGE_EXTENSIONS

        self.folder, self.spec, self.where = folder, spec, show(folder)
        if spec.layout is None:
            raise OnnxlrpError(f"{self.where}: an image folder needs a model that takes images [N, 1|3, H, W] or "
                               f"[N, H, W, 1|3], not [N, {', '.join(map(str, spec.dims))}]")
        self.listing_errors = []
        if labels:
            self._check_class_folders()
        listed = _walk(folder, IMAGE_EXTENSIONS, self.listing_errors)
        if not listed and not self.listing_errors:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise OnnxlrpError(f"{self.where}: folder holds no image files ({exts})")
        self.files = [rel for rel, _ in listed]
        self._stats = [f"{rel}\t{st.st_size}\t{st.st_mtime_ns}" for rel, st in listed]
        self.count = len(self.files)
        self.has_labels = labels
        self.labels = self._labels() if labels else None

    def _check_class_folders(self) -> None:
        try:
            folders = sorted(e.name for e in os.scandir(self.folder) if e.is_dir() and not e.name.startswith("."))
        except OSError as err:
            raise OnnxlrpError(f"{self.where}: cannot list the data folder ({reason(err)})") from None
        if not folders:
            raise OnnxlrpError(f"{self.where}: no class sub-folders (expected one folder per class index: 0/, 1/, ...)")
        for name in folders:
            if not name.isdigit():
                raise OnnxlrpError(f"{self.where}: sub-folder {escape_terminal(name)!r} is not a class index "
                                   "(0, 1, 2, ...)")

    def _labels(self) -> np.ndarray:
        labels = []
        for rel in self.files:
            top = rel.split("/")[0]
            if "/" not in rel:
                raise OnnxlrpError(f"{self.where}: {escape_terminal(rel)!r} is not in a class sub-folder (expected "
                                   "one folder per class index: 0/, 1/, ...)")
            if not top.isdigit():
                raise OnnxlrpError(f"{self.where}: sub-folder {escape_terminal(top)!r} is not a class index "
                                   "(0, 1, 2, ...)")
            labels.append(int(top))
        return np.asarray(labels, dtype=np.int64)

    def name(self, i: int) -> str:
        return self.files[i]

    def fingerprint(self) -> str:
        return _digest(self._stats)

    def read(self, start: int, stop: int, pool: Executor) -> Loaded:
        from onnxlrp.images import load_image

        c, h, w = self.spec.raw_dims

        def decode(i: int):
            try:
                return load_image(self.folder / self.files[i], channels=c, size=(h, w))
            except OnnxlrpError as err:
                return str(err)

        ids, arrays, errors = [], [], []
        for i, got in zip(range(start, stop), pool.map(decode, range(start, stop)), strict=True):
            if isinstance(got, str):
                errors.append((i, got))
            else:
                ids.append(i)
                arrays.append(got)
        raw = np.stack(arrays) if arrays else np.zeros((0, c, h, w), np.float32)
        labels = self.labels[ids] if self.labels is not None else None
        return Loaded(np.asarray(ids, np.int64), raw, labels, errors)


class NpyReader:
    """Rows of one ``.npy`` array (a file, memory-mapped, or a ``.npz`` member, read by seeking), without loading
    the whole array."""

    def __init__(self, path: Path, member: str | None, where: str):
        self.path, self.member, self.where = path, member, where
        with self._open() as f:
            version = np.lib.format.read_magic(f)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in reader:
                raise OnnxlrpError(f"{where}: unsupported .npy format version {version}")
            self.shape, fortran, self.dtype = reader[version](f)
            self.offset = f.tell()
        if fortran and len(self.shape) > 1:
            raise OnnxlrpError(f"{where}: a Fortran-ordered array (save it C-ordered: np.ascontiguousarray)")
        if self.dtype.hasobject:
            raise OnnxlrpError(f"{where}: holds Python objects (pickles are never loaded)")
        if len(self.shape) < 1:
            raise OnnxlrpError(f"{where}: a scalar, not an array of samples")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._file = None

    def _open(self):
        if self.member is None:
            return open(self.path, "rb")
        archive = zipfile.ZipFile(self.path)
        return archive.open(self.member)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_file"} | {"_file": None}

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self._file is None:
            self._file = self._open()
        self._file.seek(self.offset + start * self.row_bytes)
        data = self._file.read((stop - start) * self.row_bytes)
        if len(data) != (stop - start) * self.row_bytes:
            raise OnnxlrpError(f"{self.where}: the file is truncated (rows {start}..{stop - 1} are missing)")
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))


class ArraySource(Source):
    """Samples of a ``.npy`` file, or of a ``.npz`` file's ``images`` array (or ``x``, ``inputs``, ``data``, or its
    only array) with its ``labels`` when it has them; ``uint8`` is divided by 255."""

    kind = "array"

    def __init__(self, path: Path, spec: InputSpec, *, labels: bool = False):
        self.path, self.spec, self.where = path, spec, show(path)
        self.listing_errors = []
        try:
            st = os.stat(path)
            if path.suffix.lower() == ".npz":
                self.member, label_member = self._members(path)
            else:
                self.member, label_member = None, None
            shown = f"{self.where}" + (f" ({escape_terminal(self.member[:-4])})" if self.member else "")
            self.reader = NpyReader(path, self.member, shown)
            self.label_values = self._read_labels(path, label_member) if labels and label_member else None
        except OnnxlrpError:
            raise
        except FileNotFoundError:
            raise OnnxlrpError(f"{self.where}: no such file") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise OnnxlrpError(f"{self.where}: not a readable {path.suffix} array file ({first_line(err)})") from None
        if labels and self.label_values is None:
            raise OnnxlrpError(f"{self.where}: no array 'labels' (evaluate needs a .npz with images and labels)")
        self.count = int(self.reader.shape[0])
        self.has_labels = self.label_values is not None
        if self.has_labels and len(self.label_values) != self.count:
            raise OnnxlrpError(f"{self.where}: {self.count} samples but {len(self.label_values)} labels")
        probe = np.zeros((0, *self.reader.shape[1:]), self.reader.dtype)
        spec.raw_from_array(probe, self.where)  # the shape fits the model, or a one-line error now
        self._stat = f"{path.name}\t{st.st_size}\t{st.st_mtime_ns}\t{self.member}\t{self.reader.shape}"

    def _members(self, path: Path) -> tuple[str, str | None]:
        if not zipfile.is_zipfile(path):
            raise OnnxlrpError(f"{self.where}: not a .npz file (a zip archive of .npy arrays)")
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".npy")]
        arrays = [n[:-4] for n in names]
        chosen = next((a for a in SAMPLE_ARRAYS if a in arrays), None)
        others = [a for a in arrays if a != "labels"]
        if chosen is None and len(others) == 1:
            chosen = others[0]
        if chosen is None:
            raise OnnxlrpError(f"{self.where}: which array holds the samples? name it 'images' (arrays: "
                               f"{', '.join(escape_terminal(a) for a in arrays) or 'none'})")
        return f"{chosen}.npy", ("labels.npy" if "labels" in arrays else None)

    def _read_labels(self, path: Path, member: str) -> np.ndarray:
        with np.load(path, allow_pickle=False) as data:
            labels = np.asarray(data[member[:-4]])
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
            raise OnnxlrpError(f"{self.where}: labels must be integers [N], got {labels.dtype} {list(labels.shape)}")
        return labels.astype(np.int64)

    def name(self, i: int) -> str:
        return f"{self.path.name}{':' + self.member[:-4] if self.member else ''}[{i}]"

    def fingerprint(self) -> str:
        return _digest([self._stat])

    def read(self, start: int, stop: int, pool: Executor) -> Loaded:
        errors: list[tuple[int, str]] = []
        try:
            raw = self.spec.raw_from_array(self.reader.rows(start, stop), self.where)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, OnnxlrpError) as err:
            why = str(err) if isinstance(err, OnnxlrpError) else f"{self.where}: cannot read ({first_line(err)})"
            return Loaded(np.zeros(0, np.int64), np.zeros((0, *self.spec.raw_dims), np.float32),
                          np.zeros(0, np.int64) if self.has_labels else None,
                          [(i, why) for i in range(start, stop)], self.spec.layout is not None)
        ids, raw = self._finite(list(range(start, stop)), raw, errors)
        labels = self.label_values[ids] if self.has_labels else None
        return Loaded(np.asarray(ids, np.int64), raw, labels, errors, self.spec.layout is not None)


def model_input_spec(source_model, shown_as, input_shapes, preprocess: str) -> tuple[str, InputSpec]:
    """The data input's name and :class:`InputSpec`: an image layout when the input is an image batch (1 or 3
    channels on axis 1 or 3), else none (then only ``--preprocess none`` applies)."""
    name, dims = input_shape(source_model, shown_as, input_shapes)
    shown = show(shown_as) if isinstance(shown_as, PATH_TYPES) else IN_MEMORY
    layout = None
    if len(dims) == 3 and (dims[0] in (1, 3) or dims[2] in (1, 3)):
        layout = image_layout(source_model.graph, name, dims, shown)
    if layout is None and preprocess not in (None, "", "none"):
        raise OnnxlrpError(f"--preprocess {escape_terminal(str(preprocess))}: the model's input {quote(name)} is not "
                           f"an image batch ([N, {', '.join(map(str, dims))}]); only 'none' applies")
    channels = layout.channels if layout is not None else 1
    return name, InputSpec(tuple(dims), layout, make_preprocess(preprocess, channels))


def open_source(data: str | os.PathLike, spec: InputSpec, *, labels: bool = False, column: str | None = None,
                label_column: str | None = None) -> Source:
    """The source for DATA: a folder of images or of Parquet files, a ``.npy``/``.npz`` or a ``.parquet`` file."""
    from onnxlrp.images import IMAGE_EXTENSIONS

    from .parquet import PARQUET_SUFFIXES, ParquetSource

    path = Path(data)
    where = show(path)
    st = stat_path(path, "no such data file or folder")
    suffix = path.suffix.lower()
    if stat.S_ISDIR(st.st_mode):
        parquet = _walk(path, PARQUET_SUFFIXES, [])
        if parquet:
            if _walk(path, IMAGE_EXTENSIONS, []):
                raise OnnxlrpError(f"{where}: holds both Parquet files and images; give one kind of data set")
            return ParquetSource(path, spec, column=column, label_column=label_column, labels=labels)
        return ImageFolderSource(path, spec, labels=labels)
    if suffix in PARQUET_SUFFIXES:
        return ParquetSource(path, spec, column=column, label_column=label_column, labels=labels)
    if suffix in ARRAY_SUFFIXES:
        return ArraySource(path, spec, labels=labels)
    raise OnnxlrpError(f"{where}: not a data set (an image folder, a .npy or .npz array file, or Parquet)")
