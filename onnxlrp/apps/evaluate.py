"""``onnxlrp evaluate``: compile the model with each rule, stream the data set through all of them batch by batch,
and report the numbers of :mod:`.study` (summed per batch) as JSON, CSV, a table and plots.  Memory holds a few
batches whatever the size of the data set; unreadable inputs are skipped and listed in ``errors.csv``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import click
import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import read_model, sigterm_guard
from onnxlrp.messages import quote, show
from onnxlrp.naming import escape_terminal

from .batches import explain_batch
from .files import PATH_TYPES, check_out_dir, ensure_dir, models_dir, write_bytes
from .models import Forward, metadata, prepare
from .progress import Progress
from .rulespec import RuleSpec, parse_percents, parse_rules
from .shards import ERROR_COLUMNS, csv_bytes
from .sources import ArraySource, InputSpec, Source, model_input_spec, open_source
from .stream import read_ahead
from .study import LocalizationTotals, StudyTotals, load_masks, results_csv, save_plots, table

__all__ = ["PAPER_PERCENTS", "EvalBatch", "evaluate_rules", "evaluation_source", "run_evaluate"]

#: The percentages of most relevant inputs kept in the R-LRP paper's figures.
PAPER_PERCENTS = (1, 5, 10, 15, 20, 25, 40, 50, 60, 75, 80, 85, 90, 95, 99)


@dataclass
class EvalBatch:
    """Samples of one batch: their ids (for masks), the model's input and the labels."""

    ids: np.ndarray
    x: np.ndarray
    labels: np.ndarray


def evaluate_rules(model, rule_specs: Sequence[RuleSpec], batches: Iterable[EvalBatch], *, data_name: str,
                   batch_size: int, modes: Sequence[tuple[bool, bool]], percents: Sequence[float],
                   echo=click.echo, masks: np.ndarray | None = None,
                   on_relevance: Callable[[RuleSpec, np.ndarray, np.ndarray, np.ndarray], object] | None = None,
                   name: str | None = None) -> list[dict]:
    """Compile ``model`` with each rule; for every batch, compute each rule's relevance once and add it to the
    study of every (absolute, pixel) mode (and, with ``masks`` ``[N, H, W]`` indexed by sample id, to the
    localization numbers).  ``on_relevance(spec, relevance, explained_class, ids)`` sees every batch's relevance.
    ``name``: how messages name the model (default: its path, or "the model"); a relevance with NaN or infinite
    values stops the run with one line naming it, the rule and the samples. Returns one results dict per mode (see
    :func:`run_evaluate`)."""
    from onnxlrp.compiler import is_compiled
    from onnxlrp.runtime import Explainer

    source, _ = read_model(model)
    shown = name or (show(model) if isinstance(model, PATH_TYPES) else "the model")
    if is_compiled(source):
        raise OnnxlrpError(f"{shown}: is compiled already; "
                           "evaluate needs the plain model (it compiles one per rule)")
    seconds, rules = {}, []
    for spec in rule_specs:
        t0 = time.perf_counter()
        prepared = prepare(source, shown_as=model, rule=spec.rule, **spec.params)
        rules.append((spec, prepared, Explainer(prepared.model, finite_only=False)))
        seconds[spec.label] = time.perf_counter() - t0
    forward = Forward(rules[0][1], batch_size)
    totals = {(spec.label, m): StudyTotals(percents, absolute=a, pixel=p)
              for spec, _, _ in rules for m, (a, p) in enumerate(modes)}
    localized = {spec.label: LocalizationTotals() for spec, _, _ in rules} if masks is not None else {}
    n = n_correct = 0
    for batch in batches:
        predicted = forward.logits(batch.x).argmax(axis=1)
        for spec, prepared, explainer in rules:
            t0 = time.perf_counter()
            out = explain_batch(explainer, prepared, batch.x, name=f"{shown} ({escape_terminal(spec.label)})",
                                samples=[f"sample {i}" for i in batch.ids])
            seconds[spec.label] += time.perf_counter() - t0
            if on_relevance is not None:
                on_relevance(spec, out.relevance, out.classes, batch.ids)
            for m in range(len(modes)):
                totals[spec.label, m].add(forward, batch.x, batch.labels, predicted, out.relevance, out.classes,
                                          batch_size)
            if masks is not None:
                localized[spec.label].add(out.relevance, masks[batch.ids])
        n += len(batch.x)
        n_correct += int((predicted == batch.labels).sum())
    if n == 0:
        raise OnnxlrpError(f"{escape_terminal(data_name)}: no sample could be read (see errors.csv)")
    if n_correct == 0:
        raise OnnxlrpError(f"{escape_terminal(data_name)}: the model classifies no sample correctly (wrong labels or "
                           "preprocessing?)")
    provider = rules[0][2].provider
    echo(f"{n} samples from {escape_terminal(data_name)}; model accuracy {n_correct / n:.4f} ({n_correct} correct); "
         f"{provider}")
    outs = []
    for m, (absolute, pixel) in enumerate(modes):
        out = {"model": str(model) if isinstance(model, PATH_TYPES) else "model", "data": data_name, "samples": n,
               "correctly_classified": n_correct, "model_accuracy": n_correct / n,
               "ranking": "absolute" if absolute else "signed", "unit": "pixel" if pixel else "input",
               "percents": list(percents), "score": f"{forward.explained} at the explained class",
               "provider": provider, "rules": {}}
        for spec, prepared, _ in rules:
            r = totals[spec.label, m].result()
            r.update({"rule": spec.rule, "params": dict(spec.params), "note": spec.note,
                      "plan": metadata(prepared.model).get("onnxlrp.plan", ""),
                      "relevance_seconds": seconds[spec.label]})
            if spec.label in localized:
                r["localization"] = localized[spec.label].result()
            out["rules"][spec.label] = r
        outs.append(out)
    for spec, _, _ in rules:
        echo(f"  {escape_terminal(spec.label)}: relevance in {seconds[spec.label]:.1f} s"
             + (f" ({escape_terminal(spec.note)})" if spec.note else ""))
    return outs


