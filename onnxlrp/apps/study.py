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

__all__ = ["PERTURBATION_STEPS", "LocalizationTotals", "StudyTotals", "load_masks", "perturbation_region",
           "percent_key", "relevance_for", "results_csv", "save_plots", "table"]

#: Region perturbation: steps, and the region side (2 px below 112 px image side, 8 px from 112 px on).
PERTURBATION_STEPS = 20


def relevance_for(prepared: Prepared, x: np.ndarray, batch_size: int,
                  name: str = "the model") -> tuple[np.ndarray, np.ndarray, str]:
    """Relevance ``[N, ...]`` (float32) and the explained class ``[N]`` of every sample, batched; and the provider.
    A relevance with NaN or infinite values is an error naming the model (``name``) and the samples."""
    from onnxlrp.runtime import Explainer, non_finite_error

    explainer = Explainer(prepared.model, finite_only=False)
    rel, cls = [], []
    for i in range(0, len(x), batch_size):
        result = explainer(x[i : i + batch_size])
        relevance = np.asarray(result.relevance, dtype=np.float32)
        error = non_finite_error(name, [relevance], list(result.outputs.values()),
                                 [f"sample {i + j}" for j in range(len(relevance))], "nothing was written")
        if error:
            raise OnnxlrpError(error)
        rel.append(relevance)
        cls.append(np.asarray(result.explained_class).reshape(-1))
    return np.concatenate(rel), np.concatenate(cls).astype(np.int64), explainer.provider


def perturbation_region(chw: tuple[int, ...]) -> int:
    """2 px regions for small images (28 x 28), 8 px from a 112 px side on."""
    return 8 if len(chw) == 3 and min(chw[1:]) >= 112 else 2 if len(chw) == 3 else 1


class StudyTotals:
    """The numbers of the R-LRP paper's masked-input study and of MoRF region perturbation for one rule and one
    ranking (signed or ``absolute``, per input or per ``pixel``), summed batch by batch, so that a data set of any
    size is evaluated in constant memory: masked-input hits per percent (correctly classified samples, and all),
    the perturbation curves' sum, and the sum and sum of squares of the AOPC (Samek et al. 2017, Eq. 12)."""

    def __init__(self, percents: Sequence[float], *, absolute: bool, pixel: bool):
        self.percents, self.absolute, self.pixel = list(percents), absolute, pixel
        self.hits_correct = dict.fromkeys(self.percents, 0.0)
        self.hits_wrong = dict.fromkeys(self.percents, 0.0)
        self.n_correct = self.n = 0
        self.curve_sum = None
        self.aopc_sum = self.aopc_squares = 0.0
        self.region = self.steps = 0

    def add(self, forward: Forward, x: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
            relevance: np.ndarray, explained_class: np.ndarray, batch_size: int) -> None:
        """Add one batch (the model's input ``x``, its labels, predictions, relevance and explained classes)."""
        from onnxlrp.metrics import aopc, masked_accuracy, perturbation_curve

        correct = predicted == labels
        per_pixel = self.pixel and x.ndim >= 3
        # masking is per sample: the correctly and the wrongly classified samples are evaluated once each
        for mask, hits in ((correct, self.hits_correct), (~correct, self.hits_wrong)):
            if mask.any():
                acc = masked_accuracy(forward.logits, x[mask], labels[mask], relevance[mask], self.percents,
                                      absolute=self.absolute, per_pixel=per_pixel, batch_size=batch_size)
                for p in self.percents:
                    hits[p] += acc[p] * int(mask.sum())
        self.n_correct += int(correct.sum())
        self.n += len(x)
        self.region = perturbation_region(tuple(x.shape[1:]))
        if x.ndim == 4:
            cells = (math.ceil(x.shape[2] / self.region) * math.ceil(x.shape[3] / self.region)
                     * (1 if per_pixel else x.shape[1]))
        else:
            cells = int(np.prod(x.shape[2:] if per_pixel and x.ndim >= 3 else x.shape[1:]))
        self.steps = min(PERTURBATION_STEPS, cells)
        ranking = np.abs(relevance) if self.absolute else relevance

        def score(batch):
            return forward.logits(batch)[np.arange(len(batch)), explained_class]

        curve = perturbation_curve(score, x, ranking, steps=self.steps, region=self.region, order="morf",
                                   fill=0.0, per_pixel=per_pixel or x.ndim < 3)
        self.curve_sum = curve.sum(axis=0) if self.curve_sum is None else self.curve_sum + curve.sum(axis=0)
        areas = aopc(curve)
        self.aopc_sum += float(areas.sum())
        self.aopc_squares += float((areas**2).sum())

    def result(self) -> dict:
        n, n_correct = max(self.n, 1), max(self.n_correct, 1)
        mean = self.aopc_sum / n
        return {
            "accuracy_correct": {percent_key(p): float(self.hits_correct[p] / n_correct) for p in self.percents},
            "accuracy_all": {percent_key(p): float((self.hits_correct[p] + self.hits_wrong[p]) / n)
                             for p in self.percents},
            "perturbation_curve": [float(v) for v in self.curve_sum / n],
            "aopc": float(mean),
            "aopc_std": float(math.sqrt(max(self.aopc_squares / n - mean**2, 0.0))),
            "region": self.region,
            "steps": self.steps,
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


class LocalizationTotals:
    """Pointing game hit rate and the mean relevance mass ratios mu and mu_w (Kohlbrenner et al., Eq. 5), summed
    batch by batch (samples whose mask holds no positive relevance have no mu and are left out of its mean)."""

    def __init__(self):
        self.hits = self.n = 0.0
        self.sums = {"mu": [0.0, 0], "mu_w": [0.0, 0]}

    def add(self, relevance: np.ndarray, masks: np.ndarray) -> None:
        from onnxlrp.metrics import pointing_game, relevance_mass_ratio, weighted_relevance_mass_ratio

        self.hits += float(pointing_game(relevance, masks).sum())
        self.n += len(relevance)
        for key, ratio in (("mu", relevance_mass_ratio), ("mu_w", weighted_relevance_mass_ratio)):
            values = ratio(relevance, masks)
            finite = values[~np.isnan(values)]
            self.sums[key][0] += float(finite.sum())
            self.sums[key][1] += len(finite)

    def result(self) -> dict:
        return {"pointing_game": self.hits / max(self.n, 1),
                **{key: (total / count if count else float("nan")) for key, (total, count) in self.sums.items()}}
