"""Relevance heatmaps and evaluation plots as PNG files (numpy + matplotlib's Agg canvas + Pillow).

Nothing here touches ``matplotlib.pyplot`` or the global backend: plots are drawn on a private
:class:`matplotlib.figure.Figure` attached to a :class:`matplotlib.backends.backend_agg.FigureCanvasAgg`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

__all__ = ["relevance_to_rgb", "save_class_grid", "save_heatmap", "save_plot"]

#: Diverging colour map: blue (negative) -> white (zero) -> red (positive).
CMAP = "bwr"


def _relevance_2d(relevance: np.ndarray) -> np.ndarray:
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim == 3:
        r = r.sum(axis=0)
    if r.ndim != 2:
        raise ValueError(f"relevance must be [H, W] or [C, H, W], got shape {np.shape(relevance)}")
    return np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)


def _image_rgb(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Image as float ``[H, W, 3]`` in [0, 1] from ``[H, W]``, ``[1|3, H, W]`` or ``[H, W, 1|3]`` (uint8 -> /255)."""
    img = np.asarray(image)
    scale = 255.0 if img.dtype == np.uint8 else 1.0
    img = img.astype(np.float64) / scale
    if img.ndim == 2 and img.shape == hw:
        img = img[..., None]
    elif img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[1:] == hw:
        img = np.moveaxis(img, 0, -1)
    elif img.ndim == 3 and img.shape[2] in (1, 3) and img.shape[:2] == hw:
        pass
    else:
        raise ValueError(
            f"image shape {img.shape} does not match the relevance map {hw} "
            "(expected [H, W], [C, H, W] or [H, W, C] with C in 1, 3)"
        )
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.clip(np.nan_to_num(img, nan=0.0), 0.0, 1.0)


def relevance_to_rgb(relevance: np.ndarray, *, image: np.ndarray | None = None, alpha: float = 0.6,
                     peak: float | None = None) -> np.ndarray:
    """Colour a relevance map with a diverging colour map centred on zero.

    ``relevance`` is ``[H, W]`` or ``[C, H, W]`` (summed over channels).  Normalisation is symmetric:
    ``v = R / max|R|`` in ``[-1, 1]`` is mapped through matplotlib's ``"bwr"`` colour map, so positive relevance is
    red, negative blue and zero white; the strongest value of either sign reaches the saturated end.  An all-zero map
    (or one without finite values) gives a uniformly white image (no NaN).

    With ``image`` (grayscale ``[H, W]``, ``[1, H, W]`` or RGB ``[3, H, W]`` / ``[H, W, 3]``, floats in [0, 1] or
    uint8), the result is the alpha blend ``alpha * heatmap + (1 - alpha) * image``.  Returns uint8 ``[H, W, 3]``.
    ``peak`` replaces ``max|R|`` (maps drawn side by side on one scale; values beyond it saturate).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    r = _relevance_2d(relevance)
    if peak is None:
        peak = float(np.abs(r).max()) if r.size else 0.0
    v = np.clip(r / peak, -1.0, 1.0) if peak > 0 else np.zeros_like(r)
    # an odd look-up table size puts an entry exactly on 0.5, so zero relevance is pure white
    rgb = colormaps[CMAP].resampled(511)((v + 1.0) / 2.0)[..., :3]
    if image is not None:
        rgb = alpha * rgb + (1.0 - alpha) * _image_rgb(image, r.shape)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def save_heatmap(
    path: str | os.PathLike[str],
    relevance: np.ndarray,
    *,
    image: np.ndarray | None = None,
    scale: int = 1,
    alpha: float = 0.6,
) -> Path:
    """Write :func:`relevance_to_rgb` of ``relevance`` (optionally over ``image``) as a PNG and return its path.

    ``scale`` (integer >= 1) upscales by nearest neighbour (each pixel becomes a ``scale x scale`` block), so a
    28 x 28 map is readable.  Parent directories are created.
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    rgb = relevance_to_rgb(relevance, image=image, alpha=alpha)
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, int(scale), axis=0), int(scale), axis=1)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(out, format="PNG")
    return out


def save_class_grid(
    path: str | os.PathLike[str],
    maps: np.ndarray,
    *,
    titles: Sequence[str],
    image: np.ndarray | None = None,
    overlay: bool = True,
    columns: int = 6,
) -> Path:
    """One figure: the input ``image`` (when given) and a heatmap per class, ``maps[k]`` (``[H, W]`` or
    ``[C, H, W]``), titled ``titles[k]``, as the thesis's relevance matrix of every target class (its Fig. 10). All
    maps share one colour scale, the largest ``|R|`` over every class, so that panels compare: a class the input
    hardly speaks for stays pale. The heatmaps lie over the image when ``overlay``."""
    maps = np.asarray(maps)
    if len(titles) != len(maps):
        raise ValueError(f"{len(titles)} titles for {len(maps)} maps")
    flat = np.stack([_relevance_2d(m) for m in maps])
    peak = float(np.abs(flat).max()) if flat.size else 0.0
    panels = [(None, "input")] if image is not None else []
    panels += list(zip(flat, titles, strict=True))
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(1.9 * cols, 2.3 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (r, title) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        if r is None:
            ax.imshow(_image_rgb(image, flat.shape[1:]))
        else:
            ax.imshow(relevance_to_rgb(r, image=image if overlay else None, peak=peak))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"relevance per class (one colour scale: |R| up to {peak:.3g})", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def save_plot(
    path: str | os.PathLike[str],
    x: Sequence[float] | np.ndarray,
    curves: Mapping[str, Sequence[float] | np.ndarray],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Line plot of several named curves over the common abscissa ``x``, written as a PNG; returns the path.

    Every curve must have ``len(x)`` values; the legend shows the names in the mapping's order.  Parent
    directories are created.
    """
    xs = np.asarray(x, dtype=np.float64).reshape(-1)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, ys in curves.items():
        ys = np.asarray(ys, dtype=np.float64).reshape(-1)
        if ys.shape != xs.shape:
            raise ValueError(f"curve {name!r} has {ys.size} values for {xs.size} x positions")
        ax.plot(xs, ys, marker="o", markersize=3, label=str(name))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
