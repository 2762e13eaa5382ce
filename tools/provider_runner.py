"""Run the compiled models of a provider-matrix folder with one onnxruntime execution provider.

    python tools/provider_runner.py PROVIDER FOLDER      # PROVIDER: cpu, openvino, cuda, tensorrt

Needs only onnxruntime (or a build of it such as onnxruntime-openvino) and numpy, so that it runs in a virtual
environment of its own (tools/provider_matrix.py starts it there). ``FOLDER/manifest.json`` lists the cases
(``{"id", "model", "input", "input_name"}``); each case's relevance and explained class go to
``FOLDER/PROVIDER/CASE.npz``, and ``FOLDER/PROVIDER/status.json`` says, per case, which provider ran it (the first of
``session.get_providers()``: onnxruntime falls back to the CPU where a provider is missing), the seconds, and the
error if there was one.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    # the CPU device in float32: OpenVINO's CPU plugin may otherwise infer in bf16 where the processor has it
    "openvino": [("OpenVINOExecutionProvider", {"device_type": "CPU", "precision": "FP32"}), "CPUExecutionProvider"],
    # TF32 off: its 10-bit mantissas are far from the 1e-5 agreement asked of the relevance
    "cuda": [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
    "tensorrt": [("TensorrtExecutionProvider", {"trt_fp16_enable": "False"}), ("CUDAExecutionProvider",
                                                                            {"use_tf32": "0"}), "CPUExecutionProvider"],
}


def file_name(case_id: str) -> str:
    return case_id.replace("/", "__")


def main(argv: list[str]) -> int:
    provider, folder = argv[0], Path(argv[1])
    out = folder / provider
    out.mkdir(exist_ok=True)
    status = {"onnxruntime": ort.__version__, "available": ort.get_available_providers(), "cases": {}}
    for case in json.loads((folder / "manifest.json").read_text()):
        start = time.perf_counter()
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 2  # warnings and errors reach stderr, which the matrix keeps
            session = ort.InferenceSession(str(folder / case["model"]), options, providers=PROVIDERS[provider])
            x = np.load(folder / case["input"])
            relevance, explained = session.run(["relevance", "explained_class"],
                                               {case["input_name"]: x, "target": np.full(len(x), -1)})
            np.savez(out / f"{file_name(case['id'])}.npz", relevance=relevance, explained_class=explained)
            status["cases"][case["id"]] = {"ran_on": session.get_providers()[0],
                                           "seconds": time.perf_counter() - start}
        except Exception as err:  # noqa: BLE001 - any failure is a cell of the matrix
            status["cases"][case["id"]] = {"error": str(err).splitlines()[0][:300] if str(err) else type(err).__name__}
        print(f"{provider} {case['id']}: {status['cases'][case['id']]}", flush=True)
    (out / "status.json").write_text(json.dumps(status, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
