#!/usr/bin/env python
"""Speed benchmark: the compiled explainer against the source model's forward pass, and against Zennit.

    python tools/bench.py --model resnet50 --rule epsilon --batch 1 --threads 2 --repeats 10 --json out.json

What it measures, in this order:

1. Compile time of ``onnxlrp.compile(model, rule)`` (the in-memory ModelProto; median of ``--compile-repeats``),
   and the multiply-adds of the linear ops (Conv, ConvTranspose, MatMul, Gemm) of both models: their ratio is
   the arithmetic floor of explain/forward, which element-wise rewrites cannot go below.
2. The source session and the compiled session, created from files with identical ``SessionOptions`` and
   provider, are warmed up and then run **interleaved** in one process (source, compiled, source, compiled, ...)
   on one shared thread pool (see ``share_thread_pool``);
   medians of each and the ratio explain/forward (median compiled / median source). The compiled session gets
   the same input and no ``target`` (it explains the arg-max). Its logits are checked against the source's.
3. Peak memory of each session, each in its own child process: the growth of the peak RSS (``VmHWM``, what
   ``ru_maxrss`` reports for a process that was not forked from a big one) from just before the session is
   created (numpy, onnxruntime imported, input allocated) to after its runs; and the ratio.
4. When torch and zennit import and ``--model`` is a built-in architecture, in a child process where the compiled
   session takes turns with each (same machine load), on the same weights and input (float32, BatchNorm merged
   beforehand, ``torch.set_num_threads(T)``, medians of the same number of repeats):
   - torch's plain gradient ``x * dy_c/dx`` (autograd with frozen weights: the price of one backward pass in
     PyTorch, the cheapest attribution it has, for any rule), and the ratio gradient / ours;
   - Zennit's attribution with the matching composite (registered once), and the ratio Zennit / ours. The
     relative L2 distance between Zennit's relevance and ours checks that both computed the same thing.
5. With ``--profile``: onnxruntime's per-node profile of the compiled session, grouped by op type, by the
   ``lrp/<scope>/<hint>`` name of the emitted node (the forward part has no ``lrp/`` prefix) and by rule part.

With ``--provider cuda`` (written for a GPU session, not yet run on one): Zennit runs on the GPU as well (torch
CUDA, each timed call synchronized), the memory children report the growth of the GPU's used memory after a CUDA
context exists, and ``--profile`` lists the nodes that onnxruntime placed on another provider than CUDA (CPU
fallbacks add copies). ``--io-binding`` keeps inputs and outputs on the device (for either provider), so that only
the graph is timed.

Everything goes to ``--json`` with machine information (CPU model, cores, versions, date).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import archs  # noqa: E402

from onnxlrp.contract import CLASS_OUTPUT, RELEVANCE_OUTPUT  # noqa: E402
from onnxlrp.runtime import with_target  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("ONNXLRP_BENCH_CACHE", Path(tempfile.gettempdir()) / "onnxlrp-bench"))
SETTLE_S = 0.1  # Zennit and ours take turns on different thread pools: let the last one's spinning threads sleep
EXTERNAL_DATA_BYTES = 1 << 30  # save models above 1 GiB with external data (protobuf's 2 GiB limit)


# ---------------------------------------------------------------- arithmetic

def inferred(model: onnx.ModelProto, batch: int) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """``model`` after ONNX shape inference with the batch fixed, and every tensor's shape."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    defaults = {t.name for t in fixed.graph.initializer}  # overridable initializers keep their shapes
    for vi in fixed.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in defaults:
            continue
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    done = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(done.graph.value_info) + list(done.graph.input) + list(done.graph.output)}
    return done, shapes | {t.name: list(t.dims) for t in done.graph.initializer}


