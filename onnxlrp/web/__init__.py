"""``onnxlrp web``: a static page bundle that explains images in the browser with onnxruntime-web.

The folder holds ``index.html``, ``app.js`` and ``style.css`` (this package's assets), ``model.onnx`` (the compiled
model: forward pass and relevance), ``config.json`` (what the page needs to know about the model) and ``ort/``
(onnxruntime-web's WebGPU build and its WebAssembly files, with their license). Any static file server serves it,
``python -m http.server`` included; the page fetches nothing from elsewhere.

onnxruntime-web is not part of onnxlrp's wheel: its WebAssembly binary alone is 27 MB (the wheel is well under a
tenth of that), and a copy in the wheel would age with every onnxruntime release. ``npm install onnxruntime-web``
fetches it (the version the tests run is :data:`TESTED_ORT_WEB`); ``--ort-web`` names the folder, or the bundle
takes it from ``node_modules/onnxruntime-web`` in the current folder or a folder above.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import onnx

from onnxlrp.apps.models import prepare
from onnxlrp.apps.preprocess import make_preprocess
from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import sigterm_guard
from onnxlrp.io.atomic import umask_mode
from onnxlrp.io.wire import serialized_size
from onnxlrp.messages import reason, show

__all__ = ["ORT_FILES", "TESTED_ORT_WEB", "find_ort_web", "write_bundle"]

TESTED_ORT_WEB = "1.30.0"
#: onnxruntime-web's files the page loads: the WebGPU build (its WebAssembly backend runs where WebGPU is missing)
ORT_FILES = ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
ASSETS = ("index.html", "app.js", "style.css")
MARKER = "config.json"  # a folder holding it with "format": FORMAT was written by this command
FORMAT = "onnxlrp-web 1"
BROWSER_MODEL_BYTES = 2**31 - 1  # a browser takes the model as one ArrayBuffer, without external data
ORT_NOTICE = """The files in this folder are ONNX Runtime Web {version} (the npm package onnxruntime-web),
Copyright (c) Microsoft Corporation, licensed under the MIT License:
https://github.com/microsoft/onnxruntime/blob/main/LICENSE
"""


def find_ort_web(given: str | os.PathLike | None = None) -> tuple[Path, str]:
    """onnxruntime-web's ``dist`` folder and its version: from ``given`` (the package folder or its ``dist``), or
    ``node_modules/onnxruntime-web`` in the current folder or one above it."""
    if given is not None:
        candidates = [Path(given)]
    else:
        here = Path.cwd().resolve()
        candidates = [folder / "node_modules" / "onnxruntime-web" for folder in (here, *here.parents)]
    for candidate in candidates:
        for dist in (candidate / "dist", candidate):
            if all((dist / name).is_file() for name in ORT_FILES):
                package = dist.parent / "package.json" if dist.name == "dist" else dist / "package.json"
                try:
                    version = json.loads(package.read_text(encoding="utf-8")).get("version", "unknown")
                except (OSError, ValueError):
                    version = "unknown"
                return dist, str(version)
    where = show(Path(given)) if given is not None else "node_modules/onnxruntime-web (here or in a folder above)"
    raise OnnxlrpError(f"onnxruntime-web not found in {where}: run `npm install onnxruntime-web@{TESTED_ORT_WEB}` "
                       "or pass --ort-web with its folder (it needs dist/" + ", dist/".join(ORT_FILES) + ")")


def classes_of(model: onnx.ModelProto, explained: str) -> int | None:
    """The number of classes of the explained tensor ``[batch, K]``, when its shape says."""
    for vi in list(model.graph.output) + list(model.graph.value_info):
        if vi.name == explained:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 2 and dims[1].HasField("dim_value"):
                return dims[1].dim_value
    return None


def write_bundle(model, out_dir: str | os.PathLike | None = None, *, preprocess: str = "none",
                 ort_web: str | os.PathLike | None = None, pad: bool | None = None, **compile_options) -> Path:
    """Write the page bundle of ``model`` (compiled with ``compile_options`` unless it was compiled already) into
    ``out_dir`` (default: ``MODEL_STEM-web``). ``pad``: show the drawing pad (default: for one-channel inputs).

    The folder appears whole or not at all: everything is written into a temporary folder beside it, which then
    takes its name. An existing folder is replaced only when it is an earlier bundle of this command."""
    dist, version = find_ort_web(ort_web)
    shown_model = show(model) if isinstance(model, (str, os.PathLike)) else "the model"
    prepared = prepare(model, shown_as=model, **compile_options)
    if len(prepared.chw) != 3 or prepared.chw[0] not in (1, 3):
        raise OnnxlrpError(f"{shown_model}: the page explains images: its input must be [N, 1 or 3, H, W], not "
                           f"[N, {', '.join(map(str, prepared.chw))}]")
    declared = next(i for i in prepared.model.graph.input if i.name == prepared.input_name)
    if declared.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise OnnxlrpError(f"{shown_model}: the page feeds float32 images; this model's input is "
                           f"{onnx.helper.tensor_dtype_to_np_dtype(declared.type.tensor_type.elem_type)}")
    channels = prepared.chw[0]
    steps = make_preprocess(preprocess, channels)
    if serialized_size(prepared.model) > BROWSER_MODEL_BYTES:
        raise OnnxlrpError(f"{shown_model}: the compiled model is larger than 2 GB, more than a browser loads")
    stem = Path(model).stem if isinstance(model, (str, os.PathLike)) else "model"
    out = Path(out_dir) if out_dir is not None else Path(f"{stem}-web")
    check_bundle_folder(out)
    config = {
        "format": FORMAT, "name": stem, "model": "model.onnx", "rule": prepared.rule, "input": prepared.input_name,
        "shape": list(prepared.chw), "score": prepared.score, "explained": prepared.explained,
        "classes": classes_of(prepared.model, prepared.explained),
        "preprocess": {"name": steps.name, "scale": steps.scale.tolist(), "mean": steps.mean.tolist(),
                       "std": steps.std.tolist()},
        "pad": channels == 1 if pad is None else bool(pad),
        "ort": {"version": version, "script": f"ort/{ORT_FILES[0]}"},
    }
    files = {name: resources.files("onnxlrp.web").joinpath("assets", name).read_bytes() for name in ASSETS}
    files["config.json"] = (json.dumps(config, indent=1) + "\n").encode()
    files["model.onnx"] = prepared.model.SerializeToString()
    files["ort/NOTICE.txt"] = ORT_NOTICE.format(version=version).encode()
    return publish(out, files, {f"ort/{name}": dist / name for name in ORT_FILES})


def check_bundle_folder(out: Path) -> None:
    """Refuse (one line) a destination that is a file, a link, or a folder that is not an earlier bundle."""
    if out.is_symlink():
        raise OnnxlrpError(f"refusing to write {show(out)}: it is a symbolic link")
    if out.exists() and not out.is_dir():
        raise OnnxlrpError(f"{show(out)}: is a file, not a folder (choose another output folder)")
    if out.is_dir() and any(out.iterdir()) and not is_bundle(out):
        raise OnnxlrpError(f"{show(out)}: the folder holds other files; choose a new or empty folder (an earlier "
                           "page bundle is replaced)")
    if not out.parent.is_dir():
        raise OnnxlrpError(f"cannot write {show(out)}: folder {show(out.parent)} does not exist")


def is_bundle(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def publish(out: Path, files: dict[str, bytes], copies: dict[str, Path]) -> Path:
    """Write ``files`` and ``copies`` into a temporary folder beside ``out``, then put it in ``out``'s place."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise OnnxlrpError(f"cannot write {show(out)}: {reason(err)}") from None
    old = None
    try:
        with sigterm_guard(f"writing {show(out)}"):
            (staging / "ort").mkdir()
            for name, data in files.items():
                (staging / name).write_bytes(data)
            for name, source in copies.items():
                shutil.copyfile(source, staging / name)
            mode = umask_mode()
            os.chmod(staging, mode | (mode & 0o444) >> 2)  # mkdtemp's 0o700 -> a new folder's mode
            if out.exists():
                old = out.with_name(f".{out.name}.{staging.name[-12:]}.old")
                os.replace(out, old)
            try:
                os.replace(staging, out)
            except BaseException:
                if old is not None:  # the earlier bundle goes back
                    os.replace(old, out)
                    old = None
                raise
    except OSError as err:
        raise OnnxlrpError(f"cannot write {show(out)}: {reason(err)}") from None
    finally:
        with contextlib.suppress(OSError):
            if staging.exists():
                shutil.rmtree(staging)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out

