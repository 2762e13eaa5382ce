"""Quantitative evaluation of relevance maps (numpy only, batch-aware).

All functions take batches: inputs and relevance maps are shaped ``[B, C, H, W]`` (or ``[B, ...]`` where noted),
masks are ``[B, H, W]`` booleans.  Nothing here depends on an inference runtime: models enter only as plain
Python callables on numpy batches.

Contents
--------
* Masked-input study of the R-LRP paper (Nyiri et al., section 4: "keep the p % most relevant inputs / pixels, set
  the others to 0, measure the accuracy"): :func:`top_percent_mask`, :func:`keep_top_percent`,
  :func:`masked_accuracy`, and the paper's "mask pointing game" :func:`top_percent_in_mask`.
* Pixel flipping / region perturbation (Samek et al. 2017, "Evaluating the visualization of what a deep neural
  network has learned"): :func:`perturbation_curve`, :func:`aopc`.
* Pointing game (Zhang et al. 2016/2018, "Top-down neural attention by excitation backprop"):
  :func:`pointing_game`, :func:`boxes_to_masks`.
* Relevance mass ratios mu and mu_w (Kohlbrenner et al. 2020, "Towards best practice in explaining neural network
  decisions with LRP", eq. 5): :func:`relevance_mass_ratio`, :func:`weighted_relevance_mass_ratio`.

Invalid arguments (shapes, percentages, ...) raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "aopc",
    "boxes_to_masks",
    "keep_top_percent",
    "masked_accuracy",
    "num_kept",
    "perturbation_curve",
    "pointing_game",
    "relevance_mass_ratio",
    "top_percent_in_mask",
    "top_percent_mask",
    "weighted_relevance_mass_ratio",
]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_same_shape(x: np.ndarray, relevance: np.ndarray) -> None:
    if x.shape != relevance.shape:
        raise ValueError(f"input shape {x.shape} and relevance shape {relevance.shape} differ")
    if x.ndim < 2:
        raise ValueError(f"expected a batch [B, ...] with at least 2 dimensions, got shape {x.shape}")


def _pixel_map(relevance: np.ndarray, mask_ndim: int) -> np.ndarray:
    """Relevance per pixel ``[B, H, W]``: sum over the channel axis 1 when relevance has one more axis than masks."""
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim == mask_ndim + 1:
        return r.sum(axis=1)
    if r.ndim == mask_ndim:
        return r
    raise ValueError(f"relevance shape {r.shape} does not fit masks with {mask_ndim} dimensions")


def _check_masks(masks: np.ndarray, pixel_shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(masks)
    if m.shape != pixel_shape:
        raise ValueError(f"masks shape {m.shape} does not match the relevance map shape {pixel_shape}")
    return m.astype(bool, copy=False)


def num_kept(percent: float, n: int) -> int:
    """Number of elements kept for ``percent`` % of ``n``: ``ceil(percent / 100 * n)``, clipped to ``[0, n]``.

    The product is rounded to 9 decimals before the ceiling so that float noise does not add an element
    (``0.07 * 100`` is ``7.000000000000001`` in floating point and keeps 7 of 100, not 8).
    """
    p = float(percent)
    if not (0.0 <= p <= 100.0) or math.isnan(p):
        raise ValueError(f"percent must lie in [0, 100], got {percent!r}")
    k = math.ceil(round(p * n / 100.0, 9))
    return min(max(k, 0), n)


# ----------------------------------------------------------------------------------------------------------------
# 1. masked-input study (R-LRP paper)
# ----------------------------------------------------------------------------------------------------------------


def top_percent_mask(relevance: np.ndarray, percent: float, *, absolute: bool, per_pixel: bool) -> np.ndarray:
    """Boolean mask (shape of ``relevance``) of the ``percent`` % most relevant inputs of every sample.

    Ranking, per sample:

    * ``absolute=False`` (signed): by relevance value, most positive first;
      ``absolute=True``: by ``|relevance|``, largest first.
    * ``per_pixel=False``: every input element (each channel separately) is a unit, ``n = C*H*W``;
      ``per_pixel=True``: a pixel's score is the relevance summed over channels (axis 1; for the absolute variant
      ``|sum_c R_c|``, as in the paper's section 4.5) and all channels of a pixel are kept together, ``n = H*W``.
    * ``k = ceil(percent / 100 * n)`` units are kept (see :func:`num_kept`); ties are broken deterministically by a
      stable sort, so among equal scores the unit with the lower flat (row-major) index is kept first.
    """
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim < 2:
        raise ValueError(f"expected relevance [B, ...] with at least 2 dimensions, got shape {r.shape}")
    if per_pixel:
        if r.ndim < 3:
            raise ValueError(f"per_pixel=True needs a channel axis: relevance [B, C, ...], got shape {r.shape}")
        scores = r.sum(axis=1)
    else:
        scores = r
    batch = scores.shape[0]
    flat = scores.reshape(batch, -1)
    if absolute:
        flat = np.abs(flat)
    n = flat.shape[1]
    k = num_kept(percent, n)
    # descending stable order: sort the negated scores ascending with a stable algorithm
    order = np.argsort(-flat, axis=1, kind="stable")
    keep = np.zeros((batch, n), dtype=bool)
    np.put_along_axis(keep, order[:, :k], True, axis=1)
    keep = keep.reshape(scores.shape)
    if per_pixel:
        keep = np.broadcast_to(np.expand_dims(keep, 1), r.shape).copy()
    return keep


def keep_top_percent(
    x: np.ndarray, relevance: np.ndarray, percent: float, *, absolute: bool, per_pixel: bool
) -> np.ndarray:
    """Keep only the ``percent`` % most relevant inputs of each sample of ``x`` and set all others to 0.

    ``x`` and ``relevance`` have the same shape ``[B, C, H, W]`` (``[B, ...]`` when ``per_pixel=False``).  The
    ranking (signed vs absolute, per input element vs per pixel), the count ``ceil(percent / 100 * n)`` and the
    tie-breaking (stable sort on the flat index) are those of :func:`top_percent_mask`.  Returns a new array with
    the dtype of ``x``.
    """
    x = np.asarray(x)
    r = np.asarray(relevance)
    _check_same_shape(x, r)
    keep = top_percent_mask(r, percent, absolute=absolute, per_pixel=per_pixel)
    return np.where(keep, x, np.zeros((), dtype=x.dtype)).astype(x.dtype, copy=False)


def masked_accuracy(
    predict: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    labels: np.ndarray | None,
    relevance: np.ndarray,
    percents: Iterable[float],
    *,
    absolute: bool,
    per_pixel: bool,
    batch_size: int = 256,
) -> dict[float, float]:
    """Accuracy of ``predict`` on inputs reduced to their ``p`` % most relevant inputs, for every ``p`` in percents.

    ``predict(batch) -> [b, K]`` logits or probabilities (the argmax is taken, so either works); it is called on
    chunks of at most ``batch_size`` samples.  Masking is done by :func:`keep_top_percent`.  ``labels`` ``[B]``
    are the reference classes; ``labels=None`` uses the model's own prediction on the unmasked inputs (the
    "founded category" of the R-LRP paper, which moreover evaluates only correctly classified test images -- filter
    ``x`` beforehand to reproduce that).  Returns ``{p: accuracy in [0, 1]}`` with the keys as given.
    """
    x = np.asarray(x)
    r = np.asarray(relevance)
    _check_same_shape(x, r)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    percents = list(percents)
    for p in percents:
        num_kept(p, 1)  # validates the range early
    n = x.shape[0]

    def _argmax(batch: np.ndarray) -> np.ndarray:
        out = np.asarray(predict(batch))
        if out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise ValueError(f"predict must return [batch, classes], got shape {out.shape} for batch {batch.shape}")
        return out.argmax(axis=1)

    if labels is None:
        labels = np.concatenate([_argmax(x[i : i + batch_size]) for i in range(0, n, batch_size)]) if n else []
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} samples")
    result: dict[float, float] = {}
    for p in percents:
        correct = 0
        for i in range(0, n, batch_size):
            masked = keep_top_percent(
                x[i : i + batch_size], r[i : i + batch_size], p, absolute=absolute, per_pixel=per_pixel
            )
            correct += int((_argmax(masked) == labels[i : i + batch_size]).sum())
        result[p] = correct / n if n else float("nan")
    return result


def top_percent_in_mask(
    relevance: np.ndarray, masks: np.ndarray, percent: float, *, absolute: bool = True
) -> np.ndarray:
    """The "mask pointing game" of the R-LRP paper (section 6.1): fraction of the ``percent`` % most relevant pixels
    (relevance summed over channels, ranked as in :func:`top_percent_mask` with ``per_pixel=True``) that lie inside
    the object mask.  ``relevance`` ``[B, C, H, W]`` or ``[B, H, W]``, ``masks`` ``[B, H, W]``.  Returns ``[B]``
    floats; NaN where no pixel is kept (``percent`` 0)."""
    m = np.asarray(masks)
    pix = _pixel_map(relevance, m.ndim)
    m = _check_masks(m, pix.shape)
    keep = top_percent_mask(pix[:, None], percent, absolute=absolute, per_pixel=True)[:, 0]
    kept = keep.reshape(keep.shape[0], -1).sum(axis=1)
    inside = (keep & m).reshape(keep.shape[0], -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(kept > 0, inside / np.maximum(kept, 1), np.nan)


# ----------------------------------------------------------------------------------------------------------------
# 2. pixel flipping / region perturbation (Samek et al. 2017)
# ----------------------------------------------------------------------------------------------------------------


def _unit_ids(shape: tuple[int, ...], region: int, per_pixel: bool) -> tuple[np.ndarray, int]:
    """Integer unit (region) id for every element of one sample of ``shape`` (without the batch axis)."""
    if region < 1:
        raise ValueError(f"region must be >= 1, got {region}")
    if per_pixel and len(shape) < 2:
        raise ValueError("per_pixel=True needs inputs [B, C, ...] with a channel axis")
    if len(shape) == 3:  # [C, H, W]: region x region patches on the spatial grid
        c, h, w = shape
        nh, nw = -(-h // region), -(-w // region)
        rows = np.arange(h) // region
        cols = np.arange(w) // region
        patch = rows[:, None] * nw + cols[None, :]  # [H, W]
        if per_pixel:
            ids = np.broadcast_to(patch, (c, h, w))
            return ids.reshape(-1), nh * nw
        ids = np.arange(c)[:, None, None] * (nh * nw) + patch[None]
        return ids.reshape(-1), c * nh * nw
    if region != 1:
        raise ValueError(f"region > 1 needs inputs [B, C, H, W], got sample shape {shape}")
    if per_pixel:
        spatial = int(np.prod(shape[1:]))
        ids = np.broadcast_to(np.arange(spatial).reshape(shape[1:]), shape)
        return ids.reshape(-1), spatial
    total = int(np.prod(shape))
    return np.arange(total), total


def perturbation_curve(
    predict_score: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    relevance: np.ndarray,
    *,
    steps: int,
    region: int = 1,
    order: Literal["morf", "lerf"] = "morf",
    fill: float | Literal["mean"] | np.ndarray = 0.0,
    per_pixel: bool = True,
) -> np.ndarray:
    """Region-perturbation curve of Samek et al. (2017): the score after removing the k most relevant regions.

    * Regions: the ``[H, W]`` grid of each sample is tiled into non-overlapping ``region x region`` patches
      (patches on the bottom/right border are smaller when ``region`` does not divide H or W).  With
      ``per_pixel=True`` a patch spans all channels and its score is the relevance summed over the patch and the
      channels; with ``per_pixel=False`` every channel's patch is a separate region.  Inputs other than
      ``[B, C, H, W]`` are supported with ``region=1`` (per element, or per position summed over axis 1).
    * Order: ``"morf"`` ranks regions most relevant first (descending summed relevance), ``"lerf"`` least relevant
      first (ascending); ties are broken by a stable sort on the region index (row-major patch order, channel
      major when ``per_pixel=False``).
    * Removal is cumulative: step k replaces the first k regions by ``fill``: a float, ``"mean"`` (the mean of
      each channel of the unperturbed sample over its spatial positions; for inputs without spatial axes, the
      mean of the sample) or an array broadcastable to ``x`` (e.g. a dataset mean image).
    * ``predict_score(batch) -> [B]`` returns the score of the explained class for every sample (e.g. the logit
      of the predicted class); it is called ``steps + 1`` times on the whole batch.

    Returns ``[B, steps + 1]`` with ``curve[:, 0]`` the unperturbed score.  ``steps`` may not exceed the number
    of regions.
    """
    x = np.asarray(x)
    r = np.asarray(relevance, dtype=np.float64)
    _check_same_shape(x, r)
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    batch = x.shape[0]
    ids, n_units = _unit_ids(x.shape[1:], region, per_pixel)
    if not (0 <= steps <= n_units):
        raise ValueError(f"steps must lie in [0, {n_units}] (number of regions), got {steps}")

    # summed relevance per region and sample: one bincount over (sample, region) pairs
    offsets = (np.arange(batch) * n_units)[:, None]
    scores = np.bincount(
        (ids[None, :] + offsets).reshape(-1), weights=r.reshape(batch, -1).reshape(-1), minlength=batch * n_units
    ).reshape(batch, n_units)
    rank_order = np.argsort(-scores if order == "morf" else scores, axis=1, kind="stable")
    rank = np.empty_like(rank_order)
    np.put_along_axis(rank, rank_order, np.arange(n_units)[None, :].repeat(batch, axis=0), axis=1)
    element_rank = np.take_along_axis(rank, np.broadcast_to(ids, (batch, ids.size)), axis=1).reshape(x.shape)

    if isinstance(fill, str):
        if fill != "mean":
            raise ValueError(f"fill must be a number, 'mean' or an array, got {fill!r}")
        if x.ndim >= 3:
            fill_value = x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float64)
        else:
            fill_value = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True, dtype=np.float64)
    else:
        fill_value = np.asarray(fill, dtype=np.float64)
    fill_full = np.broadcast_to(fill_value, x.shape).astype(x.dtype)

    def _score(batch_x: np.ndarray) -> np.ndarray:
        s = np.asarray(predict_score(batch_x), dtype=np.float64).reshape(-1)
        if s.shape[0] != batch:
            raise ValueError(f"predict_score must return one score per sample ({batch}), got shape {s.shape}")
        return s

    curve = np.empty((batch, steps + 1), dtype=np.float64)
    curve[:, 0] = _score(x)
    for k in range(1, steps + 1):
        curve[:, k] = _score(np.where(element_rank < k, fill_full, x))
    return curve


def aopc(curve: np.ndarray) -> np.ndarray:
    """Area over the perturbation curve per sample (Samek et al. 2017, eq. 12 without the dataset average):

    ``AOPC = 1/(L+1) * sum_{k=0}^{L} (f(x^(0)) - f(x^(k)))`` for ``curve`` ``[B, L+1]`` from
    :func:`perturbation_curve` (``curve[:, 0] = f(x^(0))``).  A 1-D curve is treated as one sample.  Returns
    ``[B]``; average over samples for the paper's dataset-level value.
    """
    c = np.atleast_2d(np.asarray(curve, dtype=np.float64))
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError(f"curve must be [B, L+1], got shape {np.shape(curve)}")
    return (c[:, :1] - c).mean(axis=1)


# ----------------------------------------------------------------------------------------------------------------
# 3. pointing game (Zhang et al.)
# ----------------------------------------------------------------------------------------------------------------


def boxes_to_masks(boxes: np.ndarray | Sequence[np.ndarray | Sequence[int]], shape: Sequence[int]) -> np.ndarray:
    """Boolean masks ``[B, H, W]`` from boxes ``(x0, y0, x1, y1)`` in pixels, end exclusive.

    x is the column (width) axis and y the row (height) axis: the box covers ``mask[y0:y1, x0:x1]``.  ``boxes`` is
    ``[B, 4]``, or a length-B sequence whose items are one box ``[4]`` or several ``[n, 4]`` (their union, e.g. all
    boxes of one class).  Coordinates must be integers; they are clipped to the image.  ``shape`` is ``(H, W)``;
    only its last two entries are used, so an input shape ``(B, C, H, W)`` works too.
    """
    if len(shape) < 2:
        raise ValueError(f"shape must end with (H, W), got {tuple(shape)}")
    h, w = int(shape[-2]), int(shape[-1])
    items = list(boxes)  # [B, 4] array rows, [B, n, 4] array items or a ragged sequence
    masks = np.zeros((len(items), h, w), dtype=bool)
    for i, item in enumerate(items):
        b = np.asarray(item)
        b = b.reshape(-1, 4) if b.size else np.zeros((0, 4))
        if not np.all(np.equal(np.mod(b, 1), 0)):
            raise ValueError(f"box coordinates must be integers, got {b.tolist()}")
        for x0, y0, x1, y1 in b.astype(np.int64):
            masks[i, max(y0, 0) : max(min(y1, h), 0), max(x0, 0) : max(min(x1, w), 0)] = True
    return masks


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of ``[H, W]`` by a Euclidean disk of ``radius`` pixels."""
    r = int(math.floor(radius))
    if r <= 0:
        return mask
    h, w = mask.shape
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy == 0 and dx == 0) or dy * dy + dx * dx > radius * radius:
                continue
            src = mask[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
            out[max(dy, 0) : h - max(-dy, 0), max(dx, 0) : w - max(-dx, 0)] |= src
    return out


def pointing_game(
    relevance: np.ndarray,
    masks: np.ndarray,
    *,
    tolerance: float = 0,
    ties: Literal["all", "any", "first"] = "all",
) -> np.ndarray:
    """Pointing game of Zhang et al.: is the maximum of the relevance map on the object?

    ``relevance`` ``[B, C, H, W]`` (summed over channels) or ``[B, H, W]``; ``masks`` ``[B, H, W]`` bool (use
    :func:`boxes_to_masks` for bounding boxes).  A sample is a hit when the location of the maximal pixel relevance
    lies within Euclidean distance ``tolerance`` pixels of the mask (Zhang et al. use 15 px; default 0 = inside).

    Ties (several pixels attain the maximum, e.g. an all-zero map): ``"all"`` (default) counts a hit only if every
    maximal location is a hit, so a constant map cannot score by chance; ``"any"`` if at least one is;
    ``"first"`` uses the first maximum in row-major order (``np.argmax``).  Returns ``[B]`` bool; an empty mask
    is always a miss.
    """
    m = np.asarray(masks)
    pix = _pixel_map(relevance, m.ndim)
    m = _check_masks(m, pix.shape)
    if pix.ndim != 3:
        raise ValueError(f"expected masks [B, H, W], got shape {m.shape}")
    if ties not in ("all", "any", "first"):
        raise ValueError(f"ties must be 'all', 'any' or 'first', got {ties!r}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    hits = np.zeros(pix.shape[0], dtype=bool)
    for i in range(pix.shape[0]):
        target = _dilate(m[i], float(tolerance))
        p = pix[i]
        if ties == "first":
            hits[i] = bool(target.reshape(-1)[int(np.argmax(p))])
            continue
        at_max = p == p.max()
        hits[i] = bool(target[at_max].all() if ties == "all" else target[at_max].any())
    return hits


# ----------------------------------------------------------------------------------------------------------------
# 4. relevance mass ratios (Kohlbrenner et al. 2020)
# ----------------------------------------------------------------------------------------------------------------


def _positive_masses(relevance: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    m = np.asarray(masks)
    pix = _pixel_map(relevance, m.ndim)
    m = _check_masks(m, pix.shape)
    pos = np.clip(pix, 0.0, None).reshape(pix.shape[0], -1)
    flat_m = m.reshape(m.shape[0], -1)
    r_in = (pos * flat_m).sum(axis=1)
    r_tot = pos.sum(axis=1)
    s_in = flat_m.sum(axis=1)
    return r_in, r_tot, s_in, flat_m.shape[1]


def relevance_mass_ratio(relevance: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Inside-total relevance ratio mu of Kohlbrenner et al. (2020), eq. (5): ``mu = R_in / R_tot``.

    As in the paper, only positive relevance is counted: ``R_in`` is the sum of positive relevance inside the
    bounding box (mask), ``R_tot`` the sum of positive relevance over the whole image.  Pixel relevance is the
    relevance summed over channels (``relevance`` ``[B, C, H, W]``; ``[B, H, W]`` is taken as already summed) and
    then clipped at zero, i.e. ``R_in = sum_{p in mask} max(sum_c R[c, p], 0)``.  ``masks`` ``[B, H, W]`` bool
    (see :func:`boxes_to_masks`).  Returns ``[B]`` floats in ``[0, 1]``; NaN where ``R_tot == 0`` (no positive
    relevance, mu undefined).
    """
    r_in, r_tot, _, _ = _positive_masses(relevance, masks)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r_tot > 0, r_in / np.where(r_tot > 0, r_tot, 1.0), np.nan)


def weighted_relevance_mass_ratio(relevance: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Size-weighted ratio mu_w of Kohlbrenner et al. (2020), eq. (5): ``mu_w = mu * S_tot / S_in``.

    ``mu`` is :func:`relevance_mass_ratio` (positive relevance only, summed over channels per pixel), ``S_in`` the
    size of the bounding box (mask) and ``S_tot`` the size of the image, both in pixels (``H * W``).  Since
    ``S_tot / S_in >= 1``, mu_w emphasises small objects; it lies in ``[0, S_tot / S_in]`` and equals 1 for a map
    whose positive relevance is spread like a uniform one.  Returns ``[B]``; NaN where mu is undefined or the mask
    is empty.
    """
    r_in, r_tot, s_in, s_tot = _positive_masses(relevance, masks)
    ok = (r_tot > 0) & (s_in > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = r_in / np.where(r_tot > 0, r_tot, 1.0)
        return np.where(ok, mu * s_tot / np.where(s_in > 0, s_in, 1), np.nan)
