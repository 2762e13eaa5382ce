"""``onnxlrp explain``: a heatmap PNG and the raw relevance (``.npy``) per image."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import click
import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import read_model, sigterm_guard, write_atomic
from onnxlrp.io.load import IN_MEMORY
from onnxlrp.messages import explained_line, quote, show
from onnxlrp.naming import escape_terminal, safe_filename

from .files import PATH_TYPES, check_out_dir, ensure_dir, write_npy
from .layout import image_layout
from .models import input_shape, prepare
from .preprocess import make_preprocess

__all__ = ["HEATMAP_MIN_SIDE", "run_explain", "unique_stems"]

#: Heatmaps are upscaled (nearest neighbour, integer factor) until their short side is at least this many pixels.
HEATMAP_MIN_SIDE = 224
#: A progress bar is shown (on a terminal) for more images than this.
PROGRESS_MIN_IMAGES = 20
#: Decoded images kept in memory between the check pass and the explain pass of run_explain.
_IMAGE_CACHE_BYTES = 512 * 2**20


ALL_CLASSES = "all"


def _parse_target(target) -> int | str | None:
    if target is None or (isinstance(target, str) and target.strip().lower() == "predicted"):
        return None
    if isinstance(target, str) and target.strip().lower() == ALL_CLASSES:
        return ALL_CLASSES
    try:
        value = int(target)
    except (TypeError, ValueError):
        raise OnnxlrpError(f"--target {target!r}: expected a class index, 'predicted' or 'all'") from None
    if value < 0:
        raise OnnxlrpError(f"--target {value}: a class index is >= 0")
    return value


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """``safe_filename`` of each stem; repeated names (``a/x.png``, ``b/x.png``) get ``-2``, ``-3``, ..."""
    used: set[str] = set()
    out = []
    for p in paths:
        base = safe_filename(p.stem or p.name, max_len=90)
        name, k = base, 1
        while name.lower() in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name.lower())
        out.append(name)
    return out


def _upscale(h: int, w: int) -> int:
    return max(1, math.ceil(HEATMAP_MIN_SIDE / max(min(h, w), 1)))


def _png(relevance: np.ndarray, image: np.ndarray | None, scale: int) -> Callable[[Path], object]:
    from onnxlrp.heatmap import save_heatmap

    return lambda tmp: save_heatmap(tmp, relevance, image=image, scale=scale)


def _grid(maps: np.ndarray, image: np.ndarray | None, scores: np.ndarray, predicted: int,
          overlay: bool) -> Callable[[Path], object]:
    from onnxlrp.heatmap import save_class_grid

    titles = [f"class {k}: {s:.3g}" + (" (pred.)" if k == predicted else "") for k, s in enumerate(scores)]
    return lambda tmp: save_class_grid(tmp, maps, titles=titles, image=image, overlay=overlay)


def _explain_all(explainer, x: np.ndarray, score: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The predicted classes, the scores and the relevance of every class, ``[batch, classes, ...]``: one run per
    class with that class as the target."""
    first = explainer(x, target=None)
    scores = np.asarray(first.outputs[score]).reshape(len(x), -1)
    maps = [np.asarray(explainer(x, target=k).relevance, dtype=np.float32) for k in range(scores.shape[1])]
    return np.asarray(first.explained_class).reshape(-1), scores, np.stack(maps, axis=1)


