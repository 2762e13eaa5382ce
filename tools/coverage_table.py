"""Run the architecture x exporter x rule matrices and write docs/coverage.md.

    python tools/coverage_table.py [--out docs/coverage.md] [--rules rlrp,epsilon,...] [--no-torch] [--no-tf]
                                   [--torch-exports ts13,ts17,dynamo18]

Sources (all under tests/):

* ``zoo_models.ZOO``: classic model-zoo architectures as the old converters wrote them (opset 7-9, IR 3);
* ``zoo_models.keras_cnn``: a keras2onnx-style NHWC CNN (hand-built);
* ``test_sklearn_keras``: an sklearn MLPClassifier through skl2onnx (with and without ZipMap) and, when tensorflow
  and tf2onnx import, a Keras CNN through tf2onnx;
* ``torch_models`` (when it imports: it needs torch): its ``ARCHITECTURES`` exported with its ``EXPORTS`` (batch 2
  static, and ts17 with a dynamic batch). This is the hook for the PyTorch matrix; without the module the table says
  so and covers the rest;
* graph features (:func:`graph_feature_cases`): Resize/Upsample (a PyTorch decoder, old Upsample files), element-wise
  Max (maxout), a tf2onnx learning-phase If, and models explained at a ``node_input`` (an STFT front-end, a token
  embedding); their relevance has the node input's shape;
* ``gated_models`` (torch and torchvision; Keras rows need tensorflow and tf2onnx): EfficientNet-B0, MobileNetV3-Small,
  ConvNeXt-T and a YOLO-like SiLU network by both torch exporters, Keras EfficientNetB0, MobileNetV3Small and a
  LayerNorm/GroupNorm network through tf2onnx, and a paddle-style hand-built graph (``test_gated_models``).

Each cell compiles the model *as given*. "pass" means: it compiles, runs in onnxruntime, the original outputs match
the source model's, and the relevance is sane (right shape, finite, not all zero; for R-LRP also
``sum|R| == |logit|``). A cell that fails with a known compiler bug (see ``zoo_models.known_bug``) is marked with the
bug and the result of the same checks on a work-around (see ``compile_known``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import zoo_models as zm  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import onnxlrp  # noqa: E402
from onnxlrp.contract import CLASS_OUTPUT, PREDICTED, TARGET_INPUT, is_relevance_output  # noqa: E402
from onnxlrp.errors import OnnxlrpError, UnsupportedOpError  # noqa: E402

DEFAULT_RULES = zm.RULES
COMMAND = "python tools/coverage_table.py"


@dataclass
class Case:
    architecture: str
    exporter: str
    build: Callable[[], onnx.ModelProto]
    feeds: Callable[[], dict]
    logits: str | None = None  # the tensor explained (None: found behind the Softmax of the explained output)
    kwargs: dict = field(default_factory=dict)  # extra compile arguments (output=...)
    bias_free: Callable[[], tuple[onnx.ModelProto, str | None]] | None = None  # (model, logits) for conservation


@dataclass
class Cell:
    status: str  # "pass", "FAIL", "xfail"
    deviation: float | None = None
    sanity: str = ""
    error: str = ""
    bugs: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- sources


def zoo_cases() -> list[Case]:
    cases = []
    for name, build in zm.ZOO.items():
        z = build()
        opset = next(i.version for i in z.model.opset_import if i.domain in ("", "ai.onnx"))
        cases.append(Case(name, f"hand-built, old-converter style (opset {opset}, IR {z.model.ir_version})",
                          lambda z=z: z.model,
                          lambda z=z: {z.input_name: z.sample()}, z.logits,
                          bias_free=lambda build=build: (build(bias=False).model, build(bias=False).logits)))
    z = zm.keras_cnn()
    cases.append(Case("keras_cnn (NHWC)", "hand-built, keras2onnx style (opset 11, IR 6)", lambda: z.model,
                      lambda: {z.input_name: z.sample()}, z.logits,
                      bias_free=lambda: (zm.keras_cnn(bias=False).model, zm.keras_cnn(bias=False).logits)))
    return cases


def sklearn_cases() -> tuple[list[Case], str]:
    try:
        import skl2onnx
        import test_sklearn_keras as tsk
    except Exception as err:  # noqa: BLE001
        return [], f"scikit-learn/skl2onnx not importable: {err}"

    def feeds():
        return {"X": tsk.mlp()[1][:16]}

    version = f"skl2onnx {skl2onnx.__version__}"
    return [
        Case("sklearn MLPClassifier (digits)", f"{version}, zipmap=False", lambda: tsk.mlp_onnx(False), feeds),
        Case("sklearn MLPClassifier (digits)", f"{version}, ZipMap, output=output_probability",
             lambda: tsk.mlp_onnx(True), feeds, kwargs={"output": "output_probability"}),
    ], ""


def tf_cases() -> tuple[list[Case], str]:
    try:
        import pytest
        import test_sklearn_keras as tsk

        tsk.tf2onnx_cnn_bytes(True)
        import tensorflow as tf
        import tf2onnx
    except (Exception, pytest.skip.Exception) as err:  # noqa: BLE001
        return [], f"tensorflow/tf2onnx not usable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    exporter = f"tf2onnx {tf2onnx.__version__} (TF {tf.__version__}, opset 13)"
    return [Case("keras_cnn (NHWC)", exporter, lambda: tsk.tf2onnx_cnn(True)[0],
                 lambda: {"image": tsk.keras_sample()}, bias_free=lambda: tsk.tf2onnx_cnn(False))], ""


def torch_cases(exports: list[str] | None) -> tuple[list[Case], str]:
    """The hook for tests/torch_models.py (written separately): every architecture x export it defines."""
    try:
        import torch
        import torch_models as tm
    except Exception as err:  # noqa: BLE001
        return [], f"tests/torch_models.py not importable ({type(err).__name__}: {err}); PyTorch rows left out"
    names = exports or [*tm.EXPORTS, "ts17+dynamic"]
    cases = []
    for arch in tm.ARCHITECTURES:
        for name in names:
            export, dynamic = name.removesuffix("+dynamic"), name.endswith("+dynamic")
            exporter, opset = tm.EXPORTS[export]
            label = f"torch {torch.__version__.split('+')[0]} {exporter} (opset {opset}" + \
                (", dynamic batch)" if dynamic else ", batch 2)")
            cases.append(Case(arch, label, lambda arch=arch, export=export, dynamic=dynamic: tm.exported(
                arch, export, dynamic_batch=dynamic), lambda arch=arch: {tm.INPUT_NAME: tm.sample_input(arch)}))
    return cases, ""


def graph_feature_cases() -> tuple[list[Case], str]:
    """The models of tests/test_resize.py, test_extremum.py, test_control_flow.py and test_node_input.py."""
    import test_node_input as tni
    import test_resize as trs

    rng = np.random.default_rng(5)
    cases = [
        Case("Upsample (linear, opset 9)", "hand-built, old-converter style (opset 9, IR 5)",
             lambda: trs.legacy_upsample_model("Upsample", 9, "linear"),
             lambda: {"x": rng.random((2, 2, 3, 3), dtype=np.float32)}),
        Case("audio: STFT front-end, node_input=spec", "hand-built (opset 18)", tni.audio_model,
             lambda: {"wave": tni.waves()}, kwargs={"node_input": "spec"}),
        Case("tokens: embedding lookup, node_input=emb", "hand-built (opset 18)", tni.token_model,
             lambda: {"ids": np.array([[1, 2, 3, 4, 5], [0, 0, 7, 10, 2]], np.int64)}, kwargs={"node_input": "emb"}),
    ]
    notes = []
    try:
        import test_extremum as tex
        import torch
        import torch_models as tm

        version = torch.__version__.split("+")[0]
        for export, dynamic in (("ts17", False), ("ts17", True), ("dynamo18", False)):
            exporter, opset = tm.EXPORTS[export]
            label = f"torch {version} {exporter} (opset {opset}" + (", dynamic batch)" if dynamic else ", batch 2)")
            cases.append(Case("decoder: nn.Upsample nearest, F.interpolate bilinear (size) and bicubic", label,
                              lambda exporter=exporter, opset=opset, dynamic=dynamic: tm.export(
                                  trs.torch_upsampling_net(), torch.rand(2, 3, 8, 8), exporter=exporter,
                                  opset=opset, dynamic_batch=dynamic),
                              lambda: {tm.INPUT_NAME: rng.random((2, 3, 8, 8), dtype=np.float32)}))
            if not dynamic:
                cases.append(Case("maxout (torch.maximum of two branches)", label,
                                  lambda exporter=exporter, opset=opset: tm.export(
                                      tex.maxout_module(), torch.rand(2, 5), exporter=exporter, opset=opset),
                                  lambda: {tm.INPUT_NAME: rng.normal(size=(2, 5)).astype(np.float32)}))
    except Exception as err:  # noqa: BLE001
        notes.append(f"PyTorch graph-feature rows left out: {err}")
    try:
        import tensorflow as tf
        import test_control_flow as tcf
        import tf2onnx

        tcf.tf2onnx_learning_phase_model()
        cases.append(Case("BatchNorm under a learning-phase tf.cond (If)",
                          f"tf2onnx {tf2onnx.__version__} (TF {tf.__version__}, TF1-style graph, opset 13)",
                          tcf.tf2onnx_learning_phase_model, lambda: {"x:0": tcf.sample()}))
    except Exception as err:  # noqa: BLE001
        notes.append(f"tf2onnx If row left out: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return cases, "; ".join(notes)
def gated_cases(with_tf: bool) -> tuple[list[Case], str]:
    """Networks with gated activations, gates and normalizations (tests/gated_models.py)."""
    try:
        import gated_models as gm
        import test_gated_models as tgm
        import torch
    except Exception as err:  # noqa: BLE001
        return [], f"tests/gated_models.py not importable ({type(err).__name__}: {err}); those rows left out"
    version = torch.__version__.split("+")[0]
    cases = [Case(f"{name} ({gm.TORCH_MODELS[name]}x{gm.TORCH_MODELS[name]})",
                  f"torch {version} {exporter} (opset {opset}, batch 2)",
                  lambda case=(name, exporter, opset): gm.torch_export(*case),
                  lambda name=name: {"input": gm.sample(name)}) for name, exporter, opset in tgm.TORCH_CASES]
    if with_tf:
        try:
            import tf2onnx

            for name in tgm.KERAS_PATTERNS:
                size = "6x6x8" if name == "norms" else f"{gm.KERAS_SIZE}x{gm.KERAS_SIZE}"
                cases.append(Case(f"Keras {name} ({size}, NHWC)", f"tf2onnx {tf2onnx.__version__} (opset 13)",
                                  lambda name=name: gm.keras_export(name),
                                  lambda name=name: {"image": gm.keras_sample(name)}))
        except Exception:  # noqa: BLE001
            pass
    cases.append(Case("paddle-style HardSwish, SE gate, LayerNorm", "hand-built, paddle2onnx style (opset 11, IR 7)",
                      lambda: tgm.paddle_style()[0],
                      lambda: {"x": np.random.default_rng(6).normal(size=(2, 6)).astype(np.float32)}))
    return cases, ""


# ---------------------------------------------------------------- known compiler bugs

# Bugs these matrices found (fixed since: B1, B2 in d486035, B3 in 75ceaa0). A cell that meets one again is marked
# with it, and the checks run on a work-around, so that the rest of the row still says something.
BUG_TEXT = {
    "B1": "an IR-3 file (every initializer also a graph input) below opset 13 fails: `cannot upgrade the model from "
          "opset 7 to 13: Input ... is undefined!` (`canonicalize` removes the initializers from `graph.input` "
          "before the opset upgrade, while `ir_version` is still 3). Work-around: the same graph saved as IR 4.",
    "B2": "a Softmax that does not write the explained graph output itself (Softmax -> Identity in skl2onnx "
          "`zipmap=False`, Softmax -> ZipMap, and Flatten -> Softmax -> Reshape, which is what the opset-13 upgrade "
          "makes of a Softmax on a 4-D tensor) stays on the relevance path: `UnsupportedOpError ... (Softmax ...)`. "
          "Work-around: `node_output=` the Softmax's input.",
    "B3": "a model whose input has a static batch size above 1 compiles into a model onnxruntime refuses to load: "
          "`Shape of initializer target does not match. {2} != {1}` (`RelevancePass.finish` declares `target` as "
          "int64 [2] with the default `[-1]` of shape [1]). Work-around: a default of the declared size.",
}


def known_bug(err: Exception) -> str | None:
    """The known bug a compile error comes from (recognized by its exact message), else None."""
    text = str(err)
    if isinstance(err, OnnxlrpError) and "cannot upgrade the model from opset" in text and "is undefined!" in text:
        return "B1"
    if isinstance(err, UnsupportedOpError) and "(Softmax, domain ai.onnx" in text:
        return "B2"
    return None


def as_ir4(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph as an IR-4 file: initializers are no longer listed as graph inputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name for t in out.graph.initializer}
    kept = [v for v in out.graph.input if v.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    out.ir_version = max(out.ir_version, 4)
    return out


def static_batch_mismatch(compiled: onnx.ModelProto) -> bool:
    """B3: the compiled model declares ``target`` with a static size its default initializer does not have."""
    declared = next((v for v in compiled.graph.input if v.name == TARGET_INPUT), None)
    default = next((t for t in compiled.graph.initializer if t.name == TARGET_INPUT), None)
    if declared is None or default is None:
        return False
    dims = [d.dim_value if d.HasField("dim_value") else None for d in declared.type.tensor_type.shape.dim]
    return len(dims) == 1 and dims[0] is not None and list(default.dims) != dims


def compile_known(model: onnx.ModelProto, rule: str, logits: str, **kwargs) -> tuple[onnx.ModelProto, list[str]]:
    """``onnxlrp.compile(model, rule, **kwargs)``; where a known bug stops it, compile a work-around of the same
    graph (an IR-4 copy; ``node_output=logits``) or fix the result (B3). Returns the model and the bugs met."""
    bugs: list[str] = []
    for _ in range(3):
        try:
            compiled = onnxlrp.compile(model, rule, **kwargs)
        except OnnxlrpError as err:
            bug = known_bug(err)
            if bug is None or bug in bugs:
                raise
            bugs.append(bug)
            if bug == "B1":
                model = as_ir4(model)
            else:
                kwargs.pop("output", None)
                kwargs["node_output"] = logits
            continue
        if static_batch_mismatch(compiled):
            bugs.append("B3")
            size = next(v for v in compiled.graph.input if v.name == TARGET_INPUT).type.tensor_type.shape.dim[0]
            default = next(t for t in compiled.graph.initializer if t.name == TARGET_INPUT)
            default.CopyFrom(numpy_helper.from_array(np.full(size.dim_value, PREDICTED, np.int64), TARGET_INPUT))
        return compiled, bugs
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- checks


def logits_behind(model: onnx.ModelProto, output: str) -> str:
    """The tensor a Softmax reads behind ``output`` (through Identity/Reshape/Flatten/Squeeze/ZipMap), or
    ``output`` itself."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name, node = output, producer.get(output)
    while node is not None and node.op_type in ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "ZipMap"):
        name = node.input[0]
        node = producer.get(name)
    return node.input[0] if node is not None and node.op_type in ("Softmax", "LogSoftmax") else output