def multiply_adds(model: onnx.ModelProto, batch: int) -> int:
    """Multiply-accumulates of the Conv, ConvTranspose, MatMul and Gemm nodes at this batch size: the arithmetic
    that no element-wise rewrite can remove. Shapes come from ONNX shape inference with the batch fixed."""
    model, shapes = inferred(model, batch)
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            w = shapes[node.input[1]]
            # Conv: each output element reads Cin/g * k inputs; ConvTranspose: each input element feeds Cout/g * k
            total += int(np.prod(shapes[node.output[0] if node.op_type == "Conv" else node.input[0]])) * \
                int(np.prod(w[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            a = shapes[node.input[0]]
            inner = a[0] if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute) \
                else a[-1]
            total += int(np.prod(shapes[node.output[0]])) * inner
    return total


def relu_outputs_mib(model: onnx.ModelProto, batch: int) -> float:
    """MiB of the source model's Relu outputs at this batch size (float32): what any backward pass through its
    ReLUs reads, and so keeps alive from the forward pass, unless it recomputes them."""
    model, shapes = inferred(model, batch)
    return sum(4 * int(np.prod(shapes[n.output[0]])) for n in model.graph.node if n.op_type == "Relu") / 2 ** 20


# ---------------------------------------------------------------- machine

def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    info["onnx"] = onnx.__version__
    info["numpy"] = np.__version__
    for name in ("torch", "zennit", "onnxlrp"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    try:
        import onnxlrp.passes

        import onnxlrp

        digest = hashlib.sha256()
        for folder in (Path(onnxlrp.__file__).parent, Path(onnxlrp.passes.__file__).parent):
            for f in sorted(folder.glob("*.py")):
                digest.update(f.read_bytes())
        info["onnxlrp_path"] = str(Path(onnxlrp.__file__).parent)
        info["compiler_sources_sha256"] = digest.hexdigest()[:16]
    except Exception:
        pass
    try:
        info["bench_repo_git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                                       capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnxlrp", "passes"], cwd=HERE.parent,
                               capture_output=True, text=True, check=True).stdout.strip()
        info["git_compiler_tree_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


# ---------------------------------------------------------------- models and sessions

def source_model(spec: str, seed: int, cache: Path) -> tuple[onnx.ModelProto, Path]:
    """A built-in architecture (built once, cached as a file) or an ONNX file."""
    if spec in archs.ARCHS:
        path = cache / f"{spec}-seed{seed}.onnx"
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            save(archs.onnx_model(spec, seed), path)
        return onnx.load(str(path)), path
    path = Path(spec)
    return onnx.load(str(path)), path


def save(model: onnx.ModelProto, path: Path) -> None:
    tmp = path.with_suffix(".tmp.onnx")
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
    else:
        onnx.save(model, str(tmp))
    os.replace(tmp, path)


def share_thread_pool(threads: int, spin: bool) -> None:
    """With spinning on, every session of this process runs on one global pool of ``threads`` intra-op threads.

    A session's own pool keeps its threads spinning for a while after each run (onnxruntime's default). When two
    sessions run in turn, those spinning threads take the cores from the other session: on the 2-core machine of
    docs/speed.md the source ResNet50 took 106 ms interleaved with its explainer against 66 ms alone, which made
    explain/forward look 25 % smaller than it is. One shared pool times each session as if it ran alone, with the
    spinning users get. Without spinning, per-session pools do not interfere and are kept. Call this before the
    first session is created."""
    if spin:
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads, 1)


def session_options(threads: int, spin: bool, profile_prefix: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if spin:
        so.use_per_session_threads = False  # the pool of share_thread_pool()
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def providers_for(name: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if name == "cuda" else ["CPUExecutionProvider"]


def make_session(path: Path, threads: int, provider: str, spin: bool, profile_prefix: str | None = None):
    """A session on ``provider``. For "cuda", stops when onnxruntime fell back to its CPU provider (it does so with
    only a log line when a CUDA library is missing), so that no CPU figure is ever reported as a GPU one."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), session_options(threads, spin, profile_prefix),
                                providers=providers_for(provider))
    if provider == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"{path}: onnxruntime did not start its CUDA provider (its log above says why); no GPU "
                         "figure was measured")
    return sess


def session_creation(paths: dict[str, Path], args) -> dict:
    """Create a session on each model in turn, ``--session-repeats`` times (the order reversed every other round):
    medians of the wall and the process CPU seconds. Creating a compiled session includes onnxruntime's constant
    folding of the rules' weight ops (``onnxlrp/weights.py``); CPU seconds are the steadier figure on a shared
    host."""
    wall: dict[str, list] = {k: [] for k in paths}
    cpu: dict[str, list] = {k: [] for k in paths}
    keys = list(paths)
    for i in range(args.session_repeats):
        for key in keys if i % 2 == 0 else keys[::-1]:
            t, c = time.perf_counter(), time.process_time()
            sess = make_session(paths[key], args.threads, args.provider, args.spin == "on")
            wall[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
            del sess
    return {k: {"median_s": median(wall[k]), "cpu_median_s": median(cpu[k]), "times_s": wall[k], "cpu_s": cpu[k]}
            for k in paths}


def make_input(model: onnx.ModelProto, batch: int, seed: int) -> tuple[str, np.ndarray]:
    """The first float data input, filled with uniform [0, 1) values at batch ``batch``."""
    inits = {t.name for t in model.graph.initializer}
    vi = next(v for v in model.graph.input if v.name not in inits and v.type.tensor_type.elem_type == 1)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    if any(d is None for d in dims[1:]):
        raise SystemExit(f"input {vi.name!r} has dynamic non-batch dims {dims}; not supported here")
    shape = [batch, *dims[1:]]
    return vi.name, np.random.default_rng(seed).random(shape, dtype=np.float32)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------- timing

class Runner:
    """One session's timed call. Plain ``run`` takes numpy inputs and returns numpy outputs (host-device copies
    included, as most callers use it). With ``io_binding``, the inputs are placed on the provider's device once and
    the outputs stay there (``run_with_iobinding``, which waits for the device), so that only the graph is timed;
    :meth:`outputs` copies the last run's outputs to the host afterwards."""

    def __init__(self, sess, feed: dict, provider: str, io_binding: bool):
        feed = with_target(sess, feed)  # a compiled model's target: -1, the predicted class
        self.sess, self.feed, self.binding = sess, feed, None
        if io_binding:
            import onnxruntime as ort

            device = provider  # --provider's names ("cpu", "cuda") are onnxruntime's OrtValue device names
            self.binding = sess.io_binding()
            for name, value in feed.items():
                self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
            for out in sess.get_outputs():
                self.binding.bind_output(out.name, device)
        self.last = None

    def __call__(self) -> None:
        if self.binding is None:
            self.last = self.sess.run(None, self.feed)
        else:
            self.sess.run_with_iobinding(self.binding)

    def outputs(self) -> list[np.ndarray]:
        return self.last if self.binding is None else self.binding.copy_outputs_to_cpu()


def interleaved(sessions: dict, feed: dict, warmup: int, repeats: int, provider: str = "cpu",
                io_binding: bool = False) -> dict:
    """Warm up all, then run them in turn (source, compiled, [variants], source, ...); per-run wall times in s."""
    runners = {key: Runner(sess, feed, provider, io_binding) for key, sess in sessions.items()}
    for _ in range(warmup):
        for run in runners.values():
            run()
    times = {key: [] for key in sessions}
    for _ in range(repeats):
        for key, run in runners.items():
            t = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t)
    return {"times": times, "outputs": {key: run.outputs() for key, run in runners.items()}}


# ---------------------------------------------------------------- children: memory and Zennit

def peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM``). ``ru_maxrss`` is not used: Linux carries it over ``execve``
    from the forking parent, so a child of a large process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_average() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def gpu_used_mib() -> float | None:
    """Memory in use on GPU 0 (all processes), from ``nvidia-smi``; None where it cannot be read."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=60).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def start_cuda_context(threads: int, spin: bool) -> None:
    """Create and run a one-node CUDA session, so that the CUDA context is not counted as the model's memory."""
    import onnxruntime as ort

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    tiny = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "ctx", [x],
                                                         [y]), opset_imports=[onnx.helper.make_opsetid("", 17)])
    tiny.ir_version = 9
    sess = ort.InferenceSession(tiny.SerializeToString(), session_options(threads, spin),
                                providers=providers_for("cuda"))
    sess.run(None, {"x": np.ones(1, np.float32)})