def evaluation_source(data: str, spec: InputSpec, *, column: str | None = None,
                      label_column: str | None = None) -> Source:
    """``builtin:digits``, a folder with one sub-folder per class index, a ``.npz`` with images and labels, or
    Parquet with a label column."""
    if data == "builtin:digits":
        source = ArraySource(models_dir() / "digits_test.npz", spec, labels=True)
        source.where = "builtin:digits"
        return source
    if isinstance(data, str) and data.startswith("builtin:"):
        raise OnnxlrpError(f"--data {escape_terminal(data)!r}: unknown built-in data set (available: builtin:digits)")
    return open_source(data, spec, labels=True, column=column, label_column=label_column)


def run_evaluate(model, *, data="builtin:digits", rules="rlrp,lrp0,epsilon", percent=PAPER_PERCENTS,
                 absolute=False, pixel=False, limit=None, preprocess="none", out_dir="onnxlrp-evaluate",
                 batch_size=128, masks=None, column=None, label_column=None, quiet=False) -> dict:
    """The R-LRP paper's masked-input study plus MoRF region perturbation, per rule, streamed over ``data``.

    Accuracy is measured as in the paper on the correctly classified samples (``accuracy_correct``) and, for
    reference, on all samples against their labels (``accuracy_all``).  Writes ``results.json``, ``results.csv``,
    ``masked_accuracy.png``, ``aopc.png`` and ``errors.csv`` (inputs that could not be read) into ``out_dir``;
    returns the results dict.
    """
    from onnxlrp.compiler import is_compiled

    if batch_size < 1:
        raise OnnxlrpError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise OnnxlrpError(f"--limit must be at least 1, got {limit}")
    check_out_dir(out_dir)
    specs = parse_rules(rules)
    percents = parse_percents(percent)
    source_model, _ = read_model(model)
    if is_compiled(source_model):
        raise OnnxlrpError(f"{show(model)}: is compiled already; evaluate needs the plain model (it compiles one "
                           "per rule)")
    input_name, spec = model_input_spec(source_model, model, None, preprocess)
    if spec.layout is not None and spec.layout.name == "NHWC":
        raise OnnxlrpError(f"{show(model)}: input {quote(input_name)} is NHWC; evaluate's masks and regions take "
                           "NCHW image models")
    source = evaluation_source(data, spec, column=column, label_column=label_column)
    count = min(limit or source.count, source.count)
    object_masks = load_masks(masks, count, spec.dims[-2:]) if masks else None
    echo = (lambda *a, **k: None) if quiet else click.echo
    progress = Progress(count, label="evaluate", quiet=quiet)
    errors: list[tuple[int, str]] = []

    def batches() -> Iterator[EvalBatch]:
        units = [(0, a, min(a + batch_size, count)) for a in range(0, count, batch_size)]
        for unit, loaded in read_ahead(source, units):
            errors.extend(loaded.errors)
            if len(loaded.ids):
                yield EvalBatch(loaded.ids, spec.to_model(loaded.raw), loaded.labels)
            progress.update(unit[2] - unit[1])

    with sigterm_guard("onnxlrp evaluate"):
        results = evaluate_rules(source_model, specs, batches(), data_name=source.where, batch_size=batch_size,
                                 modes=[(absolute, pixel)], percents=percents, echo=echo, masks=object_masks,
                                 name=show(model) if isinstance(model, PATH_TYPES) else None)[0]
        progress.close()
        results["model"] = str(model)
        results["unreadable"] = len(errors) + len(source.listing_errors)
        for label, r in results["rules"].items():
            if "localization" in r:
                numbers = r["localization"]
                echo(f"{escape_terminal(label)}: pointing game {numbers['pointing_game']:.3f}, "
                     f"mu {numbers['mu']:.3f}, mu_w {numbers['mu_w']:.3f}")
        out = ensure_dir(out_dir)
        for line in table(results):
            echo(line)
        echo(f"(accuracy on the {results['correctly_classified']} correctly classified samples, "
             f"{results['ranking']} relevance per {results['unit']}; AOPC: MoRF region perturbation of the "
             "explained value, the input of the Softmax if there is one)")
        write_bytes(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
        write_bytes(out / "results.csv", results_csv(results).encode())
        rows = [(i, source.name(i), why) for i, why in errors]
        rows += [("", what, why) for what, why in source.listing_errors]
        write_bytes(out / "errors.csv", csv_bytes(rows, ERROR_COLUMNS))
        save_plots(results, out)
    echo(f"wrote {show(out / 'results.json')}, results.csv, masked_accuracy.png, aopc.png"
         + (f"; {results['unreadable']} unreadable input(s) skipped, listed in errors.csv" if results["unreadable"]
            else ""))
    return results