def explained_output(model: onnx.ModelProto, kwargs: dict) -> str:
    if "output" in kwargs:
        return kwargs["output"]
    floats = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT,
                                                                                      onnx.TensorProto.FLOAT16)]
    return floats[0] if floats else model.graph.output[0].name


def deviation(got, want) -> float:
    if isinstance(want, list):  # a ZipMap: a list of {class: probability}
        return max((abs(g[k] - w[k]) for g, w in zip(got, want, strict=True) for k in w), default=0.0)
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)))) if np.size(want) else 0.0


def run_cell(case: Case, rule: str) -> Cell:
    start = time.perf_counter()
    model, feeds = case.build(), case.feeds()
    logits = case.logits or logits_behind(model, explained_output(model, case.kwargs))
    try:
        compiled, bugs = compile_known(model, rule, logits, **case.kwargs)
    except OnnxlrpError as err:
        return Cell("FAIL", error=str(err)[:160], seconds=time.perf_counter() - start)
    outputs = [o.name for o in model.graph.output]
    try:
        want = dict(zip(outputs, zm.session(model).run(outputs, feeds), strict=True))
        want_logits = zm.run_source(model, feeds, [logits])[0]
        got = zm.run_compiled(compiled, feeds)
    except Exception as err:  # noqa: BLE001 - onnxruntime's errors have many types
        return Cell("FAIL", error=f"run: {str(err).splitlines()[0][:160]}", bugs=bugs,
                    seconds=time.perf_counter() - start)
    dev = max(deviation(got[name], want[name]) for name in outputs)
    problems = []
    relevance = {k: v for k, v in got.items() if is_relevance_output(k)}
    node_inputs = case.kwargs.get("node_input")
    for name, r in relevance.items():
        if "." in name:
            source = name.split(".", 1)[1]
        elif node_inputs:
            source = node_inputs if isinstance(node_inputs, str) else node_inputs[0]
        else:
            source = next(k for k, v in feeds.items() if np.issubdtype(v.dtype, np.floating))
        shape = feeds[source].shape if source in feeds else zm.run_source(model, feeds, [source])[0].shape
        if r.shape != shape:
            problems.append("shape")
        if not np.isfinite(r).all():
            problems.append("non-finite")
        elif not (np.abs(r).reshape(len(r), -1).sum(1) > 0).all():
            problems.append("zero")
    if rule == "rlrp" and not problems:
        batch = len(want_logits)
        explained = np.abs(want_logits.reshape(batch, -1)[np.arange(batch), got[CLASS_OUTPUT]])
        mass = sum(np.abs(r).reshape(batch, -1).sum(1) for r in relevance.values())
        if not np.allclose(mass, explained, rtol=1e-4):
            problems.append("sum|R| != |logit|")
    if dev > 1e-4 * max(1.0, max(float(np.max(np.abs(w))) for w in want.values() if not isinstance(w, list))):
        problems.append("outputs changed")
    status = "FAIL" if problems else ("xfail" if bugs else "pass")
    return Cell(status, dev, ", ".join(problems) or "ok", bugs=bugs, seconds=time.perf_counter() - start)