def child_memory(args) -> dict:
    """In a fresh process: peak-RSS growth around session creation + runs. With ``--provider cuda``, the peak is
    the growth of the GPU's used memory instead (onnxruntime's CUDA arena keeps what it allocated, so the value
    after the runs is the session's peak), measured after a CUDA context exists; the host RSS is kept as
    ``host_peak_delta_mib``."""
    import onnxruntime  # noqa: F401

    model_input = np.load(args.child_input)
    feed = {args.child_input_name: model_input}
    if args.provider == "cuda":
        start_cuda_context(args.threads, args.spin == "on")
    gpu_base = gpu_used_mib() if args.provider == "cuda" else None
    base = peak_rss_mib()
    t = time.perf_counter()
    sess = make_session(Path(args.child_model), args.threads, args.provider, args.spin == "on")
    created = time.perf_counter() - t
    feed = with_target(sess, feed)
    after_create = peak_rss_mib()
    for _ in range(args.child_runs):
        sess.run(None, feed)
    peak = peak_rss_mib()
    result = {"baseline_mib": base, "after_create_mib": after_create, "peak_mib": peak, "create_s": created,
              "peak_delta_mib": peak - base, "create_delta_mib": after_create - base, "runs": args.child_runs}
    if gpu_base is not None:
        gpu_peak = gpu_used_mib()
        if gpu_peak is not None:
            result.update(host_peak_delta_mib=peak - base, gpu_baseline_mib=gpu_base, gpu_peak_mib=gpu_peak,
                          peak_delta_mib=gpu_peak - gpu_base)
    return result


