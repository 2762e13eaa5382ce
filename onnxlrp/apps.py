"""What ``onnxlrp explain``, ``onnxlrp evaluate`` and ``onnxlrp demo`` do.

* :func:`run_explain` writes one heatmap PNG and the raw relevance (``.npy``) per image.
* :func:`run_evaluate` runs the R-LRP paper's masked-input study (keep the p % most relevant inputs, set the others to
  0, measure the accuracy) and region perturbation (MoRF, AOPC) for several rules, and writes JSON, CSV and plots.
* :func:`run_demo` does both on the bundled digits CNN.

Every output file is written to a hidden temp file in its folder and renamed into place, so a file either exists
complete or not at all (also on Ctrl-C or SIGTERM).  Every user error is an :class:`OnnxlrpError` with one line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import stat
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import click
import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import OnnxlrpError
from .loading import umask_mode
from .naming import escape_terminal, safe_filename

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAPER_PERCENTS",
    "RuleSpec",
    "parse_rules",
    "run_demo",
    "run_evaluate",
    "run_explain",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The percentages of most relevant inputs kept in the R-LRP paper's figures.
PAPER_PERCENTS = (1, 5, 10, 15, 20, 25, 40, 50, 60, 75, 80, 85, 90, 95, 99)
#: Heatmaps are upscaled (nearest neighbour, integer factor) until their short side is at least this many pixels.
HEATMAP_MIN_SIDE = 224
#: A progress bar is shown (on a terminal) for more images than this.
PROGRESS_MIN_IMAGES = 20
#: Region perturbation: steps, and the region side (2 px below 112 px image side, 8 px from 112 px on).
PERTURBATION_STEPS = 20
#: Decoded images kept in memory between the check pass and the explain pass of run_explain.
_IMAGE_CACHE_BYTES = 512 * 2**20

_TEXT = (str, os.PathLike)


def _show(path) -> str:
    return escape_terminal(os.fspath(path))


def _models_dir() -> Path:
    """The folder of the bundled ``onnxlrp.models`` package (a real folder: the package is not zipped)."""
    root = resources.files("onnxlrp.models")
    if not isinstance(root, Path):
        raise OnnxlrpError("the bundled models are not installed as plain files (zipped package?)")
    return root


# ----------------------------------------------------------------------------------------------------------------
# atomic files
# ----------------------------------------------------------------------------------------------------------------


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a hidden temp file next to ``path``, then rename it to ``path``.

    ``path`` is either left as it was or holds the complete new file; the temp file is removed on any error or
    interruption.  A symbolic link or folder at ``path`` is refused.  OSErrors become one-line OnnxlrpErrors.
    """
    path = Path(path)
    shown = _show(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise OnnxlrpError(f"cannot write {shown}: {err.strerror or err}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OnnxlrpError(f"refusing to write {shown}: it is a symbolic link")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OnnxlrpError(f"cannot write {shown}: it exists and is not a regular file")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, stat.S_IMODE(st.st_mode) if st is not None else umask_mode())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise OnnxlrpError(f"cannot write {shown}: {err.strerror or err}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def _write_npy(path: Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return write_atomic(path, write)


def _ensure_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` (and its parents); a file in the way is a one-line error."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OnnxlrpError(f"{_show(out)}: is a file, not a folder (choose another output folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OnnxlrpError(f"{_show(out)}: a file is in the way of the output folder") from None
    except OSError as err:
        raise OnnxlrpError(f"cannot create the output folder {_show(out)}: {err.strerror or err}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OnnxlrpError(f"{_show(out)}: the output folder is not writable")
    return out


def _check_out_dir(out_dir: str | os.PathLike) -> None:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OnnxlrpError(f"{_show(out)}: is a file, not a folder (choose another output folder)")


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While active (main thread), SIGTERM raises SystemExit(143), so every temp file is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_IGN, None):
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A compiled model ready for an :class:`~onnxlrp.runtime.Explainer`, with the names the apps need."""

    model: onnx.ModelProto  # compiled; the explained tensor is among its outputs
    rule: str  # the rule or composite it was compiled with
    input_name: str
    chw: tuple[int, ...]  # the data input's shape without the batch axis
    explained: str  # the tensor whose target entry is explained (e.g. the logits before a Softmax)
    score: str  # the output printed as the score (e.g. the Softmax probabilities), or ``explained``
    was_compiled: bool  # the file given was compiled already


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _value_info(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        if vi.name == name:
            out = onnx.ValueInfoProto()
            out.CopyFrom(vi)
            return out
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def input_shape(model: onnx.ModelProto, shown_as=None, input_shapes=None) -> tuple[str, tuple[int, ...]]:
    """The name of the one data input and its shape without the batch axis (every such axis must be fixed)."""
    graph = model.graph
    shown = _show(shown_as) if isinstance(shown_as, _TEXT) else "the model"
    inits = {t.name for t in graph.initializer}
    data_inputs = [i for i in graph.input if i.name != "target" and i.name not in inits]
    if len(data_inputs) != 1:
        raise OnnxlrpError(f"{shown}: has {len(data_inputs)} data inputs; explain and evaluate need exactly one")
    data_input = data_inputs[0]
    name = escape_terminal(data_input.name)
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in data_input.type.tensor_type.shape.dim]
    fixed = (input_shapes or {}).get(data_input.name) or (input_shapes or {}).get("")
    if fixed and len(fixed) == len(dims):
        dims = [d if d is not None else (f if f > 0 else None) for d, f in zip(dims, fixed, strict=True)]
    if len(dims) < 2 or any(d is None for d in dims[1:]):
        shape = ", ".join("?" if d is None else str(d) for d in dims)
        raise OnnxlrpError(f"{shown}: input {name!r} has shape [{shape}]; every axis but the batch must be fixed "
                           f"(use --input-shape {name}=1,...)")
    return data_input.name, tuple(dims[1:])


def prepare(model, *, shown_as=None, rule: str = "rlrp", composite=None, flat_layers: int = 1, opset=None,
            output=None, node_output=None, node_input=None, input_shapes=None, **params) -> Prepared:
    """Load ``model`` (a file or ModelProto) and compile it with the rule unless it was compiled by onnxlrp."""
    from .compiler import compile as compile_model
    from .compiler import is_compiled, read_model

    source, _ = read_model(model)
    was_compiled = is_compiled(source)
    if was_compiled:
        compiled = onnx.ModelProto()
        compiled.CopyFrom(source)  # outputs are added below; the caller's model stays as it is
    else:
        compiled = compile_model(source, rule, composite=composite, flat_layers=flat_layers, opset=opset,
                                 output=output, node_output=node_output, node_input=node_input,
                                 input_shapes=input_shapes, **params)
    meta = _metadata(compiled)
    graph = compiled.graph
    explained = meta.get("onnxlrp.explained", "")
    if not explained:
        raise OnnxlrpError(f"{_show(shown_as or model) if isinstance(shown_as or model, _TEXT) else 'the model'}: "
                           "compiled without the onnxlrp.explained metadata; compile it again with this onnxlrp")
    input_name, chw = input_shape(compiled, shown_as if shown_as is not None else model, input_shapes)
    outputs = [o.name for o in graph.output]
    if explained not in outputs:
        graph.output.append(_value_info(graph, explained))
    originals = [n for n in outputs if not n.startswith("relevance") and n != "explained_class"]
    score = explained
    if explained not in originals:
        for node in graph.node:
            if node.op_type in ("Softmax", "LogSoftmax") and node.input and node.input[0] == explained \
                    and node.output[0] in originals:
                score = node.output[0]
                break
    return Prepared(compiled, meta.get("onnxlrp.rule", rule), input_name, chw, explained, score, was_compiled)


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node's subgraphs (If/Loop/Scan bodies) read, outer-scope references included."""
    names: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_names(n)
    return names


def forward_model(compiled: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """The part of ``compiled`` that computes ``outputs`` (the forward pass without the relevance sweep)."""
    graph = compiled.graph
    needed = set(outputs)
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed |= _subgraph_names(node)
    keep.reverse()
    fwd = onnx.ModelProto()
    fwd.ir_version = compiled.ir_version
    fwd.opset_import.extend(compiled.opset_import)
    fwd.functions.extend(compiled.functions)
    fwd.graph.name = graph.name
    fwd.graph.node.extend(keep)
    fwd.graph.initializer.extend(t for t in graph.initializer if t.name in needed)
    inits = {t.name for t in graph.initializer}
    fwd.graph.input.extend(i for i in graph.input if i.name in needed and i.name not in inits)
    fwd.graph.output.extend(_value_info(graph, name) for name in outputs)
    fwd.graph.value_info.extend(v for v in graph.value_info if v.name in needed and v.name not in outputs)
    return fwd


class Forward:
    """The model's forward pass (from the compiled graph): ``logits(x)`` is the explained tensor, ``[b, K]``."""

    def __init__(self, prepared: Prepared, batch_size: int):
        from .runtime import make_session

        self.input = prepared.input_name
        self.explained = prepared.explained
        self.session = make_session(forward_model(prepared.model, [prepared.explained]))
        self.batch_size = max(int(batch_size), 1)

    def logits(self, x: np.ndarray) -> np.ndarray:
        parts = []
        for i in range(0, len(x), self.batch_size):
            chunk = np.ascontiguousarray(x[i : i + self.batch_size], dtype=np.float32)
            out = self.session.run([self.explained], {self.input: chunk})[0]
            parts.append(np.asarray(out, dtype=np.float64).reshape(len(chunk), -1))
        return np.concatenate(parts) if parts else np.zeros((0, 0))


# ----------------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Preprocess:
    """``x = (image * scale - mean) / std`` per channel, ``image`` in [0, 1]."""

    scale: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        shape = (-1,) + (1,) * (x.ndim - 2)  # channel axis 1 of a batch [B, C, ...]
        out = (x * self.scale.reshape(shape) - self.mean.reshape(shape)) / self.std.reshape(shape)
        return out.astype(np.float32)


def _channel_values(values, key: str, channels: int, where: str) -> np.ndarray:
    if isinstance(values, bool) or not isinstance(values, (int, float, list)):
        raise OnnxlrpError(f"{where}: {key} must be a number or a list of numbers")
    items = values if isinstance(values, list) else [values]
    if not items or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise OnnxlrpError(f"{where}: {key} must be a number or a list of numbers")
    if len(items) not in (1, channels):
        raise OnnxlrpError(f"{where}: {key} has {len(items)} values for a {channels}-channel input")
    arr = np.broadcast_to(np.asarray(items, dtype=np.float64), (channels,)).copy()
    if not np.all(np.isfinite(arr)):
        raise OnnxlrpError(f"{where}: {key} must be finite")
    return arr


def make_preprocess(spec: str, channels: int) -> Preprocess:
    """``"none"`` (identity), ``"imagenet"`` (RGB mean/std) or a TOML file with ``scale``, ``mean``, ``std``."""
    ones, zeros = np.ones(channels), np.zeros(channels)
    if spec in (None, "", "none"):
        return Preprocess(ones, zeros, ones, "none")
    if spec == "imagenet":
        if channels != 3:
            raise OnnxlrpError(f"--preprocess imagenet needs an RGB (3-channel) model input, this one has {channels}")
        return Preprocess(ones, np.array(IMAGENET_MEAN), np.array(IMAGENET_STD), "imagenet")
    path = Path(spec)
    where = _show(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnnxlrpError(f"{where}: no such preprocessing file (or use 'none' or 'imagenet')") from None
    except IsADirectoryError:
        raise OnnxlrpError(f"{where}: is a folder, not a preprocessing TOML file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OnnxlrpError(f"{where}: not a valid preprocessing TOML file ({escape_terminal(first)})") from None
    unknown = sorted(set(data) - {"scale", "mean", "std"})
    if unknown:
        raise OnnxlrpError(f"{where}: unknown key(s) {', '.join(map(escape_terminal, unknown))}; "
                           "valid: scale, mean, std")
    scale = _channel_values(data.get("scale", 1.0), "scale", channels, where)
    mean = _channel_values(data.get("mean", 0.0), "mean", channels, where)
    std = _channel_values(data.get("std", 1.0), "std", channels, where)
    if np.any(std == 0):
        raise OnnxlrpError(f"{where}: std must not be 0")
    return Preprocess(scale, mean, std, path.name)


# ----------------------------------------------------------------------------------------------------------------
# explain
# ----------------------------------------------------------------------------------------------------------------


def _parse_target(target) -> int | None:
    if target is None or (isinstance(target, str) and target.strip().lower() == "predicted"):
        return None
    try:
        value = int(target)
    except (TypeError, ValueError):
        raise OnnxlrpError(f"--target {target!r}: expected a class index or 'predicted'") from None
    if value < 0:
        raise OnnxlrpError(f"--target {value}: a class index is >= 0")
    return value


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """``safe_filename`` of each stem; repeated names (``a/x.png``, ``b/x.png``) get ``-2``, ``-3``, ..."""
    used: set[str] = set()
    out = []
    for p in paths:
        base = safe_filename(p.stem or p.name, max_len=90)
        name, k = base, 1
        while name.lower() in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name.lower())
        out.append(name)
    return out


def _upscale(h: int, w: int) -> int:
    return max(1, math.ceil(HEATMAP_MIN_SIDE / max(min(h, w), 1)))


def _png(relevance: np.ndarray, image: np.ndarray | None, scale: int) -> Callable[[Path], object]:
    from .heatmap import save_heatmap

    return lambda tmp: save_heatmap(tmp, relevance, image=image, scale=scale)


def run_explain(model, images, *, out_dir, target="predicted", preprocess="none", overlay=True, batch_size=32,
                rule="rlrp", composite=None, flat_layers=1, opset=None, output=None, node_output=None,
                node_input=None, input_shapes=None, **params) -> list[dict]:
    """Explain every image; write ``<out_dir>/<stem>.png`` (heatmap) and ``<stem>.npy`` (relevance [C, H, W]).
    With one ``node_input`` the relevance has that tensor's shape: the heatmap is drawn over the image when its last
    two axes are the image's, alone when it is 2-D or 3-D, and left out otherwise (the ``.npy`` is always written).

    Every image is decoded once before anything is written, so a bad image stops the run with one error line and
    no output at all.  Returns one dict per image (file, class, score, png, npy).
    """
    from .compiler import read_model
    from .images import list_images, load_image
    from .runtime import Explainer

    if batch_size < 1:
        raise OnnxlrpError(f"--batch-size must be at least 1, got {batch_size}")
    wanted = _parse_target(target)
    _check_out_dir(out_dir)
    paths = list_images(images)
    source, _ = read_model(model)
    input_name, chw = input_shape(source, model, input_shapes)
    if len(chw) != 3:
        raise OnnxlrpError(f"{_show(model)}: input {escape_terminal(input_name)!r} is not an image batch "
                           f"[N, C, H, W] (shape [N, {', '.join(map(str, chw))}])")
    channels, height, width = chw
    if channels not in (1, 3):
        raise OnnxlrpError(f"{_show(model)}: input has {channels} channels; images give 1 (gray) or 3 (RGB)")
    pre = make_preprocess(preprocess, channels)

    # check pass: decode every image before writing anything (keeping what fits in the cache)
    cache: dict[int, np.ndarray] = {}
    cached_bytes = 0
    for i, p in enumerate(paths):
        arr = load_image(p, channels=channels, size=(height, width))
        if cached_bytes + arr.nbytes <= _IMAGE_CACHE_BYTES:
            cache[i] = arr
            cached_bytes += arr.nbytes

    if node_input and len(node_input) > 1 and not isinstance(node_input, str):
        raise OnnxlrpError("explain writes one relevance map per image: give one --node-input")
    prepared = prepare(source, shown_as=model, rule=rule, composite=composite, flat_layers=flat_layers, opset=opset,
                       output=output, node_output=node_output, node_input=node_input, input_shapes=input_shapes,
                       **params)
    if prepared.chw != chw:
        raise OnnxlrpError(f"{_show(model)}: the compiled model takes {list(prepared.chw)}, not {list(chw)}")
    explainer = Explainer(prepared.model)
    out = Path(out_dir)
    stems = _unique_stems(paths)
    scale = _upscale(height, width)
    if prepared.was_compiled:
        click.echo(f"{_show(model)}: compiled already ({escape_terminal(prepared.rule)}), used as it is")
    click.echo(f"explaining {len(paths)} image(s) with {escape_terminal(prepared.rule)} on {explainer.provider}")
    results: list[dict] = []
    show_bar = len(paths) > PROGRESS_MIN_IMAGES and sys.stderr.isatty()
    bar = click.progressbar(length=len(paths), file=sys.stderr, label="explaining") if show_bar else None
    with _sigterm_unwinds(), (bar if bar is not None else contextlib.nullcontext()):
        for start in range(0, len(paths), batch_size):
            idx = list(range(start, min(start + batch_size, len(paths))))
            raw = np.stack([cache[i] if i in cache else load_image(paths[i], channels=channels, size=(height, width))
                            for i in idx])
            result = explainer(pre(raw), target=wanted)
            classes = np.asarray(result.explained_class).reshape(-1)
            scores = np.asarray(result.outputs[prepared.score]).reshape(len(idx), -1)
            relevance = np.asarray(result.relevance, dtype=np.float32)
            if wanted is not None and wanted >= scores.shape[1]:
                raise OnnxlrpError(f"--target {wanted}: the explained output has only {scores.shape[1]} classes "
                                   f"(0..{scores.shape[1] - 1})")
            if start == 0:
                _ensure_dir(out)  # only now: nothing is created when the first batch fails
            for j, i in enumerate(idx):
                k = int(classes[j])
                score = float(scores[j, k])
                png, npy = out / f"{stems[i]}.png", out / f"{stems[i]}.npy"
                drawn = relevance[j].ndim in (2, 3)
                if drawn:
                    like_image = relevance[j].shape[-2:] == (height, width)
                    write_atomic(png, _png(relevance[j], raw[j] if overlay and like_image else None,
                                           scale if like_image else _upscale(*relevance[j].shape[-2:])))
                _write_npy(npy, relevance[j])
                results.append({"file": str(paths[i]), "class": k, "score": score, "png": str(png) if drawn else None,
                                "npy": str(npy)})
                click.echo(f"{_show(paths[i])}: class {k} (score {score:.4g}) -> {_show(png if drawn else npy)}")
            if bar is not None:
                bar.update(len(idx))
    return results


# ----------------------------------------------------------------------------------------------------------------
# rules for evaluate
# ----------------------------------------------------------------------------------------------------------------


#: Positional parameters of ``name:v1,v2`` per rule.
POSITIONAL = {"epsilon": ("epsilon",), "gamma": ("gamma",), "alpha-beta": ("alpha", "beta"), "zbox": ("low", "high")}


@dataclass
class RuleSpec:
    """One entry of ``--rules``: its label as typed, the rule or composite, and its (Zennit-convention) params."""

    label: str
    rule: str
    params: dict[str, float] = field(default_factory=dict)
    note: str = ""


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def resolve_alpha_beta(alpha: float, beta: float, label: str) -> tuple[float, float, str]:
    """(alpha, beta) in our (Zennit's) convention ``R = alpha * R+ - beta * R-``, ``alpha - beta = 1``.

    The R-LRP paper (Eq. 5) writes ``R = alpha * R+ + beta * R-`` with ``alpha + beta = 1`` (``R-`` the share of
    the negative contributions, a positive fraction), so its ``(alpha, beta)`` is our ``(alpha, -beta)``.  A pair
    with ``alpha - beta = 1`` is read in our convention, one with ``alpha + beta = 1`` in the paper's; ``(1, 0)``
    means the same in both.  Our rule needs ``beta >= 0``: the paper's pairs with ``beta > 0`` (e.g. 0.5, 0.5,
    which would give the negative contributions positive relevance) cannot be expressed.
    """
    tol = 1e-9
    if abs(alpha - beta - 1) <= tol and alpha >= 0 and beta >= 0:
        return alpha, beta, "" if (alpha, beta) != (1.0, 0.0) else "alpha=1, beta=0 (z+) in either convention"
    if abs(alpha + beta - 1) <= tol:
        if beta > 0 or alpha < 0:
            raise OnnxlrpError(
                f"rule {label!r}: the paper's alpha={alpha:g}, beta={beta:g} (alpha + beta = 1) is alpha={alpha:g}, "
                f"beta={-beta:g} in our convention (alpha - beta = 1, alpha * R+ - beta * R-); our alpha-beta rule "
                "needs alpha, beta >= 0, so it cannot be expressed")
        return alpha, -beta, f"paper alpha={alpha:g}, beta={beta:g} = ours alpha={alpha:g}, beta={-beta:g}"
    raise OnnxlrpError(f"rule {label!r}: alpha-beta needs alpha + beta = 1 (the R-LRP paper's notation, e.g. 2,-1) "
                       f"or alpha - beta = 1 (Zennit's, e.g. 2,1), got {alpha:g}, {beta:g}")


def parse_rules(spec: str | Sequence[str]) -> list[RuleSpec]:
    """``"rlrp,lrp0,epsilon:0.01,gamma:0.25,alpha-beta:2,-1"`` -> one :class:`RuleSpec` per rule.

    A rule is a rule or composite name (``onnxlrp rules``), optionally followed by ``:`` and parameters:
    positional numbers (epsilon: epsilon; gamma: gamma; alpha-beta: alpha, beta; zbox: low, high) or ``key=value``
    pairs, separated by commas.  A comma-separated item that is a number or ``key=value`` belongs to the rule
    before it.  alpha-beta pairs are read in the paper's or Zennit's convention (:func:`resolve_alpha_beta`).
    """
    from .compiler import PARAMETER_NAMES
    from .composites import COMPOSITES

    tokens = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
    if not tokens or tokens == [""]:
        raise OnnxlrpError("--rules is empty; give at least one rule, e.g. rlrp,lrp0,epsilon")
    groups: list[list[str]] = []
    for tok in tokens:
        if not tok:
            raise OnnxlrpError(f"--rules {escape_terminal(str(spec))!r}: empty item between commas")
        continues = _number(tok) is not None or ("=" in tok and ":" not in tok)
        if continues:
            if not groups or ":" not in groups[-1][0]:
                raise OnnxlrpError(f"--rules: {escape_terminal(tok)!r} is not a rule (parameters follow "
                                   "'name:', e.g. epsilon:0.01)")
            groups[-1].append(tok)
        else:
            groups.append([tok])
    out: list[RuleSpec] = []
    for group in groups:
        label = ",".join(group)
        name, _, first = group[0].partition(":")
        name = name.strip()
        if name not in COMPOSITES:
            raise OnnxlrpError(f"unknown rule {escape_terminal(name)!r} in --rules; valid: {', '.join(COMPOSITES)}")
        args = ([first.strip()] if first.strip() else []) + group[1:]
        if ":" in group[0] and not args:
            raise OnnxlrpError(f"rule {escape_terminal(label)!r}: parameters expected after ':'")
        params: dict[str, float] = {}
        positional = POSITIONAL.get(name, ())
        n_pos = 0
        for arg in args:
            key, eq, text = arg.partition("=")
            if eq:
                key = key.strip()
                if key not in PARAMETER_NAMES:
                    raise OnnxlrpError(f"rule {escape_terminal(label)!r}: unknown parameter {escape_terminal(key)!r}; "
                                       f"valid: {', '.join(PARAMETER_NAMES)}")
            else:
                text = arg
                if n_pos >= len(positional):
                    takes = ", ".join(positional) if positional else "no positional parameters (key=value only)"
                    raise OnnxlrpError(f"rule {escape_terminal(label)!r}: too many parameters; {name} takes {takes}")
                key = positional[n_pos]
                n_pos += 1
            value = _number(text.strip())
            if value is None:
                raise OnnxlrpError(f"rule {escape_terminal(label)!r}: {escape_terminal(text)!r} is not a number")
            if key in params:
                raise OnnxlrpError(f"rule {escape_terminal(label)!r}: {key} given twice")
            params[key] = value
        note = ""
        if name == "alpha-beta" and ("alpha" in params or "beta" in params):
            if not ("alpha" in params and "beta" in params):
                raise OnnxlrpError(f"rule {escape_terminal(label)!r}: give both alpha and beta (e.g. alpha-beta:2,-1)")
            params["alpha"], params["beta"], note = resolve_alpha_beta(params["alpha"], params["beta"], label)
        if any(r.label == label for r in out):
            raise OnnxlrpError(f"rule {escape_terminal(label)!r} is listed twice in --rules")
        out.append(RuleSpec(label, name, params, note))
    return out


# ----------------------------------------------------------------------------------------------------------------
# data for evaluate
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    x: np.ndarray  # float32 [N, C, ...] in the model's input space (preprocessed)
    labels: np.ndarray  # int64 [N]
    source: str


def _as_batch(images: np.ndarray, chw: tuple[int, ...], where: str) -> np.ndarray:
    """uint8 (/255) or float images [N, H, W], [N, C, H, W] or [N, H, W, C] -> float32 [N, C, H, W]."""
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer):
        x = images.astype(np.float32)
    else:
        raise OnnxlrpError(f"{where}: images have dtype {images.dtype}; expected uint8 or float")
    want = tuple(chw)
    if x.shape[1:] == want:
        return x
    if len(want) == 3 and want[0] == 1 and x.shape[1:] == want[1:]:
        return x[:, None]
    if len(want) == 3 and x.ndim == 4 and x.shape[1:] == (want[1], want[2], want[0]):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise OnnxlrpError(f"{where}: images have shape {list(x.shape)}; the model takes [N, {', '.join(map(str, want))}]")


def _from_npz(path: Path, where: str) -> tuple[np.ndarray, np.ndarray]:
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            raise OnnxlrpError(f"{where}: not a .npz file (expected a numpy .npz with arrays images and labels)")
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("images", "labels") if k not in data.files]
            if missing:
                raise OnnxlrpError(f"{where}: no array {', '.join(missing)} (a .npz needs 'images' and 'labels')")
            return np.asarray(data["images"]), np.asarray(data["labels"])
    except OnnxlrpError:
        raise
    except FileNotFoundError:
        raise OnnxlrpError(f"{where}: no such file") from None
    except (OSError, ValueError, EOFError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OnnxlrpError(f"{where}: not a readable .npz with images and labels ({escape_terminal(first)})") from None


def _from_folder(folder: Path, chw: tuple[int, ...], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from .images import list_images, load_image

    where = _show(folder)
    if len(chw) != 3 or chw[0] not in (1, 3):
        raise OnnxlrpError(f"{where}: an image folder needs a model taking [N, 1|3, H, W], not {list(chw)}")
    try:
        subdirs = sorted((e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")),
                         key=lambda e: e.name)
    except OSError as err:
        raise OnnxlrpError(f"{where}: cannot list the data folder ({err.strerror or err})") from None
    classes = []
    for e in subdirs:
        if not e.name.isdigit():
            raise OnnxlrpError(f"{where}: sub-folder {escape_terminal(e.name)!r} is not a class index (0, 1, 2, ...)")
        classes.append((int(e.name), folder / e.name))
    if not classes:
        raise OnnxlrpError(f"{where}: no class sub-folders (expected one folder per class index: 0/, 1/, ...)")
    classes.sort()
    images, labels = [], []
    for label, sub in classes:
        for p in list_images([sub]):
            if limit is not None and len(images) >= limit:
                break
            images.append(load_image(p, channels=chw[0], size=(chw[1], chw[2])))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_dataset(data: str, chw: tuple[int, ...], preprocess: str = "none", limit: int | None = None) -> Dataset:
    """``builtin:digits``, a ``.npz`` with ``images``/``labels``, or a folder with one sub-folder per class index."""
    if limit is not None and limit < 1:
        raise OnnxlrpError(f"--limit must be at least 1, got {limit}")
    channels = chw[0] if len(chw) >= 1 else 1
    if data == "builtin:digits":
        path = _models_dir() / "digits_test.npz"
        images, labels = _from_npz(path, "builtin:digits")
        images = images[:limit]
        x = _as_batch(images, chw, "builtin:digits")
        source = "builtin:digits"
    elif isinstance(data, str) and data.startswith("builtin:"):
        raise OnnxlrpError(f"--data {escape_terminal(data)!r}: unknown built-in data set (available: builtin:digits)")
    else:
        path = Path(data)
        where = _show(path)
        if path.is_dir():
            x, labels = _from_folder(path, chw, limit)
        elif path.exists():
            images, labels = _from_npz(path, where)
            images = images[:limit]
            x = _as_batch(images, chw, where)
        else:
            raise OnnxlrpError(f"{where}: no such data file or folder")
        source = str(path)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise OnnxlrpError(f"{escape_terminal(source)}: labels must be integers [N], got {labels.dtype} "
                           f"{list(labels.shape)}")
    labels = labels[:limit].astype(np.int64)
    if len(labels) != len(x):
        raise OnnxlrpError(f"{escape_terminal(source)}: {len(x)} images but {len(labels)} labels")
    if len(x) == 0:
        raise OnnxlrpError(f"{escape_terminal(source)}: no samples")
    if not np.all(np.isfinite(x)):
        raise OnnxlrpError(f"{escape_terminal(source)}: images contain NaN or infinite values")
    x = make_preprocess(preprocess, channels)(x) if len(chw) >= 1 else x
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), labels, source)


# ----------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------


def parse_percents(percent) -> list[float]:
    items = percent.split(",") if isinstance(percent, str) else list(percent)
    out = []
    for item in items:
        value = _number(str(item).strip())
        if value is None or not 0 < value <= 100:
            raise OnnxlrpError(f"--percent: {escape_terminal(str(item).strip())!r} is not a percentage in (0, 100]")
        out.append(int(value) if float(value).is_integer() else value)
    if not out:
        raise OnnxlrpError("--percent is empty")
    return out


def relevance_for(prepared: Prepared, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Relevance ``[N, ...]`` (float32) and the explained class ``[N]`` of every sample, batched; and the provider."""
    from .runtime import Explainer

    explainer = Explainer(prepared.model)
    rel, cls = [], []
    for i in range(0, len(x), batch_size):
        result = explainer(x[i : i + batch_size])
        rel.append(np.asarray(result.relevance, dtype=np.float32))
        cls.append(np.asarray(result.explained_class).reshape(-1))
    return np.concatenate(rel), np.concatenate(cls).astype(np.int64), explainer.provider


def perturbation_region(chw: tuple[int, ...]) -> int:
    """2 px regions for small images (28 x 28), 8 px from a 112 px side on."""
    return 8 if len(chw) == 3 and min(chw[1:]) >= 112 else 2 if len(chw) == 3 else 1


def study(forward: Forward, x: np.ndarray, labels: np.ndarray, predicted: np.ndarray, relevance: np.ndarray,
          explained_class: np.ndarray, percents: Sequence[float], *, absolute: bool, pixel: bool,
          batch_size: int) -> dict:
    """Masked-input accuracies (correctly classified samples, and all samples) and the MoRF perturbation curve."""
    from .metrics import aopc, masked_accuracy, perturbation_curve

    def predict(batch):
        return forward.logits(batch)

    correct = predicted == labels
    n_correct, n_wrong = int(correct.sum()), int((~correct).sum())
    per_pixel = pixel and x.ndim >= 3
    # masking is per sample: the correctly and the wrongly classified samples are evaluated once each, and the
    # accuracy on all samples is their weighted sum
    acc_correct = masked_accuracy(predict, x[correct], labels[correct], relevance[correct], percents,
                                  absolute=absolute, per_pixel=per_pixel, batch_size=batch_size)
    acc_wrong = masked_accuracy(predict, x[~correct], labels[~correct], relevance[~correct], percents,
                                absolute=absolute, per_pixel=per_pixel, batch_size=batch_size) if n_wrong else {}
    acc_all = {p: (acc_correct[p] * n_correct + (acc_wrong[p] * n_wrong if n_wrong else 0.0)) / len(x)
               for p in acc_correct}
    region = perturbation_region(tuple(x.shape[1:]))
    ranking = np.abs(relevance) if absolute else relevance
    if x.ndim == 4:
        cells = math.ceil(x.shape[2] / region) * math.ceil(x.shape[3] / region) * (1 if per_pixel else x.shape[1])
    else:
        cells = int(np.prod(x.shape[2:] if per_pixel and x.ndim >= 3 else x.shape[1:]))
    steps = min(PERTURBATION_STEPS, cells)
    curves = []
    for i in range(0, len(x), batch_size):
        cls = explained_class[i : i + batch_size]

        def score(batch, cls=cls):
            return forward.logits(batch)[np.arange(len(batch)), cls]

        curves.append(perturbation_curve(score, x[i : i + batch_size], ranking[i : i + batch_size], steps=steps,
                                         region=region, order="morf", fill=0.0, per_pixel=per_pixel or x.ndim < 3))
    curve = np.concatenate(curves)
    return {
        "accuracy_correct": {_fmt_percent(p): float(v) for p, v in acc_correct.items()},
        "accuracy_all": {_fmt_percent(p): float(v) for p, v in acc_all.items()},
        "perturbation_curve": [float(v) for v in curve.mean(axis=0)],
        "aopc": float(aopc(curve).mean()),
        "aopc_std": float(aopc(curve).std()),
        "region": region,
        "steps": steps,
    }


def _fmt_percent(p: float) -> str:
    return f"{float(p):g}"


def results_csv(results: dict) -> str:
    """One row per number: rule, metric, x (percent or step), value."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rule", "metric", "x", "value"])
    w.writerow(["", "model_accuracy_all", "", f"{results['model_accuracy']:.6g}"])
    w.writerow(["", "samples", "", results["samples"]])
    w.writerow(["", "correctly_classified", "", results["correctly_classified"]])
    for label, r in results["rules"].items():
        for metric in ("accuracy_correct", "accuracy_all"):
            for p, v in r[metric].items():
                w.writerow([label, metric, p, f"{v:.6g}"])
        for k, v in enumerate(r["perturbation_curve"]):
            w.writerow([label, "perturbation_score_mean", k, f"{v:.6g}"])
        w.writerow([label, "aopc", "", f"{r['aopc']:.6g}"])
        w.writerow([label, "aopc_std", "", f"{r['aopc_std']:.6g}"])
        for metric, value in r.get("localization", {}).items():
            w.writerow([label, metric, "", f"{value:.6g}"])
        w.writerow([label, "relevance_seconds", "", f"{r['relevance_seconds']:.3g}"])
    return buf.getvalue()


def table(results: dict, metric: str = "accuracy_correct") -> list[str]:
    """A compact text table: one row per rule, accuracy per percent, AOPC."""
    rules = results["rules"]
    percents = results["percents"]
    width = max([len("rule")] + [len(k) for k in rules]) + 2
    head = "rule".ljust(width) + "".join(f"{_fmt_percent(p) + '%':>7}" for p in percents) + f"{'AOPC':>8}"
    lines = [head]
    for label, r in rules.items():
        values = "".join(f"{r[metric][_fmt_percent(p)]:7.3f}" for p in percents)
        lines.append(escape_terminal(label).ljust(width) + values + f"{r['aopc']:8.3f}")
    return lines


def save_plots(results: dict, out: Path, prefix: str = "", title_suffix: str = "") -> list[Path]:
    """``<prefix>masked_accuracy.png`` and ``<prefix>aopc.png`` (atomically)."""
    from .heatmap import save_plot

    percents = results["percents"]
    rules = results["rules"]
    curves = {label: [r["accuracy_correct"][_fmt_percent(p)] for p in percents] for label, r in rules.items()}
    n = results["correctly_classified"]
    acc_path = out / f"{prefix}masked_accuracy.png"
    write_atomic(acc_path, lambda tmp: save_plot(
        tmp, percents, curves, title=f"Masked-input accuracy ({results['ranking']}, per {results['unit']}; "
        f"{n} correct samples){title_suffix}", xlabel="% most relevant inputs kept (others set to 0)",
        ylabel="accuracy", ylim=(0.0, 1.02)))
    first = next(iter(rules.values()))
    steps = list(range(len(first["perturbation_curve"])))
    pert = {f"{label} (AOPC {r['aopc']:.2f})": r["perturbation_curve"] for label, r in rules.items()}
    aopc_path = out / f"{prefix}aopc.png"
    write_atomic(aopc_path, lambda tmp: save_plot(
        tmp, steps, pert, title=f"Region perturbation, MoRF ({first['region']}x{first['region']} regions, fill 0)"
        f"{title_suffix}", xlabel="regions removed (most relevant first)",
        ylabel="mean explained value of the class"))
    return [acc_path, aopc_path]


def evaluate_rules(model, rule_specs: Sequence[RuleSpec], dataset: Dataset, *, batch_size: int,
                   modes: Sequence[tuple[bool, bool]], percents: Sequence[float], echo=click.echo,
                   on_relevance: Callable[[RuleSpec, np.ndarray, np.ndarray], object] | None = None) -> list[dict]:
    """Compile ``model`` with each rule, compute the relevance once, evaluate every (absolute, pixel) mode.

    ``on_relevance(spec, relevance, explained_class)`` is called once per rule (e.g. to draw heatmaps).  Returns
    one results dict per mode (see :func:`run_evaluate`)."""
    from .compiler import is_compiled, read_model

    source, _ = read_model(model)
    if is_compiled(source):
        raise OnnxlrpError(f"{_show(model) if isinstance(model, _TEXT) else 'the model'}: is compiled already; "
                           "evaluate needs the plain model (it compiles one per rule)")
    forward = None
    x, labels = dataset.x, dataset.labels
    outs = [None] * len(modes)
    for spec in rule_specs:
        t0 = time.perf_counter()
        prepared = prepare(source, shown_as=model, rule=spec.rule, **spec.params)
        if tuple(x.shape[1:]) != tuple(prepared.chw):
            raise OnnxlrpError(f"{escape_terminal(dataset.source)}: samples have shape {list(x.shape[1:])}, the "
                               f"model takes {list(prepared.chw)}")
        relevance, explained_class, provider = relevance_for(prepared, x, batch_size)
        seconds = time.perf_counter() - t0
        if forward is None:
            forward = Forward(prepared, batch_size)
            predicted = forward.logits(x).argmax(axis=1)
            n_correct = int((predicted == labels).sum())
            if n_correct == 0:
                raise OnnxlrpError(f"{escape_terminal(dataset.source)}: the model classifies no sample correctly "
                                   "(wrong labels or preprocessing?)")
            echo(f"{len(x)} samples from {escape_terminal(dataset.source)}; model accuracy "
                 f"{n_correct / len(x):.4f} ({n_correct} correct); {provider}")
            for m, (absolute, pixel) in enumerate(modes):
                outs[m] = {
                    "model": str(model) if isinstance(model, _TEXT) else "model",
                    "data": dataset.source,
                    "samples": int(len(x)),
                    "correctly_classified": n_correct,
                    "model_accuracy": n_correct / len(x),
                    "ranking": "absolute" if absolute else "signed",
                    "unit": "pixel" if pixel else "input",
                    "percents": list(percents),
                    "score": f"{forward.explained} at the explained class",
                    "provider": provider,
                    "rules": {},
                }
        if on_relevance is not None:
            on_relevance(spec, relevance, explained_class)
        echo(f"  {escape_terminal(spec.label)}: relevance in {seconds:.1f} s"
             + (f" ({escape_terminal(spec.note)})" if spec.note else ""))
        for m, (absolute, pixel) in enumerate(modes):
            r = study(forward, x, labels, predicted, relevance, explained_class, percents, absolute=absolute,
                      pixel=pixel, batch_size=batch_size)
            r.update({"rule": spec.rule, "params": dict(spec.params), "note": spec.note,
                      "plan": _metadata(prepared.model).get("onnxlrp.plan", ""), "relevance_seconds": seconds})
            outs[m]["rules"][spec.label] = r
    return outs


def load_masks(path, count: int, hw: tuple[int, int]) -> np.ndarray:
    """Object masks [N, H, W] from a .npz holding ``masks`` ([N, H, W], nonzero = object) or ``boxes``
    ([N, 4], x0, y0, x1, y1 with exclusive ends), one per sample, in the order of the data."""
    from .metrics import boxes_to_masks

    where = _show(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise OnnxlrpError(f"{where}: not a readable .npz with masks or boxes ({err})") from None
    if "masks" in arrays:
        masks = arrays["masks"].astype(bool)
        if masks.ndim != 3 or masks.shape[1:] != tuple(hw):
            raise OnnxlrpError(f"{where}: masks have shape {list(masks.shape)}, expected [N, {hw[0]}, {hw[1]}]")
    elif "boxes" in arrays:
        boxes = arrays["boxes"]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise OnnxlrpError(f"{where}: boxes have shape {list(boxes.shape)}, expected [N, 4]")
        masks = boxes_to_masks(boxes, tuple(hw))
    else:
        raise OnnxlrpError(f"{where}: holds neither 'masks' nor 'boxes'")
    if len(masks) < count:
        raise OnnxlrpError(f"{where}: {len(masks)} masks for {count} samples")
    return masks[:count]


def localization(relevance: np.ndarray, masks: np.ndarray) -> dict:
    """Pointing game hit rate and the mean relevance mass ratios mu and mu_w (Kohlbrenner et al., Eq. 5)."""
    from .metrics import pointing_game, relevance_mass_ratio, weighted_relevance_mass_ratio

    return {"pointing_game": float(pointing_game(relevance, masks).mean()),
            "mu": float(np.nanmean(relevance_mass_ratio(relevance, masks))),
            "mu_w": float(np.nanmean(weighted_relevance_mass_ratio(relevance, masks)))}


def run_evaluate(model, *, data="builtin:digits", rules="rlrp,lrp0,epsilon", percent=PAPER_PERCENTS,
                 absolute=False, pixel=False, limit=None, preprocess="none", out_dir="onnxlrp-evaluate",
                 batch_size=128, masks=None) -> dict:
    """The R-LRP paper's masked-input study plus MoRF region perturbation, per rule.

    Accuracy is measured as in the paper on the correctly classified samples (``accuracy_correct``) and, for
    reference, on all samples against their labels (``accuracy_all``).  Writes ``results.json``, ``results.csv``,
    ``masked_accuracy.png`` and ``aopc.png`` into ``out_dir``; returns the results dict.
    """
    from .compiler import is_compiled, read_model

    if batch_size < 1:
        raise OnnxlrpError(f"--batch-size must be at least 1, got {batch_size}")
    _check_out_dir(out_dir)
    specs = parse_rules(rules)
    percents = parse_percents(percent)
    source, _ = read_model(model)
    if is_compiled(source):
        raise OnnxlrpError(f"{_show(model)}: is compiled already; evaluate needs the plain model (it compiles one "
                           "per rule)")
    dataset = load_dataset(data, input_shape(source, model)[1], preprocess, limit)
    object_masks = load_masks(masks, len(dataset.x), dataset.x.shape[-2:]) if masks else None
    localized = {}

    def on_relevance(spec, relevance, explained_class):
        if object_masks is not None:
            localized[spec.label] = localization(relevance, object_masks)

    with _sigterm_unwinds():
        results = evaluate_rules(source, specs, dataset, batch_size=batch_size, modes=[(absolute, pixel)],
                                 percents=percents, on_relevance=on_relevance)[0]
        results["model"] = str(model)
        for label, numbers in localized.items():
            results["rules"][label]["localization"] = numbers
            click.echo(f"{escape_terminal(label)}: pointing game {numbers['pointing_game']:.3f}, "
                       f"mu {numbers['mu']:.3f}, mu_w {numbers['mu_w']:.3f}")
        out = _ensure_dir(out_dir)
        for line in table(results):
            click.echo(line)
        click.echo(f"(accuracy on the {results['correctly_classified']} correctly classified samples, "
                   f"{results['ranking']} relevance per {results['unit']}; AOPC: MoRF region perturbation of the "
                   "explained value, the input of the Softmax if there is one)")
        _write_bytes(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
        _write_bytes(out / "results.csv", results_csv(results).encode())
        save_plots(results, out)
    click.echo(f"wrote {_show(out / 'results.json')}, results.csv, masked_accuracy.png, aopc.png")
    return results


# ----------------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------------


def run_demo(out_dir="onnxlrp-demo") -> dict:
    """Compile the bundled digits CNN with R-LRP, explain the 10 bundled samples, run a small evaluation."""
    from .compiler import compile as compile_model
    from .loading import save_model_atomic

    _check_out_dir(out_dir)
    models = _models_dir()
    source = models / "digits_cnn.onnx"
    out = _ensure_dir(out_dir)
    with _sigterm_unwinds():
        compiled_path = save_model_atomic(compile_model(str(source), "rlrp"), out / "digits_cnn.rlrp.onnx")
        click.echo(f"compiled {_show(source.name)} with rlrp -> {_show(compiled_path)}")
        explained = run_explain(str(compiled_path), [str(models / "samples")], out_dir=out / "heatmaps",
                                target="predicted", preprocess="none", overlay=True, batch_size=32, rule="rlrp")
        results = run_evaluate(str(source), data="builtin:digits", rules="rlrp,lrp0,epsilon", limit=200,
                               out_dir=out / "evaluate")
    click.echo("")
    click.echo(f"compiled model:   {_show(compiled_path)}")
    click.echo(f"heatmaps (PNG):   {_show(out / 'heatmaps')}/*.png")
    click.echo(f"relevance (.npy): {_show(out / 'heatmaps')}/*.npy  (float32 [1, 28, 28] each, "
               "numpy.load(path))")
    click.echo(f"evaluation:       {_show(out / 'evaluate')}/results.json, results.csv, masked_accuracy.png, "
               "aopc.png")
    return {"compiled": str(compiled_path), "explained": explained, "evaluate": results}
