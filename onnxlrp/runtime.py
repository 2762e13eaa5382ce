"""Run a compiled model with onnxruntime: CUDA when a GPU is usable, the CPU otherwise."""

from __future__ import annotations

import ctypes
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .compiler import compile as compile_model
from .compiler import is_compiled
from .contract import CLASS_OUTPUT, PREDICTED, RELEVANCE_OUTPUT, TARGET_INPUT, is_relevance_output
from .errors import OnnxlrpError
from .io import EXTERNAL_DATA_THRESHOLD, read_model, save_model_atomic
from .io.wire import serialized_size
from .messages import first_line

LARGE_MODEL_BYTES = EXTERNAL_DATA_THRESHOLD  # larger models cannot be passed to onnxruntime as bytes


def cuda_usable() -> bool:
    """True when onnxruntime has the CUDA provider and the NVIDIA driver library loads (no logging either way)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    try:
        ort.preload_dlls()
    except Exception:  # preload is best-effort: the session creation below decides
        pass
    return True


def make_session(model: onnx.ModelProto, providers: list[str] | None = None, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if providers is None:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_usable() else ["CPUExecutionProvider"]
    try:
        if serialized_size(model) < LARGE_MODEL_BYTES:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="onnxlrp-") as folder:  # past 2 GB: weights as external data
            path = save_model_atomic(model, Path(folder) / "model.onnx")
            return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:
        raise OnnxlrpError(f"onnxruntime cannot run the compiled model: {first_line(err)}") from err


def batch_size(session, feeds: dict[str, np.ndarray]) -> int:
    """The batch that ``target`` covers: its declared length, or the length of the data input's axis that shares its
    symbolic dim (a time-major sequence model reads ``[T, B, ...]``), or the first input's first axis."""
    declared = {i.name: i.shape for i in session.get_inputs()}
    dim = (declared.get(TARGET_INPUT) or [None])[0]
    if isinstance(dim, int) and dim > 0:
        return dim
    for name, value in feeds.items():
        shape = declared.get(name) or []
        if isinstance(dim, str) and dim in shape:
            return np.shape(value)[shape.index(dim)]
    return len(next(iter(feeds.values())))


def with_target(session, feeds: dict[str, np.ndarray], target=None) -> dict[str, np.ndarray]:
    """``feeds`` plus ``target`` as the compiled model takes it: int64 ``[batch]``, one class per sample, -1 (the
    predicted class) where ``target`` is None; a single value applies to every sample. A model compiled by an older
    onnxlrp (``target`` an initializer-backed default, not among ``session.get_inputs()``) gets it only when given."""
    if TARGET_INPUT not in {i.name for i in session.get_inputs()} and target is None:
        return dict(feeds)
    value = np.asarray(PREDICTED if target is None else target, dtype=np.int64).reshape(-1)
    if value.size == 1:
        value = np.repeat(value, batch_size(session, feeds))
    return dict(feeds) | {TARGET_INPUT: value}


@dataclass
class Explanation:
    """The original outputs (by name), the relevance (one array, or one per float input) and the class."""

    outputs: dict[str, np.ndarray]
    relevance: np.ndarray | dict[str, np.ndarray]
    explained_class: np.ndarray


class Explainer:
    """``Explainer(model_or_path, rule="rlrp")(x, target=None) -> Explanation``; ``target`` None (or -1) explains
    the predicted class, an int every sample's, a sequence one class per sample."""

    def __init__(self, model_or_path, rule: str = "rlrp", providers: list[str] | None = None, threads=None,
                 **compile_kwargs):
        model, _ = read_model(model_or_path)
        # compiled from what was given, so that a file's compiled model records the file's sha256
        self.model = model if is_compiled(model) else compile_model(model_or_path, rule, **compile_kwargs)
        self.session = make_session(self.model, providers, threads)
        self.provider = self.session.get_providers()[0]
        names = [i.name for i in self.session.get_inputs()]
        self.data_inputs = [n for n in names if n != TARGET_INPUT]
        self.relevance_outputs = [o.name for o in self.session.get_outputs() if is_relevance_output(o.name)]
        self.original_outputs = [o.name for o in self.session.get_outputs()
                                 if o.name not in self.relevance_outputs and o.name != CLASS_OUTPUT]

    def __call__(self, *inputs, target=None, **named) -> Explanation:
        feeds = dict(zip(self.data_inputs, inputs, strict=False)) | named
        missing = [n for n in self.data_inputs if n not in feeds]
        if missing:
            raise OnnxlrpError(f"missing input(s): {', '.join(missing)}")
        feeds = with_target(self.session, {k: np.asarray(v) for k, v in feeds.items()}, target)
        results = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds), strict=True))
        relevance = {k: results[k] for k in self.relevance_outputs}
        return Explanation(
            outputs={k: results[k] for k in self.original_outputs},
            relevance=relevance[RELEVANCE_OUTPUT] if list(relevance) == [RELEVANCE_OUTPUT] else relevance,
            explained_class=results[CLASS_OUTPUT],
        )