def child_zennit(args) -> dict:
    """In a fresh process: torch's plain forward, its plain gradient x * dy_c/dx (autograd, the cheapest backward
    attribution in PyTorch) and Zennit's attribution, each timed interleaved with ours on the same input."""
    import torch

    torch.set_num_threads(args.threads)
    archs.import_zennit()  # the torch models' residual joins are zennit.layer.Sum
    from zennit.attribution import Gradient

    device = torch.device("cuda" if args.provider == "cuda" else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # time finished work, not launches
    model = onnx.load(args.child_model)
    module = archs.zennit_ready(archs.torch_model(args.model, model)).to(device)
    del model
    for p in module.parameters():
        p.requires_grad_(False)  # input gradients only, as an explanation needs
    x = torch.from_numpy(np.load(args.child_input)).to(device)
    ours = make_session(Path(args.child_compiled), args.threads, args.provider, args.spin == "on")
    feed = with_target(ours, {args.child_input_name: x.cpu().numpy()})

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    def alternate(fn) -> tuple[list, list]:
        """Times of ``fn`` and of ours, taking turns, so that both see the same machine load."""
        for _ in range(args.warmup):
            ours.run(None, feed)
            fn()
        theirs_t, ours_t = [], []
        for _ in range(args.repeats):
            time.sleep(SETTLE_S)
            ours_t.append(timed(lambda: ours.run(None, feed)))
            time.sleep(SETTLE_S)
            theirs_t.append(timed(fn))
        return theirs_t, ours_t

    with torch.no_grad():
        target = module(x).argmax(1)
        forward = [timed(lambda: module(x)) for _ in range(args.warmup + args.repeats)][args.warmup:]

    def plain_gradient():
        xg = x.clone().requires_grad_(True)
        module(xg).gather(1, target[:, None]).sum().backward()
        return xg.grad * xg

    grad_times, grad_ours = alternate(plain_gradient)
    out = {"torch_threads": torch.get_num_threads(), "torch_device": str(device), "torch_forward_times": forward,
           "torch_forward_median_s": median(forward), "gradient_times": grad_times,
           "gradient_median_s": median(grad_times), "gradient_ours_median_s": median(grad_ours),
           "ratio_gradient_over_ours": median(grad_times) / median(grad_ours),
           "ratio_gradient_over_torch_forward": median(grad_times) / median(forward)}

    composite = archs.zennit_composite(args.rule, tuple(x.shape))
    if composite is None:
        return {**out, "skipped": f"Zennit has no counterpart of {args.rule!r}"}

    def attr_output(out):
        return torch.nn.functional.one_hot(target, out.shape[1]).to(out) * out

    base = peak_rss_mib()
    with Gradient(model=module, composite=composite) as attributor:
        relevance = attributor(x, attr_output)[1]
        times, ours_times = alternate(lambda: attributor(x, attr_output))
    out.update({"times": times, "median_s": median(times), "ours_times": ours_times,
                "ours_median_s": median(ours_times), "ratio_zennit_over_ours": median(times) / median(ours_times),
                "attribution_rss_growth_mib": peak_rss_mib() - base})
    if args.child_relevance:
        ours_r = np.load(args.child_relevance).reshape(len(x), -1).astype(np.float64)
        theirs = relevance.detach().cpu().numpy().reshape(len(x), -1).astype(np.float64)
        err = np.linalg.norm(ours_r - theirs, axis=1) / np.maximum(np.linalg.norm(theirs, axis=1), 1e-300)
        out["relevance_rel_l2_vs_ours"] = float(err.max())
    return out


def run_child(kind: str, args, model_path: Path, input_path: Path, input_name: str, relevance_path=None,
              runs: int = 2, compiled_path: Path | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-model", str(model_path),
           "--child-input", str(input_path), "--child-input-name", input_name, "--child-runs", str(runs),
           "--model", args.model, "--rule", args.rule, "--threads", str(args.threads), "--provider", args.provider,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--spin", args.spin]
    if relevance_path is not None:
        cmd += ["--child-relevance", str(relevance_path)]
    if compiled_path is not None:
        cmd += ["--child-compiled", str(compiled_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- profile

HINT_SUFFIX = re.compile(r"(_nchwc|_node|_token|_\d+)$")
PARTS = (  # (rule part, hints of the nodes emitted for it); first match wins
    ("stabilizer (GreaterOrEqual/Where/Add)", {"eps", "stab", "g", "gate"}),
    ("divide R / z", {"s", "ratio", "abs_z", "v_over_eps"}),
    ("transposed product W^T g (Conv/ConvTranspose/MatMul)", {"WTg", "zero_inserted"}),
    ("modified forward z' (Conv/MatMul, pos/neg, flat ones)", {"z", "z_pos", "z_pm", "ones", "low", "high"}),
    ("x+/x- split", {"x_pos", "x_neg"}),
    ("products and sums (Mul/Sum)", {"prod", "sum", "R", "coef", "cofactors", "Cast"}),
    ("max-pool backward (windows, mask, scatter)", {"patches", "y", "mask", "winner", "Equal", "And"}),
    ("R-LRP keep_in_range (Flatten/Abs/ReduceMax/Max/Div/Reshape)", {"flat", "abs", "ReduceMax", "peak", "scaled"}),
    ("R-LRP fork rescale (Eq. 13)", {"ReduceSum", "sign", "denom", "eq13_factor", "block", "Add", "Mul", "S"}),
)


def node_group(name: str, op: str) -> str:
    """``forward``, ``reorder`` (layout ops onnxruntime inserts) or the hint of an emitted node: node names are
    ``lrp/<scope>/<hint>_node[_N]``; nodes onnxruntime rewrites are named after their output
    ``lrp/<scope>/<hint>[_N]_nchwc``."""
    if op.startswith("Reorder"):
        return "reorder"
    if not name.startswith("lrp/"):
        return "forward"
    hint, previous = name.rsplit("/", 1)[-1], None
    while hint != previous:
        previous, hint = hint, HINT_SUFFIX.sub("", hint)
    return hint


def scope_of(name: str, op: str, scope_op: dict) -> str:
    """What an emitted node belongs to: the op type of the forward node it explains (``lrp/<scope>/...`` with
    ``<scope>`` that node's name), the sums at forks, set-up, or onnxruntime's layout reorders."""
    if op.startswith("Reorder"):
        return "NCHWc reorders"
    if not name.startswith("lrp/"):
        return "forward pass"
    scope = name[4:].rsplit("/", 1)[0]
    if scope.endswith("/combine"):
        return "sums at forks (combine)"
    return f"backward of {scope_op[scope]}" if scope in scope_op else scope


def rule_part(hint: str, op: str) -> str:
    if hint == "forward":
        return "forward pass"
    if hint == "reorder":
        return "NCHWc layout reorders (inserted by onnxruntime)"
    for part, hints in PARTS:
        if hint in hints:
            return part
    return f"other ({op})"


def profile(path: Path, feed: dict, args, runs: int, workdir: Path) -> dict:
    """Per-node times of ``runs`` runs (after one warm-up), totals per op type, per hint and per rule part."""
    sess = make_session(path, args.threads, args.provider, args.spin == "on", str(workdir / "ort_profile"))
    feed = with_target(sess, feed)
    sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    graph = onnx.load(str(path), load_external_data=False).graph
    scope_op = {n.name: n.op_type for n in graph.node if not n.name.startswith("lrp/")}
    del graph
    by_op, by_hint, by_part, by_side, by_scope = (defaultdict(float) for _ in range(5))
    by_node: dict[tuple[str, str], float] = defaultdict(float)
    placement: dict[str, set] = defaultdict(set)  # provider -> names of the nodes it ran
    total_runs = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            total_runs += 1
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        placement[e.get("args", {}).get("provider", "?")].add(f"{name} ({op})")
        dur = e.get("dur", 0) / 1e6
        hint = node_group(name, op)
        side = "forward" if hint == "forward" else "lrp"
        by_op[f"{side}:{op}"] += dur
        by_hint[f"{hint} ({op})" if side == "lrp" else "forward"] += dur
        by_part[rule_part(hint, op)] += dur
        by_side[side] += dur
        by_node[(name, op)] += dur
        by_scope[scope_of(name, op, scope_op)] += dur
    n = max(total_runs - 1, 1)  # the first model_run is the warm-up
    total = sum(by_side.values()) or 1.0

    def table(d: dict, top: int | None = None) -> list:
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [[k, round(v / n * 1e3, 3), round(100 * v / total, 1)] for k, v in rows]

    return {"runs": n, "note": "ms per run and % of summed kernel time; the warm-up run is included in the sums "
                                "and divided out approximately (sums over runs + 1, divided by runs)",
            "kernel_ms_per_run": round(total / n * 1e3, 3),
            "by_side": table(by_side), "by_op_type": table(by_op), "by_hint": table(by_hint, 40),
            "by_rule_part": table(by_part), "by_forward_op_explained": table(by_scope),
            "nodes_by_provider": {provider: len(nodes) for provider, nodes in placement.items()},
            "off_primary_provider": sorted(n for provider, nodes in placement.items()
                                           if provider != sess.get_providers()[0] for n in nodes)[:50],
            "top_nodes": [[f"{k[0]} ({k[1]})", v1, v2] for (k, v1, v2) in
                          ((k, round(v / n * 1e3, 3), round(100 * v / total, 1))
                           for k, v in sorted(by_node.items(), key=lambda kv: -kv[1])[:25])]}


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="resnet50 | vgg16 | mobilenetv2 | PATH.onnx")
    p.add_argument("--rule", default="epsilon", help="an onnxlrp rule or composite name")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads (ORT and torch)")
    p.add_argument("--io-binding", action="store_true",
                   help="inputs placed on the provider's device once and outputs left there (onnxruntime IO "
                        "binding): times the graph without host-device copies")
    p.add_argument("--repeats", type=int, default=10, help="timed runs of each session (and of Zennit)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of each before timing")
    p.add_argument("--compile-repeats", type=int, default=1, help="compile this many times, report the median")
    p.add_argument("--session-repeats", type=int, default=0, metavar="N",
                   help="also create the compiled session and each --variant's N times in turn (wall and CPU s)")
    p.add_argument("--memory-runs", type=int, default=2, help="runs in each memory child after session creation")
    p.add_argument("--spin", choices=("on", "off"), default="on",
                   help="onnxruntime intra-op thread spinning (its default: on)")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the built-in architectures")
    p.add_argument("--no-memory", action="store_true", help="skip the memory children")
    p.add_argument("--no-zennit", action="store_true", help="skip the torch comparisons (plain gradient, Zennit)")
    p.add_argument("--profile", type=int, default=0, metavar="RUNS",
                   help="also profile RUNS runs of the compiled (and source) session per node")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where built and compiled models are kept")
    p.add_argument("--json", type=Path, help="write all numbers here")
    p.add_argument("--save-compiled", type=Path, metavar="PATH", help="also save the compiled model there")
    p.add_argument("--compile-only", action="store_true", help="stop after compiling (with --save-compiled)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH.onnx",
                   help="a model compiled elsewhere (e.g. by a modified compiler) timed in the same interleaved "
                        "loop and, unless --no-memory, measured for memory like the others; repeatable")
    p.add_argument("--summarize", type=Path, metavar="DIR|GLOB",
                   help="print a markdown table of the JSON results in DIR (or matching GLOB)")
    p.add_argument("--child", choices=("memory", "zennit"), help=argparse.SUPPRESS)
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-input", help=argparse.SUPPRESS)
    p.add_argument("--child-input-name", help=argparse.SUPPRESS)
    p.add_argument("--child-relevance", help=argparse.SUPPRESS)
    p.add_argument("--child-compiled", help=argparse.SUPPRESS)
    p.add_argument("--child-runs", type=int, default=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def summarize(results: Path) -> str:
    """A markdown table of the JSON results: every ``*.json`` in a folder, or the files a glob pattern matches."""
    rows = ["| model | batch | rule | forward ms | explain ms | explain/forward (median) | pairs | min/min "
            "| multiply-add floor | peak MiB src / cmp | mem ratio | compile s (CPU s) | torch gradient/ours "
            "| Zennit ms | Zennit/ours | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    files = results.glob("*.json") if results.is_dir() else map(Path, glob.glob(str(results)))
    for f in sorted(files):
        d = json.loads(f.read_text())
        if "timing" not in d:
            continue
        c, t = d["config"], d["timing"]
        mem = d.get("memory", {})
        src_m, cmp_m = mem.get("source", {}).get("peak_delta_mib"), mem.get("compiled", {}).get("peak_delta_mib")
        z = d.get("zennit", {})
        model = Path(c["model"]).stem
        rows.append(
            f"| {model} | {c['batch']} | {c['rule']} | {t['source_median_s'] * 1e3:.0f} | "
            f"{t['compiled_median_s'] * 1e3:.0f} | **{t['ratio_explain_forward']:.2f}** | "
            f"{t['ratio_of_pairs_median']:.2f} | {t['compiled_min_s'] / t['source_min_s']:.2f} | "
            + (f"{d['multiply_adds']['ratio']:.2f} | " if "multiply_adds" in d else "- | ")
            + (f"{src_m:.0f} / {cmp_m:.0f} | {mem['ratio']:.2f} | " if "ratio" in mem else "- | - | ")
            + f"{d['compile_s']:.1f} ({d.get('compile_cpu_s', float('nan')):.1f}) | "
            + (f"{z['ratio_gradient_over_ours']:.2f} | " if "ratio_gradient_over_ours" in z else "- | ")
            + (f"{z['median_s'] * 1e3:.0f} | {z['ratio_zennit_over_ours']:.1f} | " if "median_s" in z else "- | - | ")
            + f"{(d.get('load_average_start') or ['?'])[0]} |")
        for key, v in d.get("variants", {}).items():
            vm = mem.get(f"variant:{key}", {})
            rows.append(f"| {model} | {c['batch']} | {c['rule']} *{key}* | | {v['median_s'] * 1e3:.0f} | "
                        f"**{v['ratio_explain_forward']:.2f}** | {v['ratio_of_pairs_median']:.2f} | "
                        f"{v['min_s'] / t['source_min_s']:.2f} | | "
                        + (f"- / {vm['peak_delta_mib']:.0f} | {vm['ratio']:.2f} | " if "ratio" in vm else "- | - | ")
                        + "| | | | |")
    return "\n".join(rows)


def say(*parts) -> None:
    print(*parts, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return {}
    share_thread_pool(args.threads, args.spin == "on")
    if args.provider == "cuda":
        import onnxruntime as ort

        ort.preload_dlls()  # the CUDA and cuDNN libraries of the nvidia-* pip packages, where they are installed
    if args.child:
        result = child_memory(args) if args.child == "memory" else child_zennit(args)
        print(json.dumps(result))
        return result

    import onnxruntime as ort

    import onnxlrp

    result: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else argv,
                    "machine": machine_info(),
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                               if not k.startswith("child")}}
    if args.provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit("CUDAExecutionProvider is not available")
    model, src_path = source_model(args.model, args.seed, args.cache)
    name = Path(args.model).stem if args.model not in archs.ARCHS else args.model
    say(f"== {name} rule={args.rule} batch={args.batch} provider={args.provider} threads={args.threads} "
        f"repeats={args.repeats}")

    result["load_average_start"] = load_average()
    times, cpu = [], []
    for _ in range(args.compile_repeats):
        t, c = time.perf_counter(), time.process_time()
        compiled = onnxlrp.compile(model, args.rule)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    result["compile_s"] = median(times)
    result["compile_cpu_s"] = median(cpu)
    result["compile_times_s"] = times
    result["source_nodes"], result["compiled_nodes"] = len(model.graph.node), len(compiled.graph.node)
    result["source_mb"], result["compiled_mb"] = model.ByteSize() / 1e6, compiled.ByteSize() / 1e6
    say(f"compile {result['compile_s']:.2f} s wall, {result['compile_cpu_s']:.2f} s CPU "
        f"({result['source_nodes']} -> {result['compiled_nodes']} nodes, "
        f"{result['source_mb']:.0f} -> {result['compiled_mb']:.0f} MB)")
    macs = {"source": multiply_adds(model, args.batch), "compiled": multiply_adds(compiled, args.batch)}
    macs["ratio"] = macs["compiled"] / macs["source"]
    result["multiply_adds"] = macs
    say(f"multiply-adds {macs['source'] / 1e9:.2f} G -> {macs['compiled'] / 1e9:.2f} G: the arithmetic floor of "
        f"explain/forward is {macs['ratio']:.2f}")
    result["relu_outputs_mib"] = relu_outputs_mib(model, args.batch)
    say(f"Relu outputs of the source (kept for any backward pass): {result['relu_outputs_mib']:.0f} MiB")
    if args.save_compiled:
        args.save_compiled.parent.mkdir(parents=True, exist_ok=True)
        save(compiled, args.save_compiled)
        say(f"saved {args.save_compiled}")
    if args.compile_only:
        return result
    variants = dict(v.split("=", 1) for v in args.variant)

    work = Path(tempfile.mkdtemp(prefix="bench-", dir=args.cache if args.cache.exists() else None))
    try:
        cmp_path = work / "compiled.onnx"
        save(compiled, cmp_path)
        del compiled
        input_name, x = make_input(model, args.batch, seed=1)
        del model
        input_path = work / "input.npy"
        np.save(input_path, x)
        feed = {input_name: x}

        t = time.perf_counter()
        source = make_session(src_path, args.threads, args.provider, args.spin == "on")
        t_src = time.perf_counter() - t
        t = time.perf_counter()
        explainer = make_session(cmp_path, args.threads, args.provider, args.spin == "on")
        t_cmp = time.perf_counter() - t
        result["session_create_s"] = {"source": t_src, "compiled": t_cmp}
        result["provider_used"] = explainer.get_providers()[0]

        sessions = {"source": source, "compiled": explainer}
        for key, path in variants.items():
            sessions[f"variant:{key}"] = make_session(Path(path), args.threads, args.provider, args.spin == "on")
        run = interleaved(sessions, feed, args.warmup, args.repeats, args.provider, args.io_binding)
        src_out, cmp_out = run["outputs"]["source"], run["outputs"]["compiled"]
        names = [o.name for o in explainer.get_outputs()]
        got = dict(zip(names, cmp_out, strict=True))
        logits_err = float(np.max(np.abs(got[names[0]] - src_out[0])))
        relevance = got[RELEVANCE_OUTPUT]
        result["check"] = {"logits_max_abs_diff": logits_err, "relevance_finite": bool(np.isfinite(relevance).all()),
                           CLASS_OUTPUT: got[CLASS_OUTPUT].tolist()[:8],
                           "relevance_sum_over_logit": (relevance.reshape(len(x), -1).sum(1) /
                                                        np.take_along_axis(got[names[0]],
                                                                           got[CLASS_OUTPUT][:, None],
                                                                           1)[:, 0]).tolist()[:8]}
        rel_path = work / "relevance.npy"
        np.save(rel_path, relevance)
        med_src, med_cmp = median(run["times"]["source"]), median(run["times"]["compiled"])
        result["timing"] = {
            "source_median_s": med_src, "compiled_median_s": med_cmp, "ratio_explain_forward": med_cmp / med_src,
            "ratio_of_pairs_median": median([c / s for s, c in zip(run["times"]["source"], run["times"]["compiled"],
                                                                   strict=True)]),
            "source_min_s": min(run["times"]["source"]), "compiled_min_s": min(run["times"]["compiled"]),
            "source_times_s": run["times"]["source"], "compiled_times_s": run["times"]["compiled"]}
        say(f"forward {med_src * 1e3:.1f} ms, explain {med_cmp * 1e3:.1f} ms (medians of {args.repeats}, "
            f"interleaved): explain/forward = {med_cmp / med_src:.2f}   [logits max |diff| {logits_err:.1e}]")
        if variants:
            result["variants"] = {}
        for key, path in variants.items():
            vt = run["times"][f"variant:{key}"]
            out_v = dict(zip(names, run["outputs"][f"variant:{key}"], strict=True))
            scale = max(float(np.abs(relevance).max()), 1e-30)
            variant_error = float(np.max(np.abs(out_v[RELEVANCE_OUTPUT] - relevance))) / scale
            result["variants"][key] = {
                "path": path, "median_s": median(vt), "min_s": min(vt), "times_s": vt,
                "ratio_explain_forward": median(vt) / med_src,
                "ratio_of_pairs_median": median([v / s for s, v in zip(run["times"]["source"], vt, strict=True)]),
                "ratio_to_compiled": median(vt) / med_cmp,
                "ratio_to_compiled_pairs_median": median([v / c for c, v in zip(run["times"]["compiled"], vt,
                                                                                strict=True)]),
                "ratio_to_compiled_min": min(vt) / min(run["times"]["compiled"]),
                "relevance_max_abs_diff_vs_compiled": variant_error}
            vr = result["variants"][key]
            say(f"variant {key}: {median(vt) * 1e3:.1f} ms, explain/forward = {median(vt) / med_src:.2f} "
                f"(compiled {med_cmp / med_src:.2f}); variant/compiled: medians {vr['ratio_to_compiled']:.3f}, "
                f"pairs {vr['ratio_to_compiled_pairs_median']:.3f}, mins {vr['ratio_to_compiled_min']:.3f}; "
                f"relevance max |diff| / max |R| vs compiled {vr['relevance_max_abs_diff_vs_compiled']:.1e}")
        del source, explainer, sessions
        if args.session_repeats:
            created = session_creation({"compiled": cmp_path, **{f"variant:{k}": Path(p) for k, p in variants.items()}},
                                       args)
            result["session_create_repeated"] = created
            say(f"session creation ({args.session_repeats} each, in turn): " + "; ".join(
                f"{k} {v['median_s']:.2f} s wall, {v['cpu_median_s']:.2f} s CPU" for k, v in created.items()))

        if args.profile:
            result["profile"] = {"compiled": profile(cmp_path, feed, args, args.profile, work),
                                 "source": profile(src_path, feed, args, args.profile, work)}
            placed = result["profile"]["compiled"]["nodes_by_provider"]
            say(f"nodes by provider (compiled): {placed}")
            if result["profile"]["compiled"]["off_primary_provider"]:
                say(f"  not on {result['provider_used']}: {result['profile']['compiled']['off_primary_provider']}")
            say("profile (compiled, by rule part):")
            for k, ms, pct in result["profile"]["compiled"]["by_rule_part"]:
                say(f"  {pct:5.1f} %  {ms:9.2f} ms  {k}")

        if not args.no_memory:
            mem_src = run_child("memory", args, src_path, input_path, input_name, runs=args.memory_runs)
            mem_cmp = run_child("memory", args, cmp_path, input_path, input_name, runs=args.memory_runs)
            result["memory"] = {"source": mem_src, "compiled": mem_cmp}
            for key, path in variants.items():
                mem_v = run_child("memory", args, Path(path), input_path, input_name, runs=args.memory_runs)
                result["memory"][f"variant:{key}"] = mem_v
                if mem_src.get("peak_delta_mib", 0) > 0 and "peak_delta_mib" in mem_v:
                    mem_v["ratio"] = mem_v["peak_delta_mib"] / mem_src["peak_delta_mib"]
                    say(f"peak memory variant {key}: {mem_v['peak_delta_mib']:.0f} MiB, ratio {mem_v['ratio']:.2f}")
            if mem_src.get("peak_delta_mib", 0) > 0 and "peak_delta_mib" in mem_cmp:
                ratio = mem_cmp["peak_delta_mib"] / mem_src["peak_delta_mib"]
                result["memory"]["ratio"] = ratio
                kind = "GPU memory growth" if "gpu_peak_mib" in mem_cmp else "peak-RSS growth"
                say(f"peak memory ({kind}) source {mem_src['peak_delta_mib']:.0f} MiB, compiled "
                    f"{mem_cmp['peak_delta_mib']:.0f} MiB: ratio {ratio:.2f}")
            else:
                say(f"memory children failed: {mem_src} {mem_cmp}")

        if not args.no_zennit and args.model in archs.ARCHS:
            z = run_child("zennit", args, src_path, input_path, input_name, relevance_path=rel_path,
                          compiled_path=cmp_path)
            result["zennit"] = z
            if "gradient_median_s" in z:
                say(f"torch forward {z['torch_forward_median_s'] * 1e3:.1f} ms; torch plain gradient "
                    f"{z['gradient_median_s'] * 1e3:.1f} ms vs ours {z['gradient_ours_median_s'] * 1e3:.1f} ms "
                    f"(interleaved): gradient/ours = {z['ratio_gradient_over_ours']:.2f}")
            if "median_s" in z:
                say(f"zennit {z['median_s'] * 1e3:.1f} ms vs ours {z['ours_median_s'] * 1e3:.1f} ms (interleaved): "
                    f"zennit/ours = {z['ratio_zennit_over_ours']:.2f}   [relevance rel. L2 vs ours "
                    f"{z.get('relevance_rel_l2_vs_ours', float('nan')):.1e}]")
            else:
                say(f"zennit: {z.get('skipped') or z}")
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()

    result["load_average_end"] = load_average()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        say(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
