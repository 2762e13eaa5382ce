"""``onnxlrp evaluate --flip K``: the Keras LRP thesis's validation (its Sec. 5.1): flip the K least relevant inputs of
each sample, and separately its K most relevant, and measure how the explained class's score changes.

If the relevance is right, flipping the inputs that speak most *for* the class lowers its score, and flipping those
that speak most *against* it (the least relevant, the most negative relevance) raises it. The thesis reports 100 %
worse and 83 % better on 500 MNIST digits.

Flipping (:func:`flip`): ``x -> 1 - x`` for inputs in ``[0, 1]`` (a white pixel becomes black: the value stays in
the range the model was trained on), ``x -> -x`` for any other input (centred data; the thesis's "multiply by -1").
``--flip-mode`` forces either. The score is the model's class score as printed by ``explain`` (the Softmax
probability when the model has one, as in the thesis), and the explained tensor (the logits) beside it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import click
import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import read_model, sigterm_guard, write_atomic
from onnxlrp.messages import show
from onnxlrp.naming import escape_terminal

from .files import check_out_dir, ensure_dir, write_bytes
from .in_memory import load_dataset
from .models import forward_model, prepare
from .rulespec import parse_rules
from .study import relevance_for

__all__ = ["FLIP_MODES", "THESIS", "flip", "flip_changes", "run_flip", "summarize"]

FLIP_MODES = ("auto", "invert", "negate")
#: The thesis's numbers (Sec. 5.1, 500 MNIST digits, K = 10, a Softmax probability as the score).
THESIS = {"least": {"mean": 0.016, "std": 0.056, "improved": 0.83, "worsened": 0.17, "max": 0.523, "min": -0.046},
          "most": {"mean": -0.138, "std": 0.217, "improved": 0.0, "worsened": 1.0, "max": 0.0, "min": -0.941}}


def flip_mode(x: np.ndarray, mode: str) -> str:
    """``invert`` (1 - x) or ``negate`` (-x); ``auto``: invert when every value lies in [0, 1]."""
    if mode not in FLIP_MODES:
        raise OnnxlrpError(f"--flip-mode {mode!r}: valid: {', '.join(FLIP_MODES)}")
    if mode != "auto":
        return mode
    return "invert" if float(x.min()) >= 0.0 and float(x.max()) <= 1.0 else "negate"


def flip(x: np.ndarray, ranking: np.ndarray, k: int, *, most: bool, mode: str, pixel: bool) -> np.ndarray:
    """``x`` [N, ...] with the ``k`` inputs of highest (``most``) or lowest ``ranking`` per sample flipped. With
    ``pixel``, ``ranking`` [N, C, H, W] is summed over channels and a chosen pixel is flipped in every channel."""
    n = len(x)
    score = ranking.sum(axis=1) if pixel else ranking
    flat = score.reshape(n, -1)
    order = np.argsort(-flat if most else flat, axis=1, kind="stable")[:, :k]
    chosen = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(chosen, order, True, axis=1)
    chosen = chosen.reshape(score.shape)
    if pixel:
        chosen = np.broadcast_to(chosen[:, None], x.shape)
    flipped = 1.0 - x if mode == "invert" else -x
    return np.where(chosen, flipped, x).astype(x.dtype)


def flip_changes(scores, x: np.ndarray, relevance: np.ndarray, classes: np.ndarray, k: int, *, mode: str,
                 pixel: bool) -> dict[str, dict[str, np.ndarray]]:
    """Per output (``scores(x) -> {name: [N, K]}``) and per flip (``least``, ``most``): the score of the explained
    class after the flip minus before, one value per sample."""
    rows = np.arange(len(x))
    before = {name: s[rows, classes] for name, s in scores(x).items()}
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in before}
    for which in ("least", "most"):
        after = scores(flip(x, relevance, k, most=which == "most", mode=mode, pixel=pixel))
        for name, s in after.items():
            out[name][which] = s[rows, classes] - before[name]
    return out


def summarize(change: np.ndarray) -> dict:
    """Mean, standard deviation, the shares of samples whose score rose, fell or stayed, and the extremes."""
    return {"samples": int(change.size), "mean": float(change.mean()), "std": float(change.std()),
            "improved": float((change > 0).mean()), "worsened": float((change < 0).mean()),
            "unchanged": float((change == 0).mean()), "max": float(change.max()), "min": float(change.min())}


class Scores:
    """The model's score output and its explained tensor, batched."""

    def __init__(self, prepared, batch_size: int):
        from onnxlrp.runtime import make_session

        self.names = list(dict.fromkeys([prepared.score, prepared.explained]))
        self.input = prepared.input_name
        self.session = make_session(forward_model(prepared.model, self.names))
        self.batch_size = batch_size

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        parts: dict[str, list] = {n: [] for n in self.names}
        for i in range(0, len(x), self.batch_size):
            chunk = np.ascontiguousarray(x[i : i + self.batch_size], dtype=np.float32)
            for name, value in zip(self.names, self.session.run(self.names, {self.input: chunk}), strict=True):
                parts[name].append(np.asarray(value, dtype=np.float64).reshape(len(chunk), -1))
        return {n: np.concatenate(v) for n, v in parts.items()}


