"""Labelled data sets held in memory, for the commands that need every sample at once (``mask``, ``prune``,
``perturb``): read through :mod:`.sources`, so they take what ``evaluate`` takes (``builtin:digits``, a folder with
one sub-folder per class index, a ``.npz`` with images and labels, Parquet with a label column), with the same
checks; unreadable inputs are skipped and counted."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.naming import escape_terminal

from .sources import model_input_spec
from .stream import read_ahead

__all__ = ["Dataset", "load_dataset"]

READ_BATCH = 256  # samples per read


@dataclass
class Dataset:
    x: np.ndarray  # float32 [N, ...] in the model's input space (preprocessed, in its layout)
    labels: np.ndarray  # int64 [N]
    source: str  # how messages name the data
    unreadable: int = 0  # inputs skipped because they could not be read


def load_dataset(source_model, shown_as, data: str, preprocess: str = "none", limit: int | None = None,
                 input_shapes=None) -> Dataset:
    """The first ``limit`` samples of ``data`` (all when None) as the model's input, with their labels."""
    from .evaluate import evaluation_source

    if limit is not None and limit < 1:
        raise OnnxlrpError(f"--limit must be at least 1, got {limit}")
    _, spec = model_input_spec(source_model, shown_as, input_shapes, preprocess)
    source = evaluation_source(data, spec)
    count = min(limit or source.count, source.count)
    units = [(0, start, min(start + READ_BATCH, count)) for start in range(0, count, READ_BATCH)]
    xs, labels, unreadable = [], [], 0
    for _, loaded in read_ahead(source, units):
        unreadable += len(loaded.errors)
        if len(loaded.ids):
            xs.append(spec.to_model(loaded.raw))
            labels.append(loaded.labels)
    if not xs:
        raise OnnxlrpError(f"{escape_terminal(source.where)}: no sample could be read")
    return Dataset(np.concatenate(xs), np.concatenate(labels).astype(np.int64), source.where, unreadable)