def conservation(case: Case, rule: str, params: dict) -> str:
    model, logits = case.bias_free()
    feeds = case.feeds()
    logits = logits or logits_behind(model, explained_output(model, case.kwargs))
    try:
        compiled, bugs = compile_known(model, rule, logits, **params)
        got = zm.run_compiled(compiled, feeds)
    except Exception as err:  # noqa: BLE001
        return f"FAIL: {str(err).splitlines()[0][:80]}"
    want = zm.run_source(model, feeds, [logits])[0]
    batch = len(want)
    explained = want.reshape(batch, -1)[np.arange(batch), got[CLASS_OUTPUT]]
    total = sum(r.reshape(batch, -1).sum(1) for k, r in got.items() if is_relevance_output(k))
    error = float(np.max(np.abs(total - explained) / np.abs(explained)))
    mark = "pass" if error < 1e-3 else "FAIL"
    return f"{mark} {error:.0e}" + (f" [{bug_ids(bugs)}]" if bugs else "")


# ---------------------------------------------------------------- the document

def bug_ids(bugs: list[str]) -> str:
    return ",".join(bugs)


def render_cell(cell: Cell) -> str:
    if cell.status == "FAIL" and cell.deviation is None:
        return "**FAIL**: " + cell.error.replace("|", "\\|")
    dev = f"{cell.deviation:.0e}" if cell.deviation else "0"
    if cell.status == "xfail":
        return f"xfail [{bug_ids(cell.bugs)}] (w/a: {dev}, {cell.sanity})"
    mark = "pass" if cell.status == "pass" else "**FAIL**"
    return f"{mark} ({dev}, {cell.sanity})"


