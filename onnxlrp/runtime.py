"""Run a compiled model with onnxruntime: CUDA when a GPU is usable, the CPU otherwise."""

from __future__ import annotations

import ctypes
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .compiler import compile as compile_model
from .compiler import is_compiled
from .contract import CLASS_OUTPUT, PREDICTED, RELEVANCE_OUTPUT, TARGET_INPUT, is_relevance_output
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
    """The original outputs (by name), the relevance (one array, or one per float input) and the class; ``extra``:
    the other relevance outputs (``relevance@TENSOR`` of inner tensors, the counting semiring's float64
    ``relevance_exact``), by name."""

    outputs: dict[str, np.ndarray]
    relevance: np.ndarray | dict[str, np.ndarray]
    explained_class: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)


class Explainer:
    """``Explainer(model_or_path, rule="rlrp")(x, target=None) -> Explanation``; ``target`` None (or -1) explains
    the predicted class, an int every sample's, a sequence one class per sample.

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
        added = [o.name for o in self.session.get_outputs() if o.name.startswith(RELEVANCE_OUTPUT)]
        self.relevance_outputs = [name for name in added if is_relevance_output(name)]
        self.extra_outputs = [name for name in added if not is_relevance_output(name)]
        self.original_outputs = [o.name for o in self.session.get_outputs()
                                 if o.name not in added and o.name != CLASS_OUTPUT]

    def __call__(self, *inputs, target=None, **named) -> Explanation:
        feeds = dict(zip(self.data_inputs, inputs, strict=False)) | named
        missing = [n for n in self.data_inputs if n not in feeds]
        if missing:
            raise OnnxlrpError(f"missing input(s): {', '.join(missing)}")
        feeds = with_target(self.session, {k: np.asarray(v) for k, v in feeds.items()}, target)
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
            extra={k: results[k] for k in self.extra_outputs},
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