def summary_csv(results: dict) -> str:
    buf = io.StringIO()
    fields = ["rule", "output", "flipped", "k", "samples", "mean", "std", "improved", "worsened", "unchanged", "max",
              "min"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for label, per_output in results["rules"].items():
        for output, per_flip in per_output.items():
            for which, s in per_flip.items():
                writer.writerow({"rule": label, "output": output, "flipped": which, "k": results["k"], **s})
    return buf.getvalue()


def samples_csv(changes: dict, classes: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rule", "output", "sample", "class", "change_least", "change_most"])
    for label, per_output in changes.items():
        for output, per_flip in per_output.items():
            for i, (a, b) in enumerate(zip(per_flip["least"], per_flip["most"], strict=True)):
                writer.writerow([label, output, i, int(classes[label][i]), f"{a:.6g}", f"{b:.6g}"])
    return buf.getvalue()


def save_flip_plot(path: Path, changes: dict, k: int) -> None:
    """Histograms of the change per rule, one row per output (the score, the explained tensor): the K least
    relevant inputs flipped (left), the K most (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    outputs = list(next(iter(changes.values())))
    fig = Figure(figsize=(10, 3.6 * len(outputs)), dpi=100)
    FigureCanvasAgg(fig)
    for row, output in enumerate(outputs):
        for col, which in enumerate(("least", "most")):
            ax = fig.add_subplot(len(outputs), 2, 2 * row + col + 1)
            values = [per_output[output][which] for per_output in changes.values()]
            low, high = min(v.min() for v in values), max(v.max() for v in values)
            bins = np.linspace(low, high, 41) if high > low else 10
            for label, per_output in changes.items():
                change = per_output[output][which]
                ax.hist(change, bins=bins, histtype="step", linewidth=1.5,
                        label=f"{label}: {(change > 0).mean():.0%} up, {(change < 0).mean():.0%} down")
            ax.axvline(0.0, color="grey", linewidth=0.8)
            ax.set_title(f"{k} {which} relevant inputs flipped", fontsize=10)
            ax.set_xlabel(f"change of {output} at the explained class", fontsize=9)
            ax.set_ylabel("samples")
            ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def run_flip(model, *, k: int, data="builtin:digits", rules="rlrp,lrp0,epsilon", mode="auto", pixel=False,
             limit=None, preprocess="none", out_dir="onnxlrp-evaluate", batch_size=128) -> dict:
    """The flip test per rule; writes ``flip.json``, ``flip.csv`` (the summary), ``flip_samples.csv`` (every
    sample's change) and ``flip.png``; returns the results dict."""
    from onnxlrp.compiler import is_compiled

    if k < 1:
        raise OnnxlrpError(f"--flip must be at least 1, got {k}")
    if batch_size < 1:
        raise OnnxlrpError(f"--batch-size must be at least 1, got {batch_size}")
    check_out_dir(out_dir)
    specs = parse_rules(rules)
    source, _ = read_model(model)
    if is_compiled(source):
        raise OnnxlrpError(f"{show(model)}: is compiled already; evaluate needs the plain model (it compiles one "
                           "per rule)")
    dataset = load_dataset(source, model, data, preprocess, limit)
    x = dataset.x
    size = int(np.prod(x.shape[2:] if pixel else x.shape[1:]))
    if k > size:
        raise OnnxlrpError(f"--flip {k}: a sample has only {size} {'pixels' if pixel else 'inputs'}")
    if pixel and x.ndim != 4:
        raise OnnxlrpError("--pixel needs image samples [N, C, H, W]")
    chosen_mode = flip_mode(x, mode)
    results = {"model": str(model), "data": dataset.source, "samples": int(len(x)), "k": k, "mode": chosen_mode,
               "flip": "x -> 1 - x" if chosen_mode == "invert" else "x -> -x", "unit": "pixel" if pixel else "input",
               "rules": {}}
    changes, classes = {}, {}
    scores = None
    with sigterm_guard("onnxlrp evaluate"):
        for spec in specs:
            prepared = prepare(source, shown_as=model, rule=spec.rule, **spec.params)
            if tuple(x.shape[1:]) != tuple(prepared.chw):
                raise OnnxlrpError(f"{escape_terminal(dataset.source)}: samples have shape {list(x.shape[1:])}, the "
                                   f"model takes {list(prepared.chw)}")
            relevance, explained_class, _ = relevance_for(prepared, x, batch_size)
            scores = scores or Scores(prepared, batch_size)
            changes[spec.label] = flip_changes(scores, x, relevance, explained_class, k, mode=chosen_mode,
                                               pixel=pixel)
            classes[spec.label] = explained_class
            results["rules"][spec.label] = {output: {which: summarize(c) for which, c in per_flip.items()}
                                            for output, per_flip in changes[spec.label].items()}
            s = results["rules"][spec.label][scores.names[0]]
            click.echo(f"{escape_terminal(spec.label)}: {k} least relevant flipped: mean change "
                       f"{s['least']['mean']:+.4g}, {s['least']['improved']:.0%} improve; {k} most relevant: mean "
                       f"{s['most']['mean']:+.4g}, {s['most']['worsened']:.0%} worsen")
        results["score"] = scores.names[0]
        out = ensure_dir(out_dir)
        write_bytes(out / "flip.json", (json.dumps(results, indent=1) + "\n").encode())
        write_bytes(out / "flip.csv", summary_csv(results).encode())
        write_bytes(out / "flip_samples.csv", samples_csv(changes, classes).encode())
        save_flip_plot(out / "flip.png", changes, k)
    click.echo(f"{len(x)} samples, flips {results['flip']} ({chosen_mode}); the score is {scores.names[0]!r}; wrote "
               f"{show(out / 'flip.csv')}, flip_samples.csv, flip.json, flip.png")
    return results