def run_explain(model, images, *, out_dir, target="predicted", preprocess="none", overlay=True, batch_size=32,
                rule="rlrp", composite=None, flat_layers=1, opset=None, output=None, node_output=None,
                node_input=None, input_shapes=None, **params) -> list[dict]:
    """Explain every image; write ``<out_dir>/<stem>.png`` (heatmap) and ``<stem>.npy`` (the relevance of the
    model's input: ``[C, H, W]``, or ``[H, W, C]`` for an NHWC model, :mod:`.layout`).
    ``target="all"``: every class is explained; the ``.npy`` holds ``[classes, ...]`` and the PNG is one figure
    with the image and a heatmap per class on one colour scale (the thesis's Fig. 10 grid).
    With one ``node_input`` the relevance has that tensor's shape: the heatmap is drawn over the image when its last
    two axes are the image's, alone when it is 2-D or 3-D, and left out otherwise (the ``.npy`` is always written).

    Every image is decoded once before anything is written, so a bad image stops the run with one error line and
    no output at all.  Returns one dict per image (file, class, score, png, npy).
    """
    from onnxlrp.images import list_images, load_image
    from onnxlrp.runtime import Explainer

    if batch_size < 1:
        raise OnnxlrpError(f"--batch-size must be at least 1, got {batch_size}")
    wanted = _parse_target(target)
    check_out_dir(out_dir)
    paths = list_images(images)
    source, _ = read_model(model)
    input_name, chw = input_shape(source, model, input_shapes)
    shown = show(model) if isinstance(model, PATH_TYPES) else IN_MEMORY
    if len(chw) != 3:
        raise OnnxlrpError(f"{shown}: input {escape_terminal(input_name)!r} is not an image batch "
                           f"[N, C, H, W] or [N, H, W, C] (shape [N, {', '.join(map(str, chw))}])")
    layout = image_layout(source.graph, input_name, chw, shown)
    channels, height, width = layout.channels, layout.height, layout.width
    pre = make_preprocess(preprocess, channels)

    # check pass: decode every image before writing anything (keeping what fits in the cache)
    cache: dict[int, np.ndarray] = {}
    cached_bytes = 0
    for i, p in enumerate(paths):
        arr = load_image(p, channels=channels, size=(height, width))
        if cached_bytes + arr.nbytes <= _IMAGE_CACHE_BYTES:
            cache[i] = arr
            cached_bytes += arr.nbytes

    if node_input and len(node_input) > 1 and not isinstance(node_input, str):
        raise OnnxlrpError("explain writes one relevance map per image: give one --node-input")
    prepared = prepare(source, shown_as=model, rule=rule, composite=composite, flat_layers=flat_layers, opset=opset,
                       output=output, node_output=node_output, node_input=node_input, input_shapes=input_shapes,
                       **params)
    if prepared.chw != chw:
        raise OnnxlrpError(f"{show(model)}: the compiled model takes {list(prepared.chw)}, not {list(chw)}")
    explainer = Explainer(prepared.model)
    out = Path(out_dir)
    stems = unique_stems(paths)
    scale = _upscale(height, width)
    if prepared.was_compiled:
        click.echo(f"{show(model)}: compiled already ({escape_terminal(prepared.rule)}), used as it is")
    click.echo(explained_line(prepared.explained, prepared.explained_why))
    click.echo(f"input {quote(input_name)}: {layout.name} ({layout.why}); images are fed as {layout.name}, each .npy "
               f"holds the relevance as {layout.sample_axes}")
    click.echo(f"explaining {len(paths)} image(s) with {escape_terminal(prepared.rule)} on {explainer.provider}")
    results: list[dict] = []
    show_bar = len(paths) > PROGRESS_MIN_IMAGES and sys.stderr.isatty()
    bar = click.progressbar(length=len(paths), file=sys.stderr, label="explaining") if show_bar else None
    with sigterm_guard("onnxlrp explain"), (bar if bar is not None else contextlib.nullcontext()):
        for start in range(0, len(paths), batch_size):
            idx = list(range(start, min(start + batch_size, len(paths))))
            raw = np.stack([cache[i] if i in cache else load_image(paths[i], channels=channels, size=(height, width))
                            for i in idx])
            if wanted == ALL_CLASSES:
                classes, scores, relevance = _explain_all(explainer, layout.to_model(pre(raw)), prepared.score)
            else:
                result = explainer(layout.to_model(pre(raw)), target=wanted)
                classes = np.asarray(result.explained_class).reshape(-1)
                scores = np.asarray(result.outputs[prepared.score]).reshape(len(idx), -1)
                relevance = np.asarray(result.relevance, dtype=np.float32)
            if isinstance(wanted, int) and wanted >= scores.shape[1]:
                raise OnnxlrpError(f"--target {wanted}: the explained output has only {scores.shape[1]} classes "
                                   f"(0..{scores.shape[1] - 1})")
            if start == 0:
                ensure_dir(out)  # only now: nothing is created when the first batch fails
            for j, i in enumerate(idx):
                k = int(classes[j])
                score = float(scores[j, k])
                png, npy = out / f"{stems[i]}.png", out / f"{stems[i]}.npy"
                maps = relevance[j] if wanted == ALL_CLASSES else relevance[j][None]
                shown = np.stack([layout.to_chw(m) if not node_input else m for m in maps])
                drawn = shown.ndim - 1 in (2, 3)
                if drawn:
                    like_image = shown.shape[-2:] == (height, width)
                    if wanted == ALL_CLASSES:
                        write_atomic(png, _grid(shown, raw[j] if like_image else None, scores[j], k, overlay))
                    else:
                        write_atomic(png, _png(shown[0], raw[j] if overlay and like_image else None,
                                               scale if like_image else _upscale(*shown.shape[-2:])))
                write_npy(npy, relevance[j])
                results.append({"file": str(paths[i]), "class": k, "score": score, "png": str(png) if drawn else None,
                                "npy": str(npy)})
                every = f", all {scores.shape[1]} classes" if wanted == ALL_CLASSES else ""
                click.echo(f"{show(paths[i])}: class {k} (score {score:.4g}{every}) -> {show(png if drawn else npy)}")
            if bar is not None:
                bar.update(len(idx))
    return results
