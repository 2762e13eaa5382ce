"""Run a compiled model with onnxruntime: CUDA when a GPU is usable, the CPU otherwise."""

from __future__ import annotations

import ctypes
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .compiler import compile as compile_model
from .compiler import is_compiled
from .contract import CLASS_OUTPUT, RELEVANCE_OUTPUT, TARGET_INPUT, is_relevance_output
from .errors import OnnxlrpError
from .io import EXTERNAL_DATA_THRESHOLD, read_model, save_model_atomic
from .io.wire import serialized_size
from .messages import first_line, show

LARGE_MODEL_BYTES = EXTERNAL_DATA_THRESHOLD  # larger models cannot be passed to onnxruntime as bytes
MAX_SAMPLES_LISTED = 5  # samples named in the error line of a non-finite relevance


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


@dataclass
class Explanation:
    """The original outputs (by name), the relevance (one array, or one per float input) and the class."""

    outputs: dict[str, np.ndarray]
    relevance: np.ndarray | dict[str, np.ndarray]
    explained_class: np.ndarray


class Explainer:
    """``Explainer(model_or_path, rule="rlrp")(x, target=None) -> Explanation``.

    A relevance map with a NaN or an infinity is never returned: the call raises :class:`OnnxlrpError` with one
    line naming the model (``name``, or the file given) and the samples (:func:`non_finite_error`). The compiled
    graphs keep relevance in float32's range, so this means that the model's own outputs are not finite for those
    samples, or a defect. ``finite_only=False`` returns such maps, for callers that name the samples themselves."""

    def __init__(self, model_or_path, rule: str = "rlrp", providers: list[str] | None = None, threads=None,
                 name: str | None = None, finite_only: bool = True, **compile_kwargs):
        self.name = name or (show(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else "the model")
        self.finite_only = finite_only
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
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        if target is not None:
            batch = len(next(iter(feeds.values())))
            feeds[TARGET_INPUT] = np.broadcast_to(np.asarray(target, dtype=np.int64), (batch,)).copy()
        results = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds), strict=True))
        relevance = {k: results[k] for k in self.relevance_outputs}
        if self.finite_only:
            error = non_finite_error(self.name, list(relevance.values()), [results[k] for k in self.original_outputs])
            if error:
                raise OnnxlrpError(error)
        return Explanation(
            outputs={k: results[k] for k in self.original_outputs},
            relevance=relevance[RELEVANCE_OUTPUT] if list(relevance) == [RELEVANCE_OUTPUT] else relevance,
            explained_class=results[CLASS_OUTPUT],
        )


def non_finite_samples(relevance: list[np.ndarray]) -> list[int]:
    """Indices (batch axis) of the samples whose relevance holds a NaN or an infinity."""
    bad: set[int] = set()
    for r in relevance:
        r = np.asarray(r)
        if r.ndim and not np.isfinite(r).all():
            bad |= set(np.flatnonzero(~np.isfinite(r.reshape(len(r), -1)).all(axis=1)).tolist())
    return sorted(bad)


def non_finite_error(name: str, relevance: list[np.ndarray], outputs: list[np.ndarray],
                     samples: list[str] | None = None, ending: str = "nothing was returned") -> str | None:
    """The one-line refusal of a relevance with NaN or infinite values (None when every value is finite): the model
    ``name``, the samples (``samples[index]``, or ``sample <index>``) and whether the model's own float outputs were
    finite (then the map is a defect of onnxlrp, which keeps relevance in range)."""
    bad = non_finite_samples(relevance)
    if not bad:
        return None
    names = [f"sample {i}" if samples is None else samples[i] for i in bad]
    listed = ", ".join(names[:MAX_SAMPLES_LISTED]) + (f" and {len(names) - MAX_SAMPLES_LISTED} more"
                                                       if len(names) > MAX_SAMPLES_LISTED else "")
    floats = [np.asarray(v) for v in outputs if np.asarray(v).dtype.kind == "f"]
    cause = ("the model's own outputs are not finite either" if not all(np.isfinite(v).all() for v in floats) else
             "the model's outputs are finite, so this is a defect of onnxlrp (please report it)")
    return f"{name}: the relevance of {listed} is not finite (NaN or infinite); {cause}; {ending}"

