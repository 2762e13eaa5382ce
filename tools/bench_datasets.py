"""Throughput of explaining a folder of images: onnxlrp in one process, onnxlrp on Ray (a local instance), and Zennit
fed by a PyTorch DataLoader, with the same rule and the same number of threads.

Every engine does the whole job: read and decode the PNG files (onnxlrp: on a thread pool while onnxruntime runs;
Zennit: in one DataLoader worker process), explain them, and write the relevance to disk (onnxlrp: its shards,
fsynced, and index; Zennit: one ``.npy`` per batch, not fsynced).  Images/s are counted from the end of the first
batch to the end of the run, so start-up (compiling, session creation, Ray's actors, torch's first call) is left
out; the first batch is the warm-up.  Models: the bundled digits CNN (28 x 28 gray) and ResNet50 with random
weights (tools/archs.py, 224 x 224 RGB; its torch twin has the same weights).  Example::

    python tools/bench_datasets.py --models digits,resnet50 --batches 1,16,64 --threads 2 --json out.json

Prints one line per run and a table of the medians over ``--repeats``; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import archs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "models" / "digits_cnn.onnx"
#: Measured images per run (after the warm-up batch), per model: enough for a few seconds of work at batch 64.
MEASURED = {"digits": 512, "resnet50": 64}
ENGINES = ("onnxlrp", "ray", "zennit")


def make_images(model: str, folder: Path, count: int) -> None:
    """``count`` PNG files: the bundled test digits (repeated), or seeded random 224 x 224 RGB images."""
    folder.mkdir(parents=True, exist_ok=True)
    if model == "digits":
        digits = np.load(ROOT / "models" / "digits_test.npz")["images"]
        for i in range(count):
            Image.fromarray(digits[i % len(digits)]).save(folder / f"{i:05d}.png")
        return
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def onnx_path(model: str, work: Path) -> Path:
    if model == "digits":
        return DIGITS_MODEL
    path = work / "resnet50.onnx"
    if not path.exists():
        path.write_bytes(archs.onnx_model("resnet50", seed=0).SerializeToString())
    return path


def torch_module(model: str, path: Path):
    import onnx
    import torch
    from onnx import numpy_helper

    if model == "digits":
        net = torch.nn.Sequential()
        net.add_module("features", torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2)))
        net.add_module("classifier", torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(32 * 12 * 12, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)))
        weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(path).graph.initializer}
        net.load_state_dict(weights)
        return net.eval()
    return archs.zennit_ready(archs.torch_model("resnet50", onnx.load(path))).eval()


def run_onnxlrp(model_path: Path, images: Path, out: Path, *, batch: int, rule: str, threads: int, engine: str) -> dict:
    from onnxlrp.apps.explain_data import run_dataset_explain

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = run_dataset_explain(str(model_path), str(images), out_dir=out, batch_size=batch, rule=rule, quiet=True,
                               engine=engine, threads=threads, num_workers=1 if engine == "ray" else None)
    return {"images_per_s": done["steady_samples_per_s"], "seconds": time.perf_counter() - t0,
            "explained": done["explained"]}


class Folder:
    """A torch Dataset of the PNG files of a folder, as float tensors [C, H, W] in [0, 1] (pixels / 255)."""

    def __init__(self, folder: Path, channels: int):
        self.files = sorted(folder.glob("*.png"))
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch

        with Image.open(self.files[i]) as im:
            pixels = np.asarray(im.convert(self.mode), dtype=np.float32) / np.float32(255.0)
        return torch.from_numpy(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy())


def run_zennit(model: str, model_path: Path, images: Path, out: Path, *, batch: int, rule: str, threads: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(threads)
    archs.import_zennit()
    from zennit.attribution import Gradient

    module = torch_module(model, model_path)
    for p in module.parameters():
        p.requires_grad_(False)
    loader = DataLoader(Folder(images, 1 if model == "digits" else 3), batch_size=batch, num_workers=1)
    composite = archs.zennit_composite(rule)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    first, count = None, 0

    def one_hot_of_argmax(logits):
        return torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(logits) * logits

    with Gradient(model=module, composite=composite) as attributor:
        for k, x in enumerate(loader):
            _, relevance = attributor(x, one_hot_of_argmax)
            np.save(out / f"relevance-{k:05d}.npy", relevance.numpy())
            count += len(x)
            if first is None:
                first = (time.perf_counter(), len(x))
    end = time.perf_counter()
    return {"images_per_s": (count - first[1]) / (end - first[0]), "seconds": end - t0, "explained": count}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,resnet50")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--rule", default="epsilon-plus-flat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--measured", type=int, help="images measured per run (default: 512 digits, 64 ResNet50)")
    parser.add_argument("--work", type=Path, help="folder for images and outputs (default: a temporary one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="onnxlrp-bench-"))
    ray = None
    if "ray" in engines:
        import ray

        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    machine = {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
               "python": sys.version.split()[0]}
    runs = []
    for model in args.models.split(","):
        model_path = onnx_path(model, work)
        for batch in map(int, args.batches.split(",")):
            measured = args.measured or MEASURED[model]
            count = batch + max(batch, measured // batch * batch)  # one warm-up batch, then whole batches
            images = work / f"{model}-{count}"
            if not images.exists():
                make_images(model, images, count)
            for repeat in range(args.repeats):
                for engine in engines:
                    out = work / "out"
                    if engine == "zennit":
                        got = run_zennit(model, model_path, images, out, batch=batch, rule=args.rule,
                                         threads=args.threads)
                    else:
                        got = run_onnxlrp(model_path, images, out, batch=batch, rule=args.rule, threads=args.threads,
                                          engine="ray" if engine == "ray" else "local")
                    got.update({"model": model, "batch": batch, "engine": engine, "repeat": repeat,
                                "images": count, "load": os.getloadavg()[0]})
                    runs.append(got)
                    print(f"{model:9s} batch {batch:3d} {engine:8s} {got['images_per_s']:8.2f} images/s "
                          f"({count} images, {got['seconds']:.1f} s, load {got['load']:.1f})", flush=True)
    if ray is not None:
        ray.shutdown()
    machine["load_after"] = os.getloadavg()
    table = summarize(runs)
    print("\n".join(table))
    result = {"machine": machine, "rule": args.rule, "threads": args.threads, "runs": runs, "table": table,
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def summarize(runs: list[dict]) -> list[str]:
    """Median images/s per model, batch and engine (with the range over repeats), onnxlrp / Zennit and Ray's
    overhead (1 - Ray / onnxlrp)."""
    lines = ["| model | batch | onnxlrp | Ray (1 actor) | Zennit | onnxlrp / Zennit | Ray overhead |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["batch"]) for r in runs}, key=lambda k: (k[0], k[1]))

    def cell(model, batch, engine):
        values = [r["images_per_s"] for r in runs if (r["model"], r["batch"], r["engine"]) == (model, batch, engine)]
        if not values:
            return None, "-"
        med = float(np.median(values))
        spread = f" ({min(values):.3g}-{max(values):.3g})" if len(values) > 1 else ""
        return med, f"{med:.3g}{spread}"

    for model, batch in keys:
        ours, ours_text = cell(model, batch, "onnxlrp")
        ray, ray_text = cell(model, batch, "ray")
        zennit, zennit_text = cell(model, batch, "zennit")
        ratio = f"{ours / zennit:.2f}" if ours and zennit else "-"
        overhead = f"{100 * (1 - ray / ours):.0f} %" if ours and ray else "-"
        lines.append(f"| {model} | {batch} | {ours_text} | {ray_text} | {zennit_text} | {ratio} | {overhead} |")
    return lines


if __name__ == "__main__":
    main()
