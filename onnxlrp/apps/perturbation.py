"""``onnxlrp perturb``: relevance-weighted pixel perturbation (Groudiev, Sec. 3.3, Eq. 3.3.1, Fig. 3.6).

For each sample, pixels are drawn one after another without replacement with probability ``softmax(-R)``
(Eq. 3.3.1: the more relevant a pixel, the less likely it is drawn; ``R`` is the pixel's relevance, its channels
combined with the semiring's plus, log-domain semirings exponentiated as in the heatmaps), or uniformly (the
baseline). Drawing in the order of ``-R_i + G_i`` with Gumbel noise ``G_i`` is exactly such a draw and never
underflows. The first ``n`` drawn pixels are perturbed as in Fig. 3.5 (``x <- lo + hi - x`` on every channel, ``[lo,
hi]`` the data's range: ``255 - x`` for bytes) and the accuracy is measured for each ``n``, averaged over
``--repeats`` draws.

Writes ``perturbation.csv``, ``perturbation.json``, ``perturbation_accuracy.png`` and ``perturbation_gap.png`` (the
difference to the uniform baseline, Fig. 3.6's lower graph).
"""

from __future__ import annotations

import json

import click
import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import read_model, write_atomic
from onnxlrp.messages import show

from .files import check_out_dir, ensure_dir, write_bytes
from .in_memory import load_dataset
from .models import Forward, input_shape, prepare
from .rulespec import parse_rules
from .semiring_view import heatmap_view
from .study import relevance_for

UNIFORM = "uniform"


def perturbed(x: np.ndarray, order: np.ndarray, n: int, low: float, high: float) -> np.ndarray:
    """``x`` ``[N, C, H, W]`` with the first ``n`` pixels of each sample's ``order`` set to ``low + high - x``."""
    out = x.copy()
    flat = out.reshape(len(x), x.shape[1], -1)
    rows = np.arange(len(x))[:, None]
    chosen = order[:, :n]
    flat[rows, :, chosen] = (low + high - flat[rows, :, chosen])
    return out


def run_perturb(model, data: str, *, out_dir: str, rules: str = "lrp0,viterbi,boolean,counting",
                pixels: list[int] | None = None, repeats: int = 3, seed: int = 0, preprocess: str = "none",
                limit: int | None = None, batch_size: int = 128, input_shapes=None) -> dict:
    """Accuracy against the number of perturbed pixels for each rule's ``softmax(-R)`` draws and uniform draws."""
    from onnxlrp.heatmap import save_plot

    if repeats < 1:
        raise OnnxlrpError(f"--repeats must be at least 1, got {repeats}")
    check_out_dir(out_dir)
    source, _ = read_model(model)
    _, chw = input_shape(source, model, input_shapes)
    if len(chw) != 3:
        raise OnnxlrpError(f"{show(model)}: perturb needs image inputs [N, C, H, W], not [N, {list(chw)}]")
    dataset = load_dataset(source, model, data, preprocess, limit, input_shapes)
    x, labels = dataset.x, dataset.labels
    area = chw[1] * chw[2]
    pixels = sorted(set(pixels)) if pixels else sorted({int(round(v)) for v in np.linspace(0, area // 2, 11)})
    if pixels[0] < 0 or pixels[-1] > area:
        raise OnnxlrpError(f"--pixels must lie in 0..{area}")
    low, high = float(x.min()), float(x.max())
    relevances, forward = {}, None
    for spec in parse_rules(rules):
        prepared = prepare(source, shown_as=model, rule=spec.rule, input_shapes=input_shapes, **spec.params)
        relevance, _, _ = relevance_for(prepared, x, batch_size)
        view = heatmap_view(prepared.model)
        per_pixel = np.stack([np.asarray(view(r), dtype=np.float64) if r.ndim == 3 else r for r in relevance])
        relevances[spec.label] = per_pixel.reshape(len(x), -1)
        forward = forward or Forward(prepared, batch_size)
    rng = np.random.default_rng(seed)
    results = {"model": show(model) if not hasattr(model, "graph") else "model", "data": dataset.source,
               "samples": int(len(x)), "pixels": pixels, "repeats": repeats, "range": [low, high], "methods": {}}
    for method in [UNIFORM, *relevances]:
        runs = []
        for _ in range(repeats):
            r = relevances.get(method)
            keys = rng.gumbel(size=(len(x), area)) - (r if r is not None else 0.0)
            order = np.argsort(-keys, axis=1, kind="stable")
            runs.append([float((forward.logits(perturbed(x, order, n, low, high)).argmax(axis=1) == labels).mean())
                         for n in pixels])
        results["methods"][method] = {"accuracy": np.mean(runs, axis=0).tolist(), "runs": runs}
        click.echo(f"{method}: accuracy " + " ".join(f"{a:.3f}" for a in results["methods"][method]["accuracy"]))
    base = np.asarray(results["methods"][UNIFORM]["accuracy"])
    for entry in results["methods"].values():
        entry["gap_to_uniform"] = (np.asarray(entry["accuracy"]) - base).tolist()
    out = ensure_dir(out_dir)
    write_bytes(out / "perturbation.json", json.dumps(results, indent=1).encode())
    rows = ["method,pixels,accuracy,gap_to_uniform"] + [
        f"{m},{n},{a:.6f},{g:.6f}" for m, e in results["methods"].items()
        for n, a, g in zip(pixels, e["accuracy"], e["gap_to_uniform"], strict=True)]
    write_bytes(out / "perturbation.csv", ("\n".join(rows) + "\n").encode())
    for key, name, label in (("accuracy", "perturbation_accuracy.png", "accuracy"),
                             ("gap_to_uniform", "perturbation_gap.png", "accuracy - uniform draws")):
        write_atomic(out / name, lambda tmp, key=key, label=label: save_plot(
            tmp, pixels, {m: e[key] for m, e in results["methods"].items()},
            title=f"P = softmax(-R) (Eq. 3.3.1): {len(x)} samples x {repeats} draws",
            xlabel="pixels perturbed (x <- lo + hi - x)", ylabel=label))
    click.echo(f"wrote perturbation.csv, perturbation.json and the plots to {show(out)}")
    return results
