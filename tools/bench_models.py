"""Models for the recurrent and quantized speed rows of docs/speed.md (tools/archs.py builds the float CNNs).

    python tools/bench_models.py --out DIR

writes, with seeded random weights:

* ``DIR/lstm2-h256-t100.onnx``: a 2-layer LSTM classifier (``torch.nn.LSTM(40, 256, num_layers=2,
  batch_first=True)`` on 100 steps of 40 features, a dense head on the last step's output, 12 classes), exported by
  torch's TorchScript exporter (opset 17, dynamic batch): two ONNX LSTM nodes;
* ``DIR/resnet50-qdq.onnx`` and ``DIR/resnet50-qoperator.onnx``: tools/archs.py's ResNet50, prepared by
  ``onnxruntime.quantization.quant_pre_process`` (BatchNormalization folded into the convolutions) and quantized by
  ``quantize_static`` (int8, per-tensor, calibrated on 4 random images) in the QDQ form and in the operator form
  (QLinearConv, QLinearAdd, QGemm, ...).

Then, e.g., ``python tools/bench.py --model DIR/lstm2-h256-t100.onnx --rule epsilon --batch 1 --threads 2
--repeats 15 --no-zennit``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import archs  # noqa: E402

LSTM_FEATURES, LSTM_HIDDEN, LSTM_STEPS, LSTM_CLASSES = 40, 256, 100, 12


def lstm_classifier(path: Path) -> None:
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(LSTM_FEATURES, LSTM_HIDDEN, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(LSTM_HIDDEN, LSTM_CLASSES)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y[:, -1])

    torch.manual_seed(0)
    module = Classifier().eval()
    x = torch.randn(1, LSTM_STEPS, LSTM_FEATURES)
    torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def quantized_resnet50(out: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, prepared = out / "resnet50-float.onnx", out / "resnet50-prepared.onnx"
    onnx.save(archs.onnx_model("resnet50", 0), str(float_path))
    quant_pre_process(str(float_path), str(prepared))

    class Images(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{archs.INPUT: rng.random((1, *archs.IMAGE), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    for name, form in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        quantize_static(str(prepared), str(out / f"resnet50-{name}.onnx"), Images(), quant_format=form)
    float_path.unlink()
    prepared.unlink()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lstm_classifier(args.out / f"lstm2-h{LSTM_HIDDEN}-t{LSTM_STEPS}.onnx")
    quantized_resnet50(args.out)
    print(f"wrote {sorted(p.name for p in args.out.glob('*.onnx'))}")


if __name__ == "__main__":
    main()
