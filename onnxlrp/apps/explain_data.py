"""``onnxlrp explain MODEL DATA -o OUT`` on a whole data set: streamed in batches, written as relevance shards plus
an index (:mod:`.shards`), resumable, with progress, in this process or on a Ray cluster (:mod:`.ray_engine`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import read_model, sigterm_guard
from onnxlrp.io.atomic import SigtermReceived
from onnxlrp.messages import explained_line, quote, show
from onnxlrp.naming import escape_terminal

from .files import check_out_dir
from .models import metadata, prepare
from .progress import Progress
from .shards import FORMAT, ShardStore
from .sources import InputSpec, model_input_spec, open_source
from .stream import default_batch_size, default_shard_size, local_units, plan_units, shard_results

__all__ = ["ENGINES", "load_relevance", "run_dataset_explain"]

ENGINES = ("local", "ray")


def _job(model, digest: str, prepared, spec: InputSpec, source, *, target, preprocess, batch_size, shard_size,
         heatmaps, overlay, params) -> dict:
    """What a resumed run must share with the run it continues (the manifest)."""
    meta = metadata(prepared.model)
    pre = spec.preprocess
    return {
        "format": FORMAT,
        "model_sha256": digest,
        "rule": prepared.rule,
        "plan_sha256": _sha(meta.get("onnxlrp.plan", "")),
        "parameters": {k: v for k, v in sorted(params.items()) if v is not None},
        "explained": prepared.explained,
        "target": "predicted" if target is None else int(target),
        "preprocess": {"name": pre.name, "bgr": pre.bgr, "scale": pre.scale.tolist(), "mean": pre.mean.tolist(),
                       "std": pre.std.tolist()},
        "input": {"name": prepared.input_name, "dims": list(spec.dims),
                  "layout": spec.layout.name if spec.layout else None},
        "data": {"kind": source.kind, "count": source.count, "fingerprint": source.fingerprint(),
                 "column": getattr(source, "column", None)},
        "batch_size": batch_size,
        "shard_size": shard_size,
        "heatmaps": bool(heatmaps),
        "overlay": bool(overlay) if heatmaps else None,
    }


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _earlier_sizes(out: Path) -> tuple[int | None, int | None]:
    """The batch and shard size of the run in ``out`` (resume keeps them unless given)."""
    try:
        job = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        return int(job["batch_size"]), int(job["shard_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def run_dataset_explain(model, data, *, out_dir, target=None, preprocess="none", overlay=True, batch_size=None,
                        shard_size=None, heatmaps=False, resume=False, quiet=False, engine="local", address=None,
                        num_workers=None, threads=None, column=None, rule="rlrp", composite=None, flat_layers=1,
                        opset=None, output=None, node_output=None, input_shapes=None, **params) -> dict:
    """Explain every sample of DATA (see :func:`onnxlrp.apps.sources.open_source`) into ``out_dir``.

    ``target`` is a class index or None (the predicted class); ``threads`` the onnxruntime threads (per actor with
    Ray; default: onnxruntime's, one per core).  Returns ``{"explained": n, "errors": m, "out": path, "seconds":
    wall time of the run once compiled, "steady_samples_per_s": the samples after the first batch per second, from
    the moment the first batch was explained (start-up, compiling and Ray's actors left out; with Ray, that moment
    is read on the actor's clock, so this figure is meant for one machine)}``."""
    from onnxlrp.runtime import Explainer

    from .explain import heatmap_scale

    if engine not in ENGINES:
        raise OnnxlrpError(f"--engine {escape_terminal(str(engine))!r}: choose {' or '.join(ENGINES)}")
    for option, value in (("--batch-size", batch_size), ("--shard-size", shard_size), ("--num-workers", num_workers),
                          ("--threads", threads)):
        if value is not None and value < 1:
            raise OnnxlrpError(f"{option} must be at least 1, got {value}")
    if engine == "local" and (address is not None or num_workers is not None):
        raise OnnxlrpError("--address and --num-workers need --engine ray")
    check_out_dir(out_dir)
    out = Path(out_dir)
    echo = (lambda *a, **k: None) if quiet else click.echo
    source_model, digest = read_model(model)
    input_name, spec = model_input_spec(source_model, model, input_shapes, preprocess)
    source = open_source(data, spec, column=column)
    if resume:
        earlier_batch, earlier_shard = _earlier_sizes(out)
        batch_size = batch_size or earlier_batch
        shard_size = shard_size or earlier_shard
    batch_size = batch_size or default_batch_size(spec.dims)
    shard_size = shard_size or default_shard_size(spec.dims, batch_size)
    prepared = prepare(source_model, shown_as=model, rule=rule, composite=composite, flat_layers=flat_layers,
                       opset=opset, output=output, node_output=node_output, input_shapes=input_shapes, **params)
    if heatmaps and spec.layout is None:
        raise OnnxlrpError("--heatmaps needs a model that takes images (1 or 3 channels)")
    job = _job(model, digest, prepared, spec, source, target=target, preprocess=preprocess, batch_size=batch_size,
               shard_size=shard_size, heatmaps=heatmaps, overlay=overlay,
               params=dict(params, composite=composite and _sha(Path(composite).read_text(errors="replace")),
                           flat_layers=flat_layers, opset=opset, output=output, node_output=node_output))
    store = ShardStore(out, job, count=source.count, shard_size=shard_size, resume=resume, heatmaps=heatmaps)
    todo = store.todo()
    units = plan_units(todo, store.bounds, batch_size)
    if prepared.was_compiled:
        echo(f"{show(model)}: compiled already ({escape_terminal(prepared.rule)}), used as it is")
    echo(explained_line(prepared.explained, prepared.explained_why))
    if spec.layout is not None:
        echo(f"input {quote(input_name)}: {spec.layout.name} ({spec.layout.why}); the relevance shards hold "
             f"[n, {', '.join(map(str, spec.dims))}]")
    echo(f"{source.count} sample(s) from {source.where} ({source.kind}); batch {batch_size}, {store.shards} shard(s) "
         f"of up to {shard_size}" + (f"; {store.shards - len(todo)} done already" if resume else ""))
    progress = Progress(source.count, done=store.done_samples(), label="explain", quiet=quiet)
    keep_raw = heatmaps and overlay
    scale = heatmap_scale(spec.layout.height, spec.layout.width) if spec.layout is not None else 1
    with sigterm_guard("onnxlrp explain"):
        try:
            if engine == "ray":
                from .ray_engine import ray_units

                results = ray_units(source, spec, prepared, units, target=target, keep_raw=keep_raw,
                                    address=address, num_workers=num_workers, threads=threads, echo=echo)
            else:
                explainer = Explainer(prepared.model, threads=threads, finite_only=False)
                echo(f"explaining with {escape_terminal(prepared.rule)} on {explainer.provider}")
                results = local_units(source, spec, prepared, explainer, units, target=target, keep_raw=keep_raw)
            started, first = time.time(), None
            for shard, unit in shard_results(results, store.bounds):
                if shard is not None:
                    store.write(shard, source.name, layout=spec.layout, overlay=overlay, scale=scale)
                progress.update(unit.stop - unit.start)
                first = first or (unit.finished, unit.stop - unit.start)
            explained, errors = store.finish(source.listing_errors)
            ended = time.time()
        except (KeyboardInterrupt, SigtermReceived):
            progress.close()
            click.echo(f"interrupted: {len(store.done)} of {store.shards} shards are complete in {show(out)}; "
                       "run the same command with --resume to finish" if store.created else
                       "interrupted before the first shard was complete; nothing was written", err=True)
            raise
    progress.close()
    echo(f"wrote {show(out / 'index.csv')}: {explained} sample(s) explained, {errors} unreadable "
         f"(listed in {show(out / 'errors.csv')}); relevance in {show(out / 'shards')}/relevance-*.npy")
    after_first = sum(b - a for _, a, b in units) - (first[1] if first else 0)
    steady = after_first / (ended - first[0]) if first and ended > first[0] and after_first else float("nan")
    return {"explained": explained, "errors": errors, "out": str(out), "seconds": ended - started,
            "steady_samples_per_s": steady}


def load_relevance(out_dir: str | os.PathLike, sample: int | None = None) -> np.ndarray:
    """The relevance of one sample (by its sample number) or, without ``sample``, of all explained samples in
    sample order, from the shards of a finished run (memory-mapped: only what is asked for is read)."""
    from .shards import read_index

    out = Path(out_dir)
    index = read_index(out)
    if sample is not None:
        where = np.flatnonzero(index["sample"] == sample)
        if not len(where):
            raise OnnxlrpError(f"{show(out)}: sample {sample} was not explained (see errors.csv)")
        k, offset = int(index["shard"][where[0]]), int(index["offset"][where[0]])
        return np.array(np.load(out / "shards" / f"relevance-{k:05d}.npy", mmap_mode="r")[offset])
    shards = sorted(set(index["shard"].tolist()))
    return np.concatenate([np.load(out / "shards" / f"relevance-{k:05d}.npy") for k in shards]) if shards else \
        np.zeros((0,))
