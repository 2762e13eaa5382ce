#!/usr/bin/env python
"""Speed of the compiled AttnLRP / CP-LRP explainers of transformers: BERT-base and ViT-B/16 with random weights.

    python tools/bench_transformers.py --model bert-base --rule attnlrp --batch 1 --threads 2 --repeats 5 \\
        --json out.json

- ``bert-base``: ``BertForSequenceClassification`` (12 layers, hidden 768, 12 heads, 128 tokens, 2 classes) fed
  ``input_ids`` and ``attention_mask``; ``vit-b16``: torchvision's ``vit_b_16`` at 224 x 224, 1000 classes. Weights
  are seeded random (``N(0, 1/fan_in)``, biases ``N(0, 0.1)``, norms ``1 + N(0, 0.2)``), the export is TorchScript
  at opset 17 with a dynamic batch (cached in ``--cache``).
- Timing (as ``tools/bench.py``): the source session and the compiled one, same ``SessionOptions``, one shared
  thread pool, CPU provider, warmed up and then run in turn; medians and explain/forward. Then LXT 2.1's efficient
  mode (its own patch map for the model: ``attnLRP`` for BERT, ``cp_LRP`` for torchvision's ViT; gradient x input,
  ``torch.set_num_threads(--threads)``) takes turns with the compiled session in the same process; LXT / ours.
- Memory: the growth of the peak RSS around creating and running each session, each in a child process; the ratio.
- Compile time: ``onnxlrp.compile`` on the in-memory model.

Test-only dependencies: torch, torchvision, transformers, lxt. Results to ``--json`` with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import bench  # noqa: E402

from onnxlrp.runtime import with_target  # noqa: E402

TOKENS = 128


def build(name: str):
    """``(torch model, {input name: array} at batch 1, explained ids key or None)``; the parameters seeded as the
    transformer tests seed them (:func:`transformer_models.randomize`)."""
    from transformer_models import randomize
    from vision_models import import_torchvision

    tv = import_torchvision()
    if name == "vit-b16":
        return randomize(tv.models.vit_b_16()), {"x": np.random.default_rng(0).random((1, 3, 224, 224),
                                                                                        dtype=np.float32)}
    import transformers

    config = transformers.BertConfig(num_labels=2, attn_implementation="eager")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, TOKENS)).astype(np.int64)
    return randomize(transformers.BertForSequenceClassification(config)), {"input_ids": ids,
                                                                          "attention_mask": np.ones_like(ids)}


class Wrapped:
    """``model(**named inputs) -> logits`` for the exporter (positional inputs)."""

    @staticmethod
    def make(model, names):
        import torch

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                if names == ("x",):
                    return self.model(*args)
                return self.model(**dict(zip(names, args, strict=True))).logits

        return Module().eval()


def export(name: str, cache: Path) -> Path:
    import torch

    path = cache / f"{name}.onnx"
    if path.is_file():
        return path
    model, inputs = build(name)
    names = tuple(inputs)
    cache.mkdir(parents=True, exist_ok=True)
    dynamic = {n: {0: "batch"} for n in names} | {"logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped.make(model, names), tuple(torch.from_numpy(v) for v in inputs.values()),
                          str(path.with_suffix(".tmp.onnx")), dynamo=False, opset_version=17,
                          input_names=list(names), output_names=["logits"], dynamic_axes=dynamic)
    path.with_suffix(".tmp.onnx").replace(path)
    return path


def feeds_at(inputs: dict, batch: int) -> dict:
    return {k: np.ascontiguousarray(np.repeat(v, batch, axis=0)) for k, v in inputs.items()}


def lxt_explainer(name: str, threads: int):
    """LXT's efficient mode on the same weights: a callable that computes the relevance of the input for a batch
    (``x * grad`` after backpropagating the predicted logit)."""
    import importlib

    import torch
    from lxt.efficient import monkey_patch
    from vision_models import import_torchvision

    torch.set_num_threads(threads)
    import_torchvision()
    import lxt.efficient.models as patches

    if name == "vit-b16":
        monkey_patch(importlib.import_module("torchvision.models.vision_transformer"), patches.vit_torch.cp_LRP)
    else:
        monkey_patch(importlib.import_module("transformers.models.bert.modeling_bert"), patches.bert.attnLRP)
    model, _ = build(name)  # after patching, as LXT's examples do

    def explain(feeds: dict):
        if name == "vit-b16":
            x = torch.from_numpy(feeds["x"]).requires_grad_(True)
            logits = model(x)
        else:
            x = model.bert.embeddings.word_embeddings(torch.from_numpy(feeds["input_ids"])).detach()
            x.requires_grad_(True)
            logits = model(inputs_embeds=x, attention_mask=torch.from_numpy(feeds["attention_mask"])).logits
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
        return (x * x.grad).detach()

    return explain


def child_memory(model: Path, feeds: Path, threads: int, runs: int) -> None:
    bench.share_thread_pool(threads, True)
    data = dict(np.load(feeds))
    base = bench.peak_rss_mib()
    session = bench.make_session(model, threads, "cpu", True)
    data = with_target(session, data)  # a compiled model's target: -1, the predicted class
    for _ in range(runs):
        session.run(None, data)
    print(json.dumps({"peak_delta_mib": bench.peak_rss_mib() - base}))


def memory(path: Path, feeds: dict, threads: int, workdir: Path) -> float:
    inputs = workdir / "feeds.npz"
    np.savez(inputs, **feeds)
    done = subprocess.run([sys.executable, __file__, "--child-memory", str(path), "--child-feeds", str(inputs),
                           "--threads", str(threads)], capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_delta_mib"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["bert-base", "vit-b16"], default="bert-base")
    parser.add_argument("--rule", default=None, help="default: LXT's choice (bert-base attnlrp, vit-b16 cp-lrp)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-lxt", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxlrp-bench-transformers")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child-memory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-feeds", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        child_memory(args.child_memory, args.child_feeds, args.threads, runs=2)
        return {}
    bench.share_thread_pool(args.threads, True)  # before anything creates onnxruntime's environment
    import onnxlrp

    rule = args.rule or ("cp-lrp" if args.model == "vit-b16" else "attnlrp")
    source_path = export(args.model, args.cache)
    source = onnx.load(str(source_path))
    t = time.perf_counter()
    compiled = onnxlrp.compile(source, rule)
    compile_s = time.perf_counter() - t
    compiled_path = args.cache / f"{args.model}.{rule}.onnx"
    bench.save(compiled, compiled_path)
    _, inputs = build(args.model)
    feeds = feeds_at(inputs, args.batch)
    sessions = {"source": bench.make_session(source_path, args.threads, "cpu", True),
                "compiled": bench.make_session(compiled_path, args.threads, "cpu", True)}
    timed = bench.interleaved(sessions, feeds, args.warmup, args.repeats)
    medians = {k: bench.median(v) for k, v in timed["times"].items()}
    result = {"model": args.model, "rule": rule, "batch": args.batch, "threads": args.threads,
              "repeats": args.repeats, "compile_s": compile_s, "forward_ms": 1e3 * medians["source"],
              "explain_ms": 1e3 * medians["compiled"], "explain_over_forward": medians["compiled"] / medians["source"],
              "times_s": timed["times"], "machine": bench.machine_info()}
    print(f"{args.model} {rule} batch {args.batch}: forward {result['forward_ms']:.1f} ms, explain "
          f"{result['explain_ms']:.1f} ms, explain/forward {result['explain_over_forward']:.2f} (compile "
          f"{compile_s:.1f} s)")
    if not args.no_lxt:
        lxt = lxt_explainer(args.model, args.threads)
        ours = sessions["compiled"]
        ours_feeds = with_target(ours, feeds)
        for _ in range(args.warmup):
            lxt(feeds)
            ours.run(None, ours_feeds)
        lxt_times, our_times = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            lxt(feeds)
            lxt_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            ours.run(None, ours_feeds)
            our_times.append(time.perf_counter() - t)
        result.update(lxt_ms=1e3 * bench.median(lxt_times), ours_beside_lxt_ms=1e3 * bench.median(our_times),
                      lxt_over_ours=bench.median(lxt_times) / bench.median(our_times))
        print(f"  LXT efficient {result['lxt_ms']:.1f} ms, ours {result['ours_beside_lxt_ms']:.1f} ms: LXT/ours "
              f"{result['lxt_over_ours']:.2f}")
    if not args.no_memory:
        with tempfile.TemporaryDirectory() as workdir:
            forward_mib = memory(source_path, feeds, args.threads, Path(workdir))
            explain_mib = memory(compiled_path, feeds, args.threads, Path(workdir))
        result.update(forward_peak_mib=forward_mib, explain_peak_mib=explain_mib,
                      memory_ratio=explain_mib / forward_mib)
        print(f"  peak memory: forward {forward_mib:.0f} MiB, explain {explain_mib:.0f} MiB, ratio "
              f"{result['memory_ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
