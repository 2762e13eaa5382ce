"""The numbers ``onnxlrp evaluate`` reports per rule: the R-LRP paper's masked-input accuracy, MoRF region
perturbation (AOPC) and, with masks, localization; and how they are written (CSV, text table, plots)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import write_atomic
from onnxlrp.messages import show
from onnxlrp.naming import escape_terminal

from .models import Forward, Prepared

__all__ = ["PERTURBATION_STEPS", "load_masks", "localization", "perturbation_region", "relevance_for",
           "percent_key", "results_csv", "save_plots", "study", "table"]

#: Region perturbation: steps, and the region side (2 px below 112 px image side, 8 px from 112 px on).
PERTURBATION_STEPS = 20


def relevance_for(prepared: Prepared, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Relevance ``[N, ...]`` (float32) and the explained class ``[N]`` of every sample, batched; and the provider."""
    from onnxlrp.runtime import Explainer

    explainer = Explainer(prepared.model)
    rel, cls = [], []
    for i in range(0, len(x), batch_size):
        result = explainer(x[i : i + batch_size])
        rel.append(np.asarray(result.relevance, dtype=np.float32))
        cls.append(np.asarray(result.explained_class).reshape(-1))
    return np.concatenate(rel), np.concatenate(cls).astype(np.int64), explainer.provider


def perturbation_region(chw: tuple[int, ...]) -> int:
    """2 px regions for small images (28 x 28), 8 px from a 112 px side on."""
    return 8 if len(chw) == 3 and min(chw[1:]) >= 112 else 2 if len(chw) == 3 else 1


def study(forward: Forward, x: np.ndarray, labels: np.ndarray, predicted: np.ndarray, relevance: np.ndarray,
          explained_class: np.ndarray, percents: Sequence[float], *, absolute: bool, pixel: bool,
          batch_size: int) -> dict:
    """Masked-input accuracies (correctly classified samples, and all samples) and the MoRF perturbation curve."""
    from onnxlrp.metrics import aopc, masked_accuracy, perturbation_curve

    def predict(batch):
        return forward.logits(batch)

    correct = predicted == labels
    n_correct, n_wrong = int(correct.sum()), int((~correct).sum())
    per_pixel = pixel and x.ndim >= 3
    # masking is per sample: the correctly and the wrongly classified samples are evaluated once each, and the
    # accuracy on all samples is their weighted sum
    acc_correct = masked_accuracy(predict, x[correct], labels[correct], relevance[correct], percents,
                                  absolute=absolute, per_pixel=per_pixel, batch_size=batch_size)
    acc_wrong = masked_accuracy(predict, x[~correct], labels[~correct], relevance[~correct], percents,
                                absolute=absolute, per_pixel=per_pixel, batch_size=batch_size) if n_wrong else {}
    acc_all = {p: (acc_correct[p] * n_correct + (acc_wrong[p] * n_wrong if n_wrong else 0.0)) / len(x)
               for p in acc_correct}
    region = perturbation_region(tuple(x.shape[1:]))
    ranking = np.abs(relevance) if absolute else relevance
    if x.ndim == 4:
        cells = math.ceil(x.shape[2] / region) * math.ceil(x.shape[3] / region) * (1 if per_pixel else x.shape[1])
    else:
        cells = int(np.prod(x.shape[2:] if per_pixel and x.ndim >= 3 else x.shape[1:]))
    steps = min(PERTURBATION_STEPS, cells)
    curves = []
    for i in range(0, len(x), batch_size):
        cls = explained_class[i : i + batch_size]

        def score(batch, cls=cls):
            return forward.logits(batch)[np.arange(len(batch)), cls]

        curves.append(perturbation_curve(score, x[i : i + batch_size], ranking[i : i + batch_size], steps=steps,
                                         region=region, order="morf", fill=0.0, per_pixel=per_pixel or x.ndim < 3))
    curve = np.concatenate(curves)
    return {
        "accuracy_correct": {percent_key(p): float(v) for p, v in acc_correct.items()},
        "accuracy_all": {percent_key(p): float(v) for p, v in acc_all.items()},
        "perturbation_curve": [float(v) for v in curve.mean(axis=0)],
        "aopc": float(aopc(curve).mean()),
        "aopc_std": float(aopc(curve).std()),
        "region": region,
        "steps": steps,
    }


def percent_key(p: float) -> str:
    """A percentage as the key of the results dict (``5``, ``2.5``)."""
    return f"{float(p):g}"


