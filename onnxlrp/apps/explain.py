"""``onnxlrp explain``: image files given on the command line get a heatmap PNG and the raw relevance (``.npy``)
each; one data set (an image folder, an array file, Parquet) is streamed into shards (:mod:`.explain_data`)."""

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

from .batches import BatchResult, explain_batch
from .files import PATH_TYPES, check_out_dir, ensure_dir, write_npy
from .layout import image_layout
from .models import input_shape, prepare
from .preprocess import make_preprocess
from .semiring_view import heatmap_view

__all__ = ["HEATMAP_MIN_SIDE", "heatmap_scale", "is_data_set", "run_explain", "unique_stems"]

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


class Written:
    """The files one run of explain wrote, removed again (with the folder, if the run created it) when the run stops
    with an error (a relevance that is not finite, a bad target) in a later batch: a failed run leaves nothing
    behind (files it replaced stay replaced)."""

    def __init__(self, out: Path):
        self.out, self.created, self.files = out, not out.exists(), []

    def folder(self) -> None:
        ensure_dir(self.out)

    def add(self, path) -> None:
        self.files.append(Path(path))

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None or not issubclass(kind, OnnxlrpError):  # Ctrl-C and SIGTERM keep the finished files
            return
        for path in self.files:
            with contextlib.suppress(OSError):
                path.unlink()
        if self.created:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only if empty


def heatmap_scale(h: int, w: int) -> int:
    """The integer upscaling that brings a map's short side to :data:`HEATMAP_MIN_SIDE` pixels."""
    return max(1, math.ceil(HEATMAP_MIN_SIDE / max(min(h, w), 1)))


def _png(relevance: np.ndarray, image: np.ndarray | None, scale: int) -> Callable[[Path], object]:
    from onnxlrp.heatmap import save_heatmap

    return lambda tmp: save_heatmap(tmp, relevance, image=image, scale=scale)


def _grid(maps: np.ndarray, image: np.ndarray | None, scores: np.ndarray, predicted: int,
          overlay: bool) -> Callable[[Path], object]:
    from onnxlrp.heatmap import save_class_grid

    titles = [f"class {k}: {s:.3g}" + (" (pred.)" if k == predicted else "") for k, s in enumerate(scores)]
    return lambda tmp: save_class_grid(tmp, maps, titles=titles, image=image, overlay=overlay)


def explain_all_classes(explainer, prepared, x: np.ndarray, *, name: str, samples: list[str]):
    """Every class of the batch ``x`` explained, one run per class with that class as the target: a
    :class:`~.batches.BatchResult` whose relevance is ``[batch, classes, ...]`` (class and score: the predicted
    ones), and the scores of every class ``[batch, classes]``."""
    predicted = explainer(x, target=None)
    scores = np.asarray(predicted.outputs[prepared.score]).reshape(len(x), -1)
    classes = np.asarray(predicted.explained_class).reshape(-1).astype(np.int64)
    per_class = [explain_batch(explainer, prepared, x, c, name=name, samples=samples) for c in range(scores.shape[1])]
    return BatchResult(np.stack([r.relevance for r in per_class], axis=1), classes,
                       scores[np.arange(len(x)), classes].astype(np.float64)), scores


def is_data_set(path) -> bool:
    """A folder, or a file whose name says array (.npy, .npz) or Parquet: streamed by :mod:`.explain_data`."""
    from .parquet import PARQUET_SUFFIXES
    from .sources import ARRAY_SUFFIXES

    p = Path(path)
    return p.is_dir() or p.suffix.lower() in ARRAY_SUFFIXES + PARQUET_SUFFIXES


