"""``onnxlrp mask``: class masks from boolean relevance (Groudiev, Sec. 3.1, Fig. 3.1-3.3).

For every sample the model assigns to class ``c``, its B-relevance for ``c`` marks the input pixels that have a
relevant path to the output ``c`` (a pixel is marked where the relevance of any of its channels is not the
semiring's zero; with ``--rule boolean`` that is where it is 1). Combining these marks over a data set pixel-wise
with AND (pixels marked in every sample) and OR (pixels marked in some sample) gives the regions the model uses to
recognize ``c``: the paper's ring around the center for class 0, or, on images of two stacked digits labelled by
the upper one, the upper half (Fig. 3.2-3.3).

Writes ``mask_class<c>_<and|or>.png`` (white: in the mask) and ``.npy`` (bool ``[H, W]``) per class, the fraction
of the class's samples that mark each pixel (``mask_class<c>_frequency``: 1 is the AND, above 0 the OR; float
``[H, W]``, PNG in grey levels), and ``masks.json`` (samples per class, the fraction of pixels in each mask).
"""

from __future__ import annotations

import json
import math

import click
import numpy as np
from PIL import Image

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import read_model, write_atomic
from onnxlrp.messages import show

from .files import check_out_dir, ensure_dir, write_bytes, write_npy
from .in_memory import load_dataset
from .models import prepare
from .semiring_view import semiring_of

COMBINE = ("and", "or")


def marked(relevance: np.ndarray, zero: float) -> np.ndarray:
    """``[N, C, H, W]`` relevance -> ``[N, H, W]``: pixels where some channel's relevance is not ``zero``."""
    r = np.asarray(relevance)
    return np.any(r != np.float32(zero), axis=1) if r.ndim == 4 else r != np.float32(zero)


def class_masks(marks: np.ndarray, classes: np.ndarray, wanted: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """Per class in ``wanted``: the AND and the OR of the marks of its samples (None where it has none)."""
    out = {}
    for c in wanted:
        chosen = marks[classes == c]
        out[c] = {"and": np.all(chosen, axis=0), "or": np.any(chosen, axis=0), "samples": len(chosen),
                  "frequency": chosen.mean(axis=0) if len(chosen) else np.zeros(marks.shape[1:])}
    return out


def mask_png(mask: np.ndarray):
    """A writer for ``mask`` (bool, or a fraction in [0, 1]) as a grey-level PNG, white for 1, scaled up to at least
    224 pixels a side."""
    scale = max(1, math.ceil(224 / max(min(mask.shape), 1)))
    image = Image.fromarray(np.round(np.asarray(mask, dtype=np.float64) * 255).astype(np.uint8)).resize(
        (mask.shape[1] * scale, mask.shape[0] * scale), Image.NEAREST)
    return lambda tmp: image.save(tmp, format="PNG")


def run_mask(model, data: str, *, out_dir: str, rule: str = "boolean", target_class: int | None = None,
             combine: str = "both", preprocess: str = "none", limit: int | None = None, batch_size: int = 128,
             composite=None, input_shapes=None, **params) -> dict:
    """Compute the class masks of ``data`` (see the module docstring); returns the summary written to masks.json."""
    from onnxlrp.runtime import Explainer

    if combine not in (*COMBINE, "both"):
        raise OnnxlrpError(f"--combine must be and, or or both (got {combine!r})")
    check_out_dir(out_dir)
    source, _ = read_model(model)
    dataset = load_dataset(source, model, data, preprocess, limit, input_shapes)
    prepared = prepare(source, shown_as=model, rule=rule, composite=composite, input_shapes=input_shapes, **params)
    semiring = semiring_of(prepared.model)
    zero = semiring["zero"] if semiring else 0.0
    explainer = Explainer(prepared.model)
    marks, classes = [], []
    for start in range(0, len(dataset.x), batch_size):
        result = explainer(dataset.x[start:start + batch_size])
        marks.append(marked(result.relevance, zero))
        classes.append(np.asarray(result.explained_class).reshape(-1))
    marks, classes = np.concatenate(marks), np.concatenate(classes)
    wanted = sorted(set(classes.tolist())) if target_class is None else [int(target_class)]
    masks = class_masks(marks, classes, wanted)
    out = ensure_dir(out_dir)
    summary = {"model": show(model) if not hasattr(model, "graph") else "model", "data": dataset.source,
               "rule": prepared.rule, "samples": int(len(classes)), "classes": {}}
    for c, m in masks.items():
        entry = {"samples": int(m["samples"])}
        if m["samples"] == 0:
            click.echo(f"class {c}: no sample of {len(classes)} is classified as {c}; no mask")
            summary["classes"][str(c)] = entry
            continue
        for how in (COMBINE if combine == "both" else (combine,)):
            stem = out / f"mask_class{c}_{how}"
            write_atomic(stem.with_suffix(".png"), mask_png(m[how]))
            write_npy(stem.with_suffix(".npy"), m[how])
            entry[f"{how}_fraction"] = float(m[how].mean())
        stem = out / f"mask_class{c}_frequency"
        write_atomic(stem.with_suffix(".png"), mask_png(m["frequency"]))
        write_npy(stem.with_suffix(".npy"), m["frequency"].astype(np.float32))
        summary["classes"][str(c)] = entry
        click.echo(f"class {c}: {m['samples']} samples; " + ", ".join(
            f"{how.upper()} mask {entry[f'{how}_fraction']:.1%} of the pixels" for how in COMBINE
            if f"{how}_fraction" in entry))
    write_bytes(out / "masks.json", json.dumps(summary, indent=1).encode())
    click.echo(f"wrote the masks to {show(out)}")
    return summary