def results_csv(results: dict) -> str:
    """One row per number: rule, metric, x (percent or step), value."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rule", "metric", "x", "value"])
    w.writerow(["", "model_accuracy_all", "", f"{results['model_accuracy']:.6g}"])
    w.writerow(["", "samples", "", results["samples"]])
    w.writerow(["", "correctly_classified", "", results["correctly_classified"]])
    for label, r in results["rules"].items():
        for metric in ("accuracy_correct", "accuracy_all"):
            for p, v in r[metric].items():
                w.writerow([label, metric, p, f"{v:.6g}"])
        for k, v in enumerate(r["perturbation_curve"]):
            w.writerow([label, "perturbation_score_mean", k, f"{v:.6g}"])
        w.writerow([label, "aopc", "", f"{r['aopc']:.6g}"])
        w.writerow([label, "aopc_std", "", f"{r['aopc_std']:.6g}"])
        for metric, value in r.get("localization", {}).items():
            w.writerow([label, metric, "", f"{value:.6g}"])
        w.writerow([label, "relevance_seconds", "", f"{r['relevance_seconds']:.3g}"])
    return buf.getvalue()


def table(results: dict, metric: str = "accuracy_correct") -> list[str]:
    """A compact text table: one row per rule, accuracy per percent, AOPC."""
    rules = results["rules"]
    percents = results["percents"]
    width = max([len("rule")] + [len(k) for k in rules]) + 2
    head = "rule".ljust(width) + "".join(f"{percent_key(p) + '%':>7}" for p in percents) + f"{'AOPC':>8}"
    lines = [head]
    for label, r in rules.items():
        values = "".join(f"{r[metric][percent_key(p)]:7.3f}" for p in percents)
        lines.append(escape_terminal(label).ljust(width) + values + f"{r['aopc']:8.3f}")
    return lines


def save_plots(results: dict, out: Path, prefix: str = "", title_suffix: str = "") -> list[Path]:
    """``<prefix>masked_accuracy.png`` and ``<prefix>aopc.png`` (atomically)."""
    from onnxlrp.heatmap import save_plot

    percents = results["percents"]
    rules = results["rules"]
    curves = {label: [r["accuracy_correct"][percent_key(p)] for p in percents] for label, r in rules.items()}
    n = results["correctly_classified"]
    acc_path = out / f"{prefix}masked_accuracy.png"
    write_atomic(acc_path, lambda tmp: save_plot(
        tmp, percents, curves, title=f"Masked-input accuracy ({results['ranking']}, per {results['unit']}; "
        f"{n} correct samples){title_suffix}", xlabel="% most relevant inputs kept (others set to 0)",
        ylabel="accuracy", ylim=(0.0, 1.02)))
    first = next(iter(rules.values()))
    steps = list(range(len(first["perturbation_curve"])))
    pert = {f"{label} (AOPC {r['aopc']:.2f})": r["perturbation_curve"] for label, r in rules.items()}
    aopc_path = out / f"{prefix}aopc.png"
    write_atomic(aopc_path, lambda tmp: save_plot(
        tmp, steps, pert, title=f"Region perturbation, MoRF ({first['region']}x{first['region']} regions, fill 0)"
        f"{title_suffix}", xlabel="regions removed (most relevant first)",
        ylabel="mean explained value of the class"))
    return [acc_path, aopc_path]


def load_masks(path, count: int, hw: tuple[int, int]) -> np.ndarray:
    """Object masks [N, H, W] from a .npz holding ``masks`` ([N, H, W], nonzero = object) or ``boxes``
    ([N, 4], x0, y0, x1, y1 with exclusive ends), one per sample, in the order of the data."""
    from onnxlrp.metrics import boxes_to_masks

    where = show(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise OnnxlrpError(f"{where}: not a readable .npz with masks or boxes ({err})") from None
    if "masks" in arrays:
        masks = arrays["masks"].astype(bool)
        if masks.ndim != 3 or masks.shape[1:] != tuple(hw):
            raise OnnxlrpError(f"{where}: masks have shape {list(masks.shape)}, expected [N, {hw[0]}, {hw[1]}]")
    elif "boxes" in arrays:
        boxes = arrays["boxes"]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise OnnxlrpError(f"{where}: boxes have shape {list(boxes.shape)}, expected [N, 4]")
        masks = boxes_to_masks(boxes, tuple(hw))
    else:
        raise OnnxlrpError(f"{where}: holds neither 'masks' nor 'boxes'")
    if len(masks) < count:
        raise OnnxlrpError(f"{where}: {len(masks)} masks for {count} samples")
    return masks[:count]


def localization(relevance: np.ndarray, masks: np.ndarray) -> dict:
    """Pointing game hit rate and the mean relevance mass ratios mu and mu_w (Kohlbrenner et al., Eq. 5)."""
    from onnxlrp.metrics import pointing_game, relevance_mass_ratio, weighted_relevance_mass_ratio

    return {"pointing_game": float(pointing_game(relevance, masks).mean()),
            "mu": float(np.nanmean(relevance_mass_ratio(relevance, masks))),
            "mu_w": float(np.nanmean(weighted_relevance_mass_ratio(relevance, masks)))}