def run_explain(model, images, *, out_dir, target="predicted", preprocess="none", overlay=True, batch_size=None,
                rule="rlrp", composite=None, flat_layers=1, opset=None, output=None, node_output=None,
                node_input=None, input_shapes=None, quiet=False, **options):
    """Explain image files, or one data set.

    One data set (``images`` is a single folder, ``.npy``/``.npz`` or Parquet path): see
    :func:`~onnxlrp.apps.explain_data.run_dataset_explain` (the data-set options ``heatmaps``, ``resume``,
    ``engine``, ``address``, ``num_workers``, ``shard_size``, ``column`` apply); returns its summary dict.

    Image files: write ``<out_dir>/<stem>.png`` (heatmap) and ``<stem>.npy`` (the relevance of the model's input:
    ``[C, H, W]``, or ``[H, W, C]`` for an NHWC model, :mod:`.layout`).  With one ``node_input`` the relevance has
    that tensor's shape: the heatmap is drawn over the image when its last two axes are the image's, alone when it is
    2-D or 3-D, and left out otherwise (the ``.npy`` is always written).  ``target="all"``: every class is
    explained; the ``.npy`` holds ``[classes, ...]`` and the PNG is one figure with the image and a heatmap per class
    on one colour scale (the thesis's Fig. 10 grid).  Every image is decoded once before
    anything is written, so a bad image stops the run with one error line and no output at all.  Returns one dict
    per image (file, class, score, png, npy).
    """
    images = [images] if isinstance(images, (str, Path)) else list(images)
    data_sets = [p for p in images if is_data_set(p)]
    compile_options = dict(rule=rule, composite=composite, flat_layers=flat_layers, opset=opset, output=output,
                           node_output=node_output, node_input=node_input, input_shapes=input_shapes)
    dataset_options = ("heatmaps", "resume", "engine", "address", "num_workers", "threads", "shard_size", "column")
    if data_sets:
        if len(images) > 1:
            raise OnnxlrpError(f"{show(data_sets[0])}: give one data set (a folder, a .npy/.npz or Parquet file), "
                               "or image files, not both or several")
        if node_input:
            raise OnnxlrpError(f"{show(data_sets[0])}: --node-input applies to image files, not to a data set")
        if _parse_target(target) == ALL_CLASSES:
            raise OnnxlrpError(f"{show(data_sets[0])}: --target all applies to image files, not to a data set")
        from .explain_data import run_dataset_explain

        compile_options.pop("node_input")
        return run_dataset_explain(model, images[0], out_dir=out_dir, target=_parse_target(target),
                                   preprocess=preprocess, overlay=overlay, batch_size=batch_size, quiet=quiet,
                                   **compile_options, **options)
    given = [k for k in dataset_options if options.get(k) not in (None, False, "local")]
    if given:
        raise OnnxlrpError(f"--{given[0].replace('_', '-')} applies to a data set (a folder, a .npy/.npz or Parquet "
                           "file), not to image files")
    params = {k: v for k, v in options.items() if k not in dataset_options}
    return _explain_files(model, images, out_dir=out_dir, target=target, preprocess=preprocess, overlay=overlay,
                          batch_size=batch_size or 32, quiet=quiet, **compile_options, **params)


def _explain_files(model, images, *, out_dir, target, preprocess, overlay, batch_size, quiet, rule, composite,
                   flat_layers, opset, output, node_output, node_input, input_shapes, **params) -> list[dict]:
    """Image files: a heatmap PNG and an ``.npy`` each (see :func:`run_explain`)."""
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
    explainer = Explainer(prepared.model, finite_only=False)  # explain_batch names the images of a non-finite map
    view = heatmap_view(prepared.model)  # a semiring's channels meet with its plus
    out = Path(out_dir)
    stems = unique_stems(paths)
    scale = heatmap_scale(height, width)
    echo = (lambda *a, **k: None) if quiet else click.echo
    if prepared.was_compiled:
        echo(f"{show(model)}: compiled already ({escape_terminal(prepared.rule)}), used as it is")
    echo(explained_line(prepared.explained, prepared.explained_why))
    echo(f"input {quote(input_name)}: {layout.name} ({layout.why}); images are fed as {layout.name}, each .npy "
         f"holds the relevance as {layout.sample_axes}")
    echo(f"explaining {len(paths)} image(s) with {escape_terminal(prepared.rule)} on {explainer.provider}")
    results: list[dict] = []
    written = Written(out)
    show_bar = len(paths) > PROGRESS_MIN_IMAGES and sys.stderr.isatty() and not quiet
    bar = click.progressbar(length=len(paths), file=sys.stderr, label="explaining") if show_bar else None
    with sigterm_guard("onnxlrp explain"), (bar if bar is not None else contextlib.nullcontext()), written:
        for start in range(0, len(paths), batch_size):
            idx = list(range(start, min(start + batch_size, len(paths))))
            raw = np.stack([cache[i] if i in cache else load_image(paths[i], channels=channels, size=(height, width))
                            for i in idx])
            x = layout.to_model(pre(raw))
            names = [show(paths[i]) for i in idx]
            if wanted == ALL_CLASSES:
                batch, class_scores = explain_all_classes(explainer, prepared, x, name=shown, samples=names)
            else:
                batch, class_scores = explain_batch(explainer, prepared, x, wanted, name=shown, samples=names), None
            if start == 0:
                written.folder()  # only now: nothing is created when the first batch fails
            for j, i in enumerate(idx):
                k, score = int(batch.classes[j]), float(batch.scores[j])
                png, npy = out / f"{stems[i]}.png", out / f"{stems[i]}.npy"
                maps = batch.relevance[j] if class_scores is not None else batch.relevance[j][None]
                drawn_maps = np.stack([layout.to_chw(m) if not node_input else m for m in maps])
                drawn = drawn_maps.ndim - 1 in (2, 3)
                if drawn:
                    like_image = drawn_maps.shape[-2:] == (height, width)
                    if class_scores is not None:
                        picture = _grid(drawn_maps, raw[j] if like_image else None, class_scores[j], k, overlay)
                    else:
                        picture = _png(view(drawn_maps[0]), raw[j] if overlay and like_image else None,
                                       scale if like_image else heatmap_scale(*drawn_maps.shape[-2:]))
                    written.add(write_atomic(png, picture))
                written.add(write_npy(npy, batch.relevance[j]))
                results.append({"file": str(paths[i]), "class": k, "score": score, "png": str(png) if drawn else None,
                                "npy": str(npy)})
                every = f", all {class_scores.shape[1]} classes" if class_scores is not None else ""
                echo(f"{show(paths[i])}: class {k} (score {score:.4g}{every}) -> {show(png if drawn else npy)}")
            if bar is not None:
                bar.update(len(idx))
    return results
