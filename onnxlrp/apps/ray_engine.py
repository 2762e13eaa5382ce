"""``--engine ray``: the units of a data-set explain run (:mod:`.stream`) on a Ray cluster.

A Ray Data dataset holds one row per unit (a batch of sample ids); ``map_batches`` sends the units to a pool of
actors, each holding one onnxruntime session of the compiled model (one actor per GPU on GPU nodes, else
``--num-workers`` actors sharing the CPUs).  An actor reads its unit's samples from DATA with onnxlrp's own readers
(the same checks as in one process: bad inputs become error rows), explains them through the same
:func:`~onnxlrp.apps.stream.explain_loaded`, and sends the result back; the driver receives the units in order
(``preserve_order``) and writes the shards and the index itself, so OUT only has to exist where the driver runs,
while DATA must be readable at the same path on every node (a shared file system).  Ray restarts an actor that
dies and runs its unit again (Ray Data's default ``max_restarts=-1``, ``max_task_retries=-1``).

Without ``--address`` Ray's own rule applies: ``RAY_ADDRESS`` when it is set (as under ``ray job submit``), else a
local Ray instance for this run.  Ray is an optional dependency: ``pip install 'onnxlrp[ray]'``.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import first_line
from onnxlrp.naming import escape_terminal

from .stream import DECODE_THREADS, UnitResult, explain_loaded

__all__ = ["CPUS_PER_WORKER", "UnitExplainer", "ray_units"]

#: CPUs per actor when --num-workers is not given on a cluster without GPUs.
CPUS_PER_WORKER = 4


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise OnnxlrpError("--engine ray needs Ray: pip install 'onnxlrp[ray]'") from None
    return ray


class UnitExplainer:
    """A Ray Data actor: one onnxruntime session, reading and explaining the units it is given."""

    def __init__(self, job_ref: list, threads: int, gpu: bool):
        from concurrent.futures import ThreadPoolExecutor

        import ray

        from onnxlrp.runtime import Explainer

        job = ray.get(job_ref[0])
        self.source, self.spec, self.prepared = job["source"], job["spec"], job["prepared"]
        self.units, self.target, self.keep_raw = job["units"], job["target"], job["keep_raw"]
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        self.explainer = Explainer(self.prepared.model, providers=providers, threads=threads,
                                   finite_only=False)
        self.pool = ThreadPoolExecutor(DECODE_THREADS)

    def __call__(self, batch: dict) -> dict:
        out = []
        for u in batch["unit"]:
            unit = self.units[int(u)]
            loaded = self.source.read(unit[1], unit[2], self.pool)
            result = explain_loaded(self.explainer, self.prepared, self.spec, unit, loaded, self.target,
                                    self.keep_raw)
            out.append(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        return {"unit": np.asarray(batch["unit"]), "result": np.asarray(out, dtype=object)}


def _start(ray, address: str | None, echo) -> bool:
    """Join the cluster (or start a local instance); True when this call started Ray and must shut it down."""
    if ray.is_initialized():
        return False
    import onnxlrp

    env = {}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # a local instance: its workers import the onnxlrp this driver runs
        root = str(Path(onnxlrp.__file__).resolve().parents[1])
        env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 runtime_env={"env_vars": env} if env else None)
    except Exception as err:  # noqa: BLE001 - Ray raises many types for an unreachable or refused cluster
        where = f"the Ray cluster at {escape_terminal(address)}" if address else "a Ray instance"
        raise OnnxlrpError(f"--engine ray: cannot start or join {where} ({first_line(err)})") from None
    return True


def ray_units(source, spec, prepared, units: Sequence[tuple[int, int, int]], *, target: int | None, keep_raw: bool,
              address: str | None = None, num_workers: int | None = None, threads: int | None = None,
              echo=print) -> Iterator[UnitResult]:
    """Run ``units`` on Ray; yield their :class:`~onnxlrp.apps.stream.UnitResult` in order.  ``threads``: the
    onnxruntime threads of each CPU actor (default: the cluster's CPUs shared among the actors)."""
    ray = _ray()
    started = _start(ray, address, echo)
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        workers = num_workers or (gpus if gpus else max(1, cpus // CPUS_PER_WORKER))
        if gpus:
            threads, per_actor = threads or 1, {"num_gpus": 1, "num_cpus": 1}
        else:
            threads = threads or max(1, cpus // workers)
            per_actor = {"num_cpus": min(threads, cpus)}
        echo(f"explaining with {escape_terminal(prepared.rule)} on Ray: {workers} actor(s), "
             + (f"one per GPU ({gpus} GPU(s))" if gpus else f"{threads} CPU thread(s) each ({cpus} CPUs)"))
        if not units:
            return
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        job_ref = ray.put({"source": source, "spec": spec, "prepared": prepared, "units": list(units),
                           "target": target, "keep_raw": keep_raw})
        dataset = ray.data.from_items([{"unit": i} for i in range(len(units))])
        dataset = dataset.map_batches(UnitExplainer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                                      fn_constructor_kwargs={"job_ref": [job_ref], "threads": threads,
                                                             "gpu": bool(gpus)}, **per_actor)
        expected = 0
        for row in dataset.iter_rows():
            if int(row["unit"]) != expected:
                raise OnnxlrpError(f"--engine ray: unit {int(row['unit'])} came back before unit {expected}")
            expected += 1
            yield pickle.loads(row["result"])
    finally:
        if started:
            ray.shutdown()
