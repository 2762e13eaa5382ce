"""Benchmark of semiring LRP (boolean, counting, viterbi, real, tropical Viterbi) against the forward pass.

For each model (the bundled digits CNN, VGG16 with random weights at 224x224 from ``tools/archs.py``) and each rule:
the compile time, then, in a fresh child process per model file (so that peaks do not mix), the session creation
time, the median run time over ``--repeats`` runs after one warm-up, and the peak resident memory of the process
(``VmHWM``) after the session was created and after the runs. The source model's forward pass is measured the same
way. Batch 1, ``--threads`` intra-op threads (2: the target machine).

    python tools/bench_semiring.py --models digits,vgg16 --rules boolean,counting,viterbi,real --repeats 3 \\
        --json tools/bench_results/semiring.json

A benchmark, not a test: the machine is shared and its speed varies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

TROPICAL = ('[semiring]\nname = "tropical"\nplus = "max"\ntimes = "add"\nzero = -1e30\none = 0.0\n'
            'annotation = "log-abs-normalized"\n')


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM")


def source(name: str) -> tuple[onnx.ModelProto, np.ndarray]:
    if name == "digits":
        images = np.load(ROOT / "models" / "digits_test.npz")["images"][:1].astype(np.float32) / 255
        return onnx.load(ROOT / "models" / "digits_cnn.onnx"), images[:, None]
    import archs

    return archs.onnx_model(name, 0), archs.sample_input(1)


def child(args) -> None:
    """Session + runs of one model file in this fresh process; prints one JSON line."""
    import onnxruntime as ort

    x = np.load(args.child_input)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    base = peak_rss_mib()
    start = time.perf_counter()
    sess = ort.InferenceSession(args.child, options, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - start
    after_create = peak_rss_mib()
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = sess.run(None, feed)
        times.append(time.perf_counter() - start)
    finite = all(np.all(np.isfinite(o)) for o in outputs if o.dtype.kind == "f")
    print(json.dumps({"session_s": created, "run_s": statistics.median(times), "runs_s": times,
                      "peak_after_session_mib": after_create - base, "peak_mib": peak_rss_mib() - base,
                      "outputs_finite": bool(finite)}))


def measure(path: Path, x_path: Path, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--child-input", str(x_path),
                          "--threads", str(args.threads), "--repeats", str(args.repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,vgg16")
    parser.add_argument("--rules", default="boolean,counting,viterbi,real,tropical")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-input", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    import onnxlrp

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-semiring-") as folder:
        folder = Path(folder)
        tropical = folder / "tropical.toml"
        tropical.write_text(TROPICAL)
        for name in args.models.split(","):
            model, x = source(name)
            x_path, src_path = folder / f"{name}.npy", folder / f"{name}.onnx"
            np.save(x_path, x)
            onnx.save(model, src_path)
            row = {"forward": measure(src_path, x_path, args)}
            print(name, "forward", row["forward"], flush=True)
            for rule in args.rules.split(","):
                start = time.perf_counter()
                options = {"composite": tropical} if rule == "tropical" else {}
                compiled = onnxlrp.compile(str(src_path), rule, input_shapes={model.graph.input[0].name: list(x.shape)},
                                           **options)
                compile_s = time.perf_counter() - start
                path = folder / f"{name}.{rule}.onnx"
                onnx.save(compiled, path)
                entry = {"compile_s": compile_s, "nodes": len(compiled.graph.node),
                         "file_mib": path.stat().st_size / 2 ** 20}
                del compiled
                entry.update(measure(path, x_path, args))
                entry["run_ratio"] = entry["run_s"] / row["forward"]["run_s"]
                entry["memory_ratio"] = entry["peak_mib"] / row["forward"]["peak_mib"]
                row[rule] = entry
                print(name, rule, entry, flush=True)
            results[name] = row
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


def table(results: dict) -> str:
    lines = ["| model | rule | compile s | session s | run s | run / forward | peak MiB | peak / forward |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        f = row["forward"]
        lines.append(f"| {name} | forward | - | {f['session_s']:.1f} | {f['run_s']:.3f} | 1 | "
                     f"{f['peak_mib']:.0f} | 1 |")
        for rule, e in row.items():
            if rule != "forward":
                lines.append(f"| {name} | {rule} | {e['compile_s']:.1f} | {e['session_s']:.1f} | {e['run_s']:.3f} | "
                             f"{e['run_ratio']:.1f} | {e['peak_mib']:.0f} | {e['memory_ratio']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