def revision() -> str:
    """The commit the table was made at, and whether the compiler's files had uncommitted changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "onnxlrp", "passes"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    package = Path(onnxlrp.__file__).resolve().parent
    if package != ROOT / "onnxlrp":
        return f"onnxlrp imported from {package.parent}, not this checkout (commit {head})"
    return f"commit {head}" + (" with uncommitted changes to onnxlrp/ or passes/" if dirty else "")


def write_doc(path: Path, argv: list[str], rules: list[str], rows: list[tuple[Case, dict]], conserve: list,
              notes: list[str], seconds: float) -> None:
    seen = {b for _, cells in rows for cell in cells.values() for b in cell.bugs}
    lines = [
        "# Coverage: architecture x exporter x rule",
        "",
        "Generated by:",
        "",
        "```",
        " ".join([COMMAND, *argv]),
        "```",
        "",
        f"onnx {onnx.__version__}, onnxruntime {__import__('onnxruntime').__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}; {revision()}; {len(rows) * len(rules)} cells in {seconds:.0f} s.",
        "",
        "Each cell compiles the source model **as given** and runs it in onnxruntime (CPU). `pass (d, sanity)`: "
        "compiled and ran; `d` is the largest absolute difference between the compiled model's original outputs "
        "and the source model's (onnxruntime; ZipMap values compared per class); `sanity` is `ok` when every "
        "relevance output has the shape of its input (or node input), is finite and not all zero for any sample, "
        "and, for R-LRP, "
        "`sum|R| == |logit|` per sample (rtol 1e-4). `xfail [B#]`: the compile fails, or its result does not load, "
        "because of a known compiler bug (below); the bracket gives the same checks on a work-around. "
        "`FAIL`: anything else.",
        "",
        "Known compiler bugs met in this table: " + ("none." if not seen else ""),
        "",
        *[f"* **{key}**: {BUG_TEXT[key]}" for key in sorted(seen)],
        *([""] if seen else []),
        "History: this matrix found B1 (IR-3 files below opset 13 failed the opset upgrade), B2 (a Softmax behind "
        "Identity/Reshape/ZipMap stayed on the relevance path: every skl2onnx model, squeezenet1.1) and B3 (a "
        "static batch size above 1 gave an unloadable model: every PyTorch export without a dynamic batch dim); "
        "B1 and B2 are fixed in d486035, B3 in 75ceaa0. A cell marks them only if they come back.",
        "",
    ]
    for note in notes:
        lines += [f"> {note}", ""]
    lines += ["| architecture | exporter | " + " | ".join(rules) + " |",
              "|---|---|" + "---|" * len(rules)]
    for case, cells in rows:
        lines.append(f"| {case.architecture} | {case.exporter} | "
                     + " | ".join(render_cell(cells[r]) for r in rules) + " |")
    if conserve:
        lines += ["", "## Conservation on bias-free variants", "",
                  "`sum(R)` against the explained logit (max relative error over the batch; pass below 1e-3), "
                  "LRP-0 and LRP-epsilon (epsilon = 1e-9), every bias and BatchNorm shift zero.", "",
                  "| architecture | exporter | lrp0 | epsilon (1e-9) |", "|---|---|---|---|"]
        for case, lrp0, eps in conserve:
            lines.append(f"| {case.architecture} | {case.exporter} | {lrp0} | {eps} |")
    failures = [(case, rule, cell) for case, cells in rows for rule, cell in cells.items() if cell.status == "FAIL"]
    if failures:
        lines += ["", "## Failures", ""]
        for case, rule, cell in failures:
            lines.append(f"* {case.architecture} / {case.exporter} / {rule}: {cell.error or cell.sanity}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    parser.add_argument("--rules", default=",".join(DEFAULT_RULES))
    parser.add_argument("--no-torch", action="store_true", help="leave out tests/torch_models.py")
    parser.add_argument("--no-tf", action="store_true", help="leave out the tf2onnx export")
    parser.add_argument("--no-gated", action="store_true", help="leave out tests/gated_models.py")
    parser.add_argument("--torch-exports", default=None,
                        help="comma-separated keys of torch_models.EXPORTS, '+dynamic' for a dynamic batch dim")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    rules = args.rules.split(",")
    start = time.perf_counter()
    notes: list[str] = []
    cases = zoo_cases()
    for source in (sklearn_cases, graph_feature_cases, None if args.no_tf else tf_cases,
                   None if args.no_torch else lambda: torch_cases(
                       args.torch_exports.split(",") if args.torch_exports else None),
                   None if args.no_gated else lambda: gated_cases(not args.no_tf)):
        if source is None:
            continue
        more, note = source()
        cases += more
        if note:
            notes.append(note)
    if args.no_tf:
        notes.append("tf2onnx rows left out (--no-tf)")
    if args.no_torch:
        notes.append("PyTorch rows left out (--no-torch)")
    if args.no_gated:
        notes.append("gated-activation and normalization rows left out (--no-gated)")
    rows, conserve = [], []
    for case in cases:
        cells = {}
        for rule in rules:
            try:
                cells[rule] = run_cell(case, rule)
            except Exception as err:  # noqa: BLE001 - the table reports, it does not stop
                traceback.print_exc()
                cells[rule] = Cell("FAIL", error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
            print(f"{case.architecture:32s} {case.exporter[:48]:48s} {rule:18s} {render_cell(cells[rule])}",
                  flush=True)
        rows.append((case, cells))
        if case.bias_free is not None:
            conserve.append((case, conservation(case, "lrp0", {}),
                             conservation(case, "epsilon", {"epsilon": 1e-9})))
    write_doc(Path(args.out), argv, rules, rows, conserve, notes, time.perf_counter() - start)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
