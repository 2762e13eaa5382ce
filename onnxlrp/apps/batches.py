"""The one place where a batch of the compiled model's results becomes what the apps keep per sample: the
relevance, the explained class and its score.  ``explain`` (image files, data sets in one process, and Ray actors)
and ``evaluate`` all go through :func:`explain_batch`, so a check on the maps belongs here and only here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxlrp.errors import OnnxlrpError

from .models import Prepared

__all__ = ["BatchResult", "explain_batch"]


@dataclass
class BatchResult:
    """Per sample of one batch: the relevance of the model's input (float32, shaped like it), the explained class
    (int64) and the score output at that class (float64: the Softmax probability when there is one)."""

    relevance: np.ndarray
    classes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.classes)


def explain_batch(explainer, prepared: Prepared, x: np.ndarray, target: int | None = None, *,
                  name: str = "the model", samples: list[str] | None = None,
                  ending: str = "nothing was written") -> BatchResult:
    """Run ``explainer`` (an :class:`~onnxlrp.runtime.Explainer` of ``prepared.model``, made with
    ``finite_only=False``) on the batch ``x`` in the model's input layout, explaining class ``target`` (None: the
    arg-max of the explained output). A relevance with NaN or infinite values is an error naming the model
    (``name``), the ``samples`` (default ``sample <index>``) and what happens to the output (``ending``)."""
    from onnxlrp.runtime import non_finite_error

    result = explainer(x, target=target)
    classes = np.asarray(result.explained_class).reshape(-1).astype(np.int64)
    scores = np.asarray(result.outputs[prepared.score]).reshape(len(x), -1)
    if target is not None and target >= scores.shape[1]:
        raise OnnxlrpError(f"--target {target}: the explained output has only {scores.shape[1]} classes "
                           f"(0..{scores.shape[1] - 1})")
    relevance = np.asarray(result.relevance, dtype=np.float32)
    error = non_finite_error(name, [relevance], list(result.outputs.values()), samples, ending)
    if error:
        raise OnnxlrpError(error)
    return BatchResult(relevance, classes, scores[np.arange(len(x)), classes].astype(np.float64))
