"""How the apps show semiring relevance (Groudiev, "Extending LRP using Semiring Annotations").

A compiled semiring model says which semiring it computes in its ``onnxlrp.semiring`` metadata. Its relevance is
per input channel; a heatmap aggregates the channels with the semiring's plus, as Fig. 4.1 (boolean: OR) and
Fig. 4.2 (counting: a sum) do. Log-domain semirings (times = add) are shown as ``exp(R - max R)`` (max-plus) or
``exp(min R - R)`` (min-plus), so that their zero (``log 0``, e.g. -1e30) is white and the best input red.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import onnx

CHANNEL_PLUS = {"sum": np.sum, "max": np.max, "or": np.max, "min": np.min}


def semiring_of(model: onnx.ModelProto) -> dict | None:
    """The semiring a compiled model computes (plus, times, zero, one, annotation, name), or None."""
    text = next((p.value for p in model.metadata_props if p.key == "onnxlrp.semiring"), None)
    return json.loads(text) if text else None


def heatmap_view(model: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
    """``[C, H, W]`` (or ``[H, W]``) relevance -> what the heatmap shows: unchanged for the real families (the
    heatmap sums the channels), the semiring's plus over the channels for a semiring."""
    semiring = semiring_of(model)
    if semiring is None:
        return lambda r: r

    def view(r: np.ndarray) -> np.ndarray:
        r = np.asarray(r, dtype=np.float64)
        if r.ndim == 3:  # [C, H, W]: the channels meet with plus
            r = CHANNEL_PLUS[semiring["plus"]](r, axis=0)
        if semiring["times"] == "add":
            best = r.max() if semiring["plus"] == "max" else r.min()
            if abs(best) >= abs(semiring["zero"]) / 2:  # nothing relevant
                return np.zeros_like(r)
            r = np.exp(r - best) if semiring["plus"] == "max" else np.exp(best - r)
        return r
    return view
