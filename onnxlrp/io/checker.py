"""onnx's own checker and shape inference, optionally in a child process (``--isolate``).

They run on a light copy of the model (large initializers replaced by graph inputs of the same type and shape); in
a child process a native crash of onnx becomes an :class:`~onnxlrp.errors.OnnxlrpError` instead of killing the
caller.  The inferred ``value_info`` is copied back into the model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import ModelProto

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import first_line, reason
from onnxlrp.naming import escape_terminal

from .tensors import is_external
from .wire import serialized_size

__all__ = ["ISOLATE_TIMEOUT_S", "child_main", "copy_fields", "native_check"]

#: Seconds the isolated onnx check may take.
ISOLATE_TIMEOUT_S = 600
#: Initializers larger than this are replaced by graph inputs in the copy handed to onnx's checker.
_LIGHT_MIN_TENSOR_BYTES = 64 * 1024


def copy_fields(src, dst, skip: set[str]) -> None:  # noqa: ANN001 - any protobuf message
    """Copy every set field of ``src`` to ``dst`` except those named in ``skip``."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _light_copy(model: ModelProto) -> ModelProto:
    """The model without its large initializers, which become graph inputs of the same type/shape."""
    light = ModelProto()
    copy_fields(model, light, {"graph"})
    graph = light.graph
    copy_fields(model.graph, graph, {"initializer"})
    inputs = {vi.name for vi in model.graph.input}
    for t in model.graph.initializer:
        if serialized_size(t) <= _LIGHT_MIN_TENSOR_BYTES and not is_external(t):
            graph.initializer.add().CopyFrom(t)
        elif t.name not in inputs:
            vi = graph.input.add()
            vi.name = t.name
            vi.type.tensor_type.elem_type = t.data_type
            shape = vi.type.tensor_type.shape
            for d in t.dims:
                shape.dim.add().dim_value = d
            if len(t.dims) == 0:
                vi.type.tensor_type.shape.SetInParent()
    return light


def _check_and_infer(data: bytes) -> bytes:
    """What runs in the child: onnx's checker and shape inference on a serialized (light) model.

    onnx's checker wants a shape on every main-graph output, which onnxruntime does not; outputs
    without one (a custom op's, say) are left out of the checker's copy only.
    """
    model = ModelProto()
    model.ParseFromString(data)
    outputs = list(model.graph.output)
    shaped = [o for o in outputs if not (o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape"))]
    if len(shaped) != len(outputs):
        del model.graph.output[:]
        model.graph.output.extend(shaped)
        onnx.checker.check_model(model, full_check=False)
        del model.graph.output[:]
        model.graph.output.extend(outputs)
    else:
        onnx.checker.check_model(model, full_check=False)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    return inferred.SerializeToString()


def child_main() -> int:
    """The child process: a serialized light model on stdin, the model with inferred shapes on stdout."""
    data = sys.stdin.buffer.read()
    try:
        out = _check_and_infer(data)
    except Exception as err:  # noqa: BLE001 - reported to the parent as text
        sys.stderr.write(first_line(err) + "\n")
        return 3
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return 0


# Run by ``sys.executable -c``; argv[1] is the parent's sys.path as JSON.
_CHILD_CODE = (
    "import json, sys\n"
    "sys.path[:] = json.loads(sys.argv[1])\n"
    "from onnxlrp.io.checker import child_main\n"
    "sys.exit(child_main())\n"
)


def _run_isolated(light: bytes, shown: str) -> bytes:
    package_root = str(Path(__file__).resolve().parents[2])
    child_path = [package_root] + [p for p in sys.path if p != package_root]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_CODE, json.dumps(child_path)],
            input=light,
            capture_output=True,
            timeout=ISOLATE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise OnnxlrpError(f"{shown}: onnx did not finish checking the model within {ISOLATE_TIMEOUT_S} s") from None
    except OSError as err:
        raise OnnxlrpError(f"{shown}: cannot start the isolated onnx check ({reason(err)})") from None
    if proc.returncode < 0:
        sig = -proc.returncode
        try:
            name = f"signal {sig}, {signal.Signals(sig).name}"
        except ValueError:
            name = f"signal {sig}"
        raise OnnxlrpError(f"onnx crashed while checking {shown} ({name})")
    lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    detail = escape_terminal(lines[-1][:500]) if lines else "no message"
    if proc.returncode == 3:
        raise OnnxlrpError(f"{shown}: invalid ONNX model ({detail})")
    if proc.returncode != 0:
        raise OnnxlrpError(f"onnx failed while checking {shown} (exit code {proc.returncode}: {detail})")
    return proc.stdout


def native_check(model: ModelProto, shown: str, isolate: bool) -> None:
    """Run onnx's checker and shape inference on a light copy of ``model`` (in a child process when ``isolate``)
    and copy the inferred ``value_info`` and output types back into ``model``."""
    light = _light_copy(model)
    data = light.SerializeToString()
    del light
    if isolate:
        out = _run_isolated(data, shown)
    else:
        try:
            out = _check_and_infer(data)
        except Exception as err:  # noqa: BLE001 - ValidationError, InferenceError, anything onnx raises
            raise OnnxlrpError(f"{shown}: invalid ONNX model ({first_line(err)})") from None
    inferred = ModelProto()
    try:
        inferred.ParseFromString(out)
    except Exception as err:  # noqa: BLE001
        raise OnnxlrpError(f"{shown}: onnx returned an unreadable model ({first_line(err)})") from None
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(inferred.graph.value_info)
    if len(inferred.graph.output) == len(model.graph.output):
        for mine, theirs in zip(model.graph.output, inferred.graph.output, strict=True):
            if mine.name == theirs.name:
                mine.CopyFrom(theirs)
