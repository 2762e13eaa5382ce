"""The provider matrix: every rule and composite, compiled from the bundled digits CNN and a small ResNet, run by
each execution provider, and compared with onnxruntime's CPU provider (the relevance within 1e-5 of the map's peak,
per sample, and the same explained classes).

    python tools/provider_matrix.py [--providers cpu,openvino,wasm,webgpu,webgpu-jsep,cuda,tensorrt]
                                    [--models digits,resnet] [--rules R1,R2,...] [--out docs/providers.md]

Providers:
- ``cpu``, ``cuda``, ``tensorrt``: onnxruntime in this Python (``tools/provider_runner.py``); CUDA and TensorRT only
  where a GPU and their libraries are there (otherwise their column says so);
- ``openvino``: onnxruntime-openvino's CPU device, in a virtual environment of its own (it installs its own
  onnxruntime): ``--openvino-python`` (default ``.venv-openvino/bin/python``; ``python3 -m venv .venv-openvino &&
  .venv-openvino/bin/pip install onnxruntime-openvino numpy`` makes it);
- ``wasm``, ``webgpu``: onnxruntime-web's WebGPU build (``ort.webgpu.min.mjs``, the one ``onnxlrp web`` bundles) with
  its WebAssembly and WebGPU execution providers, ``webgpu-jsep``: the default build's WebGPU kernels
  (``ort.min.mjs``), all in Debian's headless Chromium (WebGPU on SwiftShader) driven by Playwright, with
  onnxruntime-web from ``--ort-web`` (default tests/js/node_modules/onnxruntime-web; ``bash tests/js/install.sh``).

Writes the table to ``--out`` (Markdown) and every number to ``--json``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import http.server
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from archs import OnnxNet  # noqa: E402
from provider_runner import file_name  # noqa: E402

import onnxlrp  # noqa: E402
from onnxlrp.composites import COMPOSITES  # noqa: E402

TOLERANCE = 1e-5  # of the map's peak, per sample
LOCAL = ("cpu", "cuda", "tensorrt")
WEB = {"wasm": ("ort.webgpu.min.mjs", "wasm"), "webgpu": ("ort.webgpu.min.mjs", "webgpu"),
       "webgpu-jsep": ("ort.min.mjs", "webgpu")}
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-unsafe-webgpu",
                  "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan"]
HARNESS = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><script type="module">
window.run = async (script, ep, model, inputName, data, shape) => {
  const ort = await import('./ort/' + script);
  ort.env.wasm.numThreads = 1;
  ort.env.logLevel = 'error';
  const session = await ort.InferenceSession.create(model, {executionProviders: [ep]});
  const out = await session.run({[inputName]: new ort.Tensor('float32', Float32Array.from(data), shape),
                                 target: new ort.Tensor('int64', new BigInt64Array(shape[0]).fill(-1n), [shape[0]])});
  const result = {relevance: Array.from(out.relevance.data),
                  explained_class: Array.from(out.explained_class.data, Number)};
  await session.release();
  return result;
};
window.ready = true;
</script>"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def small_resnet(seed: int = 0) -> onnx.ModelProto:
    """A ResNet on 3x32x32 images, 10 classes, with what the large ones have: a 3x3 stride-2 max pool (overlapping
    windows), BatchNormalization, an identity block and a projection block with stride 2, global average pooling."""
    net = OnnxNet(seed)
    x = net.relu(net.bn(net.conv("input", "conv1", 3, 16, 3, 1, 1), "bn1", 16), "relu")
    x = net.maxpool(x, "maxpool", 3, 2, 1)
    y = net.relu(net.bn(net.conv(x, "layer1.conv1", 16, 16, 3, 1, 1), "layer1.bn1", 16), "layer1.relu1")
    y = net.bn(net.conv(y, "layer1.conv2", 16, 16, 3, 1, 1), "layer1.bn2", 16, gain=0.2)
    x = net.relu(net.add(y, x, "layer1.add"), "layer1.relu2")
    y = net.relu(net.bn(net.conv(x, "layer2.conv1", 16, 32, 3, 2, 1), "layer2.bn1", 32), "layer2.relu1")
    y = net.bn(net.conv(y, "layer2.conv2", 32, 32, 3, 1, 1), "layer2.bn2", 32, gain=0.2)
    shortcut = net.bn(net.conv(x, "layer2.downsample.0", 16, 32, 1, 2), "layer2.downsample.1", 32)
    x = net.relu(net.add(y, shortcut, "layer2.add"), "layer2.relu2")
    logits = net.gemm(net.flatten(net.global_avg_pool(x, "avgpool"), "flatten"), "fc", 32, 10)
    graph = helper.make_graph(net.nodes, "small_resnet",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", 10])], net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="provider-matrix")
    model.ir_version = 8
    return model


def models() -> dict[str, tuple[onnx.ModelProto | str, np.ndarray, str]]:
    """name -> (model, two samples, input name)."""
    data = np.load(ROOT / "models" / "digits_test.npz")
    digits = data[next(k for k in data.files if data[k].ndim >= 3)][:2].reshape(2, 1, 28, 28).astype(np.float32)
    images = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    return {"digits": (str(ROOT / "models" / "digits_cnn.onnx"), digits, "image"),
            "resnet": (small_resnet(), images, "input")}


def prepare(folder: Path, names: list[str], rules: list[str]) -> list[dict]:
    cases = []
    for name, (model, x, input_name) in models().items():
        if name not in names:
            continue
        np.save(folder / f"{name}.npy", x)
        for rule in rules:
            path = folder / f"{name}.{rule}.onnx"
            onnx.save(onnxlrp.compile(model, rule), path)
            cases.append({"id": f"{name}/{rule}", "model": path.name, "input": f"{name}.npy",
                          "input_name": input_name, "shape": list(x.shape)})
    (folder / "manifest.json").write_text(json.dumps(cases, indent=1))
    return cases


def run_python(provider: str, folder: Path, python: str) -> dict:
    done = subprocess.run([python, str(ROOT / "tools" / "provider_runner.py"), provider, str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{provider}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}")
    status = json.loads((folder / provider / "status.json").read_text())
    status["warnings"] = sorted({line.split("]", 1)[-1].strip()[:200] for line in done.stderr.splitlines()
                                 if "[W:onnxruntime" in line})
    return status


def run_web(providers: list[str], folder: Path, cases: list[dict], ort_web: Path) -> dict:
    """Each case in each web provider, a page per case; results saved like the Python runner's."""
    from playwright.sync_api import sync_playwright

    site = folder / "site"
    (site / "ort").mkdir(parents=True, exist_ok=True)
    for path in (ort_web / "dist").iterdir():
        if path.suffix in (".mjs", ".wasm"):
            shutil.copyfile(path, site / "ort" / path.name)
    (site / "index.html").write_text(HARNESS)
    for case in cases:
        shutil.copyfile(folder / case["model"], site / case["model"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    statuses = {}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            version = browser.version
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("window.ready")
            adapter = page.evaluate("async () => { const a = navigator.gpu && await navigator.gpu.requestAdapter(); "
                                    "return a ? `${a.info.vendor} ${a.info.architecture}`.trim() : null; }")
            for provider in providers:
                script, ep = WEB[provider]
                out = folder / provider
                out.mkdir(exist_ok=True)
                status = {"onnxruntime-web": json.loads((ort_web / "package.json").read_text())["version"],
                          "chromium": version, "webgpu_adapter": adapter, "cases": {}}
                for case in cases:
                    if ep == "webgpu" and adapter is None:
                        status["cases"][case["id"]] = {"error": "no WebGPU adapter in this Chromium"}
                        continue
                    x = np.load(folder / case["input"])
                    start = datetime.datetime.now()
                    # a page of its own per case: onnxruntime-web's JSEP WebGPU kernels return wrong values for a
                    # second model after another model's session ran in the same page (docs/onnxruntime-web-webgpu.md)
                    page.close()
                    page = browser.new_page()
                    page.goto(url)
                    page.wait_for_function("window.ready")
                    try:
                        got = page.evaluate("([s, e, m, n, d, sh]) => run(s, e, m, n, d, sh)",
                                            [script, ep, case["model"], case["input_name"], x.ravel().tolist(),
                                             list(x.shape)])
                        np.savez(out / f"{file_name(case['id'])}.npz",
                                 relevance=np.asarray(got["relevance"], np.float32).reshape(x.shape),
                                 explained_class=np.asarray(got["explained_class"]))
                        status["cases"][case["id"]] = {"ran_on": f"{script} {ep}", "seconds": (
                            datetime.datetime.now() - start).total_seconds()}
                    except Exception as err:  # noqa: BLE001 - any failure is a cell of the matrix
                        status["cases"][case["id"]] = {"error": str(err).splitlines()[0][:300]}
                    print(f"{provider} {case['id']}: {status['cases'][case['id']]}", flush=True)
                statuses[provider] = status
            browser.close()
    finally:
        server.shutdown()
    return statuses


def unoptimized(folder: Path, cases: list[dict]) -> dict[str, float]:
    """Per case, how far the CPU provider's relevance moves when onnxruntime runs the same graph without its graph
    optimizations (other fusions and kernels, so other float32 roundings; relative to each sample's peak): a case
    above the tolerance is ill-conditioned in float32, and providers that round differently cannot agree on it to
    the tolerance either. (Moving the input by an ulp instead flips max-pool winners at near ties: a discontinuity
    of the rules, not rounding.)"""
    import onnxruntime as ort

    moved = {}
    for case in cases:
        x = np.load(folder / case["input"])
        feeds = {case["input_name"]: x, "target": np.full(len(x), -1)}
        results = []
        for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            session = ort.InferenceSession(str(folder / case["model"]), options, providers=["CPUExecutionProvider"])
            results.append(session.run(["relevance"], feeds)[0].astype(np.float64))
        base, other = results
        moved[case["id"]] = float(max(np.abs(other[i] - base[i]).max() / np.abs(base[i]).max()
                                      for i in range(len(x))))
    return moved


def compare(folder: Path, provider: str, cases: list[dict], status: dict) -> dict:
    """Per case: the largest deviation from the CPU provider over the samples, relative to each sample's peak."""
    cells = {}
    for case in cases:
        info = status["cases"].get(case["id"], {"error": "not run"})
        if "error" in info:
            cells[case["id"]] = {"error": info["error"]}
            continue
        ours = np.load(folder / provider / f"{file_name(case['id'])}.npz")
        reference = np.load(folder / "cpu" / f"{file_name(case['id'])}.npz")
        r, want = ours["relevance"].astype(np.float64), reference["relevance"].astype(np.float64)
        peaks = np.abs(want).reshape(len(want), -1).max(1)
        deviation = float(max(np.abs(r[i] - want[i]).max() / peaks[i] for i in range(len(want))))
        same_class = bool(np.array_equal(ours["explained_class"], reference["explained_class"]))
        cells[case["id"]] = {"deviation": deviation, "same_class": same_class, "ran_on": info["ran_on"],
                             "passed": deviation <= TOLERANCE and same_class}
    return cells


def cell_text(cell: dict | None, ran_on_expected: str | None) -> str:
    if cell is None:
        return "not run"
    if "error" in cell:
        return f"error: {cell['error'][:60]}"
    text = f"{cell['deviation']:.0e}"
    if ran_on_expected and cell["ran_on"] != ran_on_expected:
        text += f" (ran on {cell['ran_on']})"
    return text if cell["passed"] else f"**{text}**" + ("" if cell["same_class"] else " (class differs)")


def markdown(results: dict, cases: list[dict], environment: dict, skipped: dict, moved: dict) -> str:
    providers = [p for p in results if p != "cpu"]
    expected = {"openvino": "OpenVINOExecutionProvider", "cuda": "CUDAExecutionProvider",
                "tensorrt": "TensorrtExecutionProvider"}
    lines = ["# The provider matrix", "",
             "`python tools/provider_matrix.py` compiles every rule and composite from the bundled digits CNN "
             "(`models/digits_cnn.onnx`, two held-out digits) and a small ResNet (3x32x32, a 3x3 stride-2 max pool, "
             "BatchNormalization, an identity and a projection block; two random images), runs each compiled model "
             "with each execution provider, and compares the relevance with onnxruntime's CPU provider: each cell is "
             "the largest deviation over the two samples, relative to each sample's peak `max |R|`; it passes at "
             f"{TOLERANCE:.0e} or less with the same explained classes (`target` -1: the predicted class); a cell "
             "above it is in bold. The column `CPU unoptimized` is the CPU provider against itself without its graph "
             "optimizations (other fusions and kernels, so other float32 roundings): where it exceeds "
             f"{TOLERANCE:.0e}, the case is ill-conditioned in float32 (a rule divides by a value that nearly "
             "cancels: LRP-0 without a stabilizer, flat, w² and z^B at residual joins and in z^B's first layer, "
             "epsilon at a pre-activation of ten epsilons), and providers that round differently cannot agree on "
             "it to the tolerance either.", "",
             "Providers: `openvino`, onnxruntime-openvino's CPU device in float32 (its own virtual environment); "
             "`wasm` and `webgpu`, the WebAssembly and WebGPU execution providers of onnxruntime-web's WebGPU build "
             "(`ort.webgpu.min.mjs`, the one `onnxlrp web` bundles); `webgpu-jsep`, the WebGPU kernels of its default "
             "build (`ort.min.mjs`); the web ones in headless Chromium, a page per case; `cuda` and `tensorrt` "
             "(TF32 and FP16 off) where a GPU is.", "",
             f"Run {environment['date']} on {environment['machine']}: " +
             "; ".join(f"{k}: {v}" for k, v in environment["versions"].items()) + ".", ""]
    for name, why in skipped.items():
        lines.append(f"- `{name}` not run: {why}.")
    if skipped:
        lines.append("")
    counts = {p: sum(1 for c in results[p].values() if c.get("passed")) for p in providers}
    lines += ["Passed: " + ", ".join(f"`{p}` {counts[p]}/{len(cases)}" for p in providers) + ".", ""]
    lines.append("| model | rule | CPU unoptimized | " + " | ".join(f"`{p}`" for p in providers) + " |")
    lines.append("|---|---|---|" + "---|" * len(providers))
    for case in cases:
        model, rule = case["id"].split("/")
        lines.append(f"| {model} | `{rule}` | {moved[case['id']]:.0e} | " + " | ".join(
            cell_text(results[p].get(case["id"]), expected.get(p)) for p in providers) + " |")
    warnings = {p: w for p, w in environment.get("warnings", {}).items() if w}
    if warnings:
        lines += ["", "onnxruntime's warnings (stderr) per provider:"]
        lines += [f"- `{p}`: " + "; ".join(f"`{w}`" for w in ws) for p, ws in warnings.items()]
    return "\n".join(lines) + "\n"


def run_providers(args, folder: Path, cases: list[dict]) -> tuple[dict, dict, dict]:
    """Every provider asked for that runs here: their statuses, the skipped ones with the reason, the versions."""
    import onnxruntime as ort

    wanted = args.providers.split(",")
    available = ort.get_available_providers()
    statuses, skipped = {"cpu": run_python("cpu", folder, sys.executable)}, {}
    versions = {"onnxruntime (CPU reference)": ort.__version__}
    gpu = shutil.which("nvidia-smi") is not None
    for provider, name in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        if provider in wanted:
            if name in available and gpu:
                statuses[provider] = run_python(provider, folder, sys.executable)
            else:
                skipped[provider] = "no GPU here" if not gpu else f"this onnxruntime has no {name}"
    if "openvino" in wanted:
        if Path(args.openvino_python).exists():
            statuses["openvino"] = run_python("openvino", folder, args.openvino_python)
            probe = subprocess.run([args.openvino_python, "-c", "import onnxruntime, importlib.metadata as m; "
                                    "print(m.version('onnxruntime-openvino'), m.version('openvino') "
                                    "if any(d.metadata['Name'] == 'openvino' for d in m.distributions()) else '')"],
                                   capture_output=True, text=True)
            versions["onnxruntime-openvino"] = probe.stdout.strip() or "?"
        else:
            skipped["openvino"] = f"no {args.openvino_python} (see this tool's docstring)"
    web = [p for p in wanted if p in WEB]
    if web:
        if (args.ort_web / "dist").is_dir() and (shutil.which("chromium") or shutil.which("chromium-browser")):
            statuses.update(run_web(web, folder, cases, args.ort_web))
            first = statuses[web[0]]
            versions["onnxruntime-web"] = first["onnxruntime-web"]
            versions["Chromium"] = first["chromium"]
            versions["WebGPU adapter"] = first["webgpu_adapter"] or "none"
        else:
            skipped.update({p: "no onnxruntime-web or chromium (bash tests/js/install.sh)" for p in web})
    return statuses, skipped, versions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", default="cpu,openvino,wasm,webgpu,webgpu-jsep,cuda,tensorrt")
    parser.add_argument("--models", default="digits,resnet")
    parser.add_argument("--rules", default=",".join(COMPOSITES), help="default: every rule and composite")
    parser.add_argument("--openvino-python", default=str(ROOT / ".venv-openvino" / "bin" / "python"))
    parser.add_argument("--ort-web", type=Path, default=ROOT / "tests" / "js" / "node_modules" / "onnxruntime-web")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "providers.md")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="keep the compiled models and results here")
    parser.add_argument("--reuse", type=Path, help="a --json file of an earlier run on the same --work folder: take "
                        "its providers' results instead of running them again (the table is written anew)")
    args = parser.parse_args()
    folder = args.work or Path(tempfile.mkdtemp(prefix="provider-matrix-"))
    folder.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(args.reuse.read_text()) if args.reuse else None
    if earlier is not None:
        cases = json.loads((folder / "manifest.json").read_text())
        statuses, skipped = earlier["statuses"], earlier["skipped"]
        versions = earlier["environment"]["versions"]
    else:
        cases = prepare(folder, args.models.split(","), args.rules.split(","))
        statuses, skipped, versions = run_providers(args, folder, cases)
    results = {p: compare(folder, p, cases, s) for p, s in statuses.items()}
    moved = unoptimized(folder, cases)
    environment = {"date": earlier["environment"]["date"] if earlier else datetime.date.today().isoformat(),
                   "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
                   "versions": versions,
                   "warnings": {p: s.get("warnings", []) for p, s in statuses.items()}}
    args.out.write_text(markdown(results, cases, environment, skipped, moved))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "environment": environment, "skipped": skipped,
                                         "statuses": statuses, "cpu_unoptimized": moved}, indent=1))
    failed = sum(1 for p in results if p != "cpu" for c in results[p].values() if not c.get("passed"))
    print(f"wrote {args.out}; {failed} cell(s) failed or errored")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
