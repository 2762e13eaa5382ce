"""The output folder of a data-set run, written so that an interruption at any moment loses at most the shard in
progress, and ``--resume`` finishes the job with the bytes an uninterrupted run writes.

::

    OUT/manifest.json               the job: model, rule, data (kind, count, fingerprint), shard and batch size...
    OUT/shards/relevance-00000.npy  float32 [n, *input dims]: shard 0's relevance, one row per explained sample
    OUT/shards/errors-00000.csv     sample, source, reason: shard 0's inputs that could not be read (often empty)
    OUT/shards/index-00000.csv      shard 0's index rows; written last, so a shard is done when it exists
    OUT/heatmaps/NNNNNNNN-NAME.png  with --heatmaps
    OUT/index.csv, OUT/errors.csv   (and OUT/index.parquet with pyarrow) once every shard is done

Shard ``k`` holds samples ``[k * shard_size, (k + 1) * shard_size)``, its batches never cross into the next shard,
and its files are renamed into place together (:func:`onnxlrp.io.write_files_atomic`), the index part last: a
shard's relevance is never partial, and a shard whose index part is missing is computed again.  Only SIGKILL can
leave a hidden ``.NAME.XXXXXXXX.tmp`` file behind; ``--resume`` removes those.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import write_atomic, write_files_atomic
from onnxlrp.messages import show
from onnxlrp.naming import safe_filename

from .files import ensure_dir, write_bytes

__all__ = ["ERROR_COLUMNS", "INDEX_COLUMNS", "ShardResult", "ShardStore", "csv_bytes", "read_index"]

INDEX_COLUMNS = ("sample", "source", "class", "score", "relevance_sum", "shard", "offset")
ERROR_COLUMNS = ("sample", "source", "reason")
MANIFEST = "manifest.json"
FORMAT = 1
#: What a SIGKILLed atomic write leaves behind (onnxlrp.io.atomic's temp-file names).
_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


@dataclass
class ShardResult:
    """One shard, computed: the explained samples' ids, relevance, classes and scores (in sample order), the
    ``(id, reason)`` of the inputs that could not be read, and the raw images when heatmaps are drawn."""

    shard: int
    ids: np.ndarray
    relevance: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    errors: list[tuple[int, str]]
    raw: np.ndarray | None = None


def csv_bytes(rows: Sequence[Sequence], header: Sequence[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8", "surrogateescape")


class ShardStore:
    """The output folder of one job (see the module docstring).  ``job`` is what must match for ``--resume``."""

    def __init__(self, out: Path, job: dict, *, count: int, shard_size: int, resume: bool, heatmaps: bool):
        self.out, self.job, self.count, self.shard_size = Path(out), job, count, shard_size
        self.heatmaps = heatmaps
        self.shards = max(1, -(-count // shard_size)) if count else 0
        self.parts = self.out / "shards"
        self.manifest = self.out / MANIFEST
        if self.manifest.exists():
            earlier = self._read_manifest(self.manifest)
            if not resume:
                raise OnnxlrpError(f"{show(self.out)}: holds an earlier run ({len(self._done())} of "
                                   f"{self.shards} shards done); --resume continues it, or choose another folder")
            changed = [k for k in sorted(set(job) | set(earlier)) if job.get(k) != earlier.get(k)]
            if changed:
                raise OnnxlrpError(f"{show(self.out)}: --resume: the earlier run was a different job ({changed[0]}: "
                                   f"{_short(earlier.get(changed[0]))} then, {_short(job.get(changed[0]))} now)")
            self._remove_temp_files()
        elif resume:
            raise OnnxlrpError(f"{show(self.out)}: nothing to resume (no {MANIFEST}); run without --resume")
        self.created = self.manifest.exists()
        self.done = self._done()

    def _create(self) -> None:
        """The folders and the manifest, once the first shard is ready (a run that fails before leaves nothing)."""
        ensure_dir(self.out)
        ensure_dir(self.parts)
        if self.heatmaps:
            ensure_dir(self.out / "heatmaps")
        if not self.created:
            write_bytes(self.manifest, (json.dumps(self.job, indent=1, sort_keys=True) + "\n").encode())
            self.created = True

    def _read_manifest(self, path: Path) -> dict:
        try:
            job = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise OnnxlrpError(f"{show(path)}: not a readable manifest ({err.__class__.__name__})") from None
        if not isinstance(job, dict) or job.get("format") != FORMAT:
            raise OnnxlrpError(f"{show(path)}: not a manifest of this onnxlrp (format {FORMAT})")
        return job

    def _remove_temp_files(self) -> None:
        for folder in (self.out, self.parts, self.out / "heatmaps"):
            if folder.is_dir():
                for entry in os.scandir(folder):
                    if _TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)

    def _name(self, kind: str, shard: int, suffix: str) -> Path:
        return self.parts / f"{kind}-{shard:05d}{suffix}"

    def _done(self) -> set[int]:
        return {k for k in range(self.shards)
                if self._name("index", k, ".csv").is_file() and self._name("relevance", k, ".npy").is_file()}

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.count)

    def todo(self) -> list[int]:
        return [k for k in range(self.shards) if k not in self.done]

    def done_samples(self) -> int:
        return sum(b - a for a, b in map(self.bounds, self.done))

    def heatmap_name(self, sample: int, source_name: str) -> str:
        width = max(len(str(max(self.count - 1, 0))), 1)
        stem = safe_filename(Path(source_name).stem or "sample", max_len=60)  # "d.npy[3]" -> "d"
        return f"{sample:0{width}d}-{stem}.png"

    def write(self, result: ShardResult, names, *, layout=None, overlay: bool = True, scale: int = 1) -> None:
        """Write one shard's relevance, errors, heatmaps and (last) index part; ``names(i)`` names sample i."""
        from onnxlrp.heatmap import save_heatmap

        self._create()
        k = result.shard
        files = []
        relevance = np.ascontiguousarray(result.relevance, dtype=np.float32)

        def npy(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, relevance, allow_pickle=False)

        files.append((self._name("relevance", k, ".npy"), npy))
        errors = csv_bytes([(i, names(i), why) for i, why in result.errors], ERROR_COLUMNS)
        files.append((self._name("errors", k, ".csv"), lambda tmp: tmp.write_bytes(errors)))
        rows = []
        for offset, (i, cls, score, rel) in enumerate(zip(result.ids, result.classes, result.scores, relevance,
                                                          strict=True)):
            row = [int(i), names(int(i)), int(cls), repr(float(score)), repr(float(rel.sum(dtype=np.float64))), k,
                   offset]
            if self.heatmaps:
                png = self.heatmap_name(int(i), names(int(i)))
                chw = layout.to_chw(rel) if layout is not None else rel
                image = result.raw[offset] if overlay and result.raw is not None else None
                files.append((self.out / "heatmaps" / png,
                              lambda tmp, chw=chw, image=image: save_heatmap(tmp, chw, image=image, scale=scale)))
                row.append(f"heatmaps/{png}")
            rows.append(row)
        header = INDEX_COLUMNS + (("heatmap",) if self.heatmaps else ())
        index = csv_bytes(rows, header)
        files.append((self._name("index", k, ".csv"), lambda tmp: tmp.write_bytes(index)))
        write_files_atomic(files)
        self.done.add(k)

    def finish(self, listing_errors: Sequence[tuple[str, str]]) -> tuple[int, int]:
        """Merge the shards' parts into ``index.csv`` and ``errors.csv`` (and ``index.parquet`` when pyarrow is
        installed); returns (explained samples, errors)."""
        self._create()
        counts = [0, 0]

        def merge(kind: str, header: Sequence[str], extra: Sequence[Sequence], slot: int):
            def write(tmp: Path) -> None:
                with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as out:
                    writer = csv.writer(out, lineterminator="\n")
                    writer.writerow(header)
                    for k in range(self.shards):
                        with open(self._name(kind, k, ".csv"), encoding="utf-8", errors="surrogateescape",
                                  newline="") as part:
                            reader = csv.reader(part)
                            next(reader)
                            for row in reader:
                                writer.writerow(row)
                                counts[slot] += 1
                    writer.writerows(extra)
                    counts[slot] += len(extra)
            return write

        header = INDEX_COLUMNS + (("heatmap",) if self.heatmaps else ())
        write_atomic(self.out / "errors.csv", merge("errors", ERROR_COLUMNS,
                                                    [("", what, why) for what, why in listing_errors], 1))
        write_atomic(self.out / "index.csv", merge("index", header, [], 0))
        self._parquet_index()
        return counts[0], counts[1]

    def _parquet_index(self) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return
        table = read_index(self.out)
        arrays = {name: pa.array(values) for name, values in table.items()}
        write_atomic(self.out / "index.parquet", lambda tmp: pq.write_table(pa.table(arrays), tmp))


def read_index(out: str | os.PathLike) -> dict[str, np.ndarray]:
    """``OUT/index.csv`` as columns (numbers as int64/float64 arrays, names as str arrays)."""
    with open(Path(out) / "index.csv", encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    types = {"sample": np.int64, "class": np.int64, "shard": np.int64, "offset": np.int64, "score": np.float64,
             "relevance_sum": np.float64}
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(header)
    return {name: np.asarray(values, dtype=types.get(name, str)) for name, values in zip(header, columns, strict=True)}


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
