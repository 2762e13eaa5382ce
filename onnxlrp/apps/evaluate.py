"""``onnxlrp evaluate``: compile the model with each rule, compute the relevance once, and report the numbers of
:mod:`.study` as JSON, CSV, a table and plots."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import click
import numpy as np

from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import read_model, sigterm_guard
from onnxlrp.messages import show
from onnxlrp.naming import escape_terminal

from .datasets import Dataset, load_dataset
from .files import PATH_TYPES, check_out_dir, ensure_dir, write_bytes
from .models import Forward, input_shape, metadata, prepare
from .rulespec import RuleSpec, parse_percents, parse_rules
from .study import load_masks, localization, relevance_for, results_csv, save_plots, study, table

__all__ = ["PAPER_PERCENTS", "evaluate_rules", "run_evaluate"]

#: The percentages of most relevant inputs kept in the R-LRP paper's figures.
PAPER_PERCENTS = (1, 5, 10, 15, 20, 25, 40, 50, 60, 75, 80, 85, 90, 95, 99)


def evaluate_rules(model, rule_specs: Sequence[RuleSpec], dataset: Dataset, *, batch_size: int,
                   modes: Sequence[tuple[bool, bool]], percents: Sequence[float], echo=click.echo,
                   on_relevance: Callable[[RuleSpec, np.ndarray, np.ndarray], object] | None = None) -> list[dict]:
    """Compile ``model`` with each rule, compute the relevance once, evaluate every (absolute, pixel) mode.

    ``on_relevance(spec, relevance, explained_class)`` is called once per rule (e.g. to draw heatmaps).  Returns
    one results dict per mode (see :func:`run_evaluate`)."""
    from onnxlrp.compiler import is_compiled

    source, _ = read_model(model)
    if is_compiled(source):
        raise OnnxlrpError(f"{show(model) if isinstance(model, PATH_TYPES) else 'the model'}: is compiled already; "
                           "evaluate needs the plain model (it compiles one per rule)")
    forward = None
    x, labels = dataset.x, dataset.labels
    outs = [None] * len(modes)
    for spec in rule_specs:
        t0 = time.perf_counter()
        prepared = prepare(source, shown_as=model, rule=spec.rule, **spec.params)
        if tuple(x.shape[1:]) != tuple(prepared.chw):
            raise OnnxlrpError(f"{escape_terminal(dataset.source)}: samples have shape {list(x.shape[1:])}, the "
                               f"model takes {list(prepared.chw)}")
        relevance, explained_class, provider = relevance_for(prepared, x, batch_size)
        seconds = time.perf_counter() - t0
        if forward is None:
            forward = Forward(prepared, batch_size)
            predicted = forward.logits(x).argmax(axis=1)
            n_correct = int((predicted == labels).sum())
            if n_correct == 0:
                raise OnnxlrpError(f"{escape_terminal(dataset.source)}: the model classifies no sample correctly "
                                   "(wrong labels or preprocessing?)")
            echo(f"{len(x)} samples from {escape_terminal(dataset.source)}; model accuracy "
                 f"{n_correct / len(x):.4f} ({n_correct} correct); {provider}")
            for m, (absolute, pixel) in enumerate(modes):
                outs[m] = {
                    "model": str(model) if isinstance(model, PATH_TYPES) else "model",
                    "data": dataset.source,
                    "samples": int(len(x)),
                    "correctly_classified": n_correct,
                    "model_accuracy": n_correct / len(x),
                    "ranking": "absolute" if absolute else "signed",
                    "unit": "pixel" if pixel else "input",
                    "percents": list(percents),
                    "score": f"{forward.explained} at the explained class",
                    "provider": provider,
                    "rules": {},
                }
        if on_relevance is not None:
            on_relevance(spec, relevance, explained_class)
        echo(f"  {escape_terminal(spec.label)}: relevance in {seconds:.1f} s"
             + (f" ({escape_terminal(spec.note)})" if spec.note else ""))
        for m, (absolute, pixel) in enumerate(modes):
            r = study(forward, x, labels, predicted, relevance, explained_class, percents, absolute=absolute,
                      pixel=pixel, batch_size=batch_size)
            r.update({"rule": spec.rule, "params": dict(spec.params), "note": spec.note,
                      "plan": metadata(prepared.model).get("onnxlrp.plan", ""), "relevance_seconds": seconds})
            outs[m]["rules"][spec.label] = r
    return outs


def run_evaluate(model, *, data="builtin:digits", rules="rlrp,lrp0,epsilon", percent=PAPER_PERCENTS,
                 absolute=False, pixel=False, limit=None, preprocess="none", out_dir="onnxlrp-evaluate",
                 batch_size=128, masks=None) -> dict:
    """The R-LRP paper's masked-input study plus MoRF region perturbation, per rule.

    Accuracy is measured as in the paper on the correctly classified samples (``accuracy_correct``) and, for
    reference, on all samples against their labels (``accuracy_all``).  Writes ``results.json``, ``results.csv``,
    ``masked_accuracy.png`` and ``aopc.png`` into ``out_dir``; returns the results dict.
    """
    from onnxlrp.compiler import is_compiled

    if batch_size < 1:
        raise OnnxlrpError(f"--batch-size must be at least 1, got {batch_size}")
    check_out_dir(out_dir)
    specs = parse_rules(rules)
    percents = parse_percents(percent)
    source, _ = read_model(model)
    if is_compiled(source):
        raise OnnxlrpError(f"{show(model)}: is compiled already; evaluate needs the plain model (it compiles one "
                           "per rule)")
    dataset = load_dataset(data, input_shape(source, model)[1], preprocess, limit)
    object_masks = load_masks(masks, len(dataset.x), dataset.x.shape[-2:]) if masks else None
    localized = {}

    def on_relevance(spec, relevance, explained_class):
        if object_masks is not None:
            localized[spec.label] = localization(relevance, object_masks)

    with sigterm_guard("onnxlrp evaluate"):
        results = evaluate_rules(source, specs, dataset, batch_size=batch_size, modes=[(absolute, pixel)],
                                 percents=percents, on_relevance=on_relevance)[0]
        results["model"] = str(model)
        for label, numbers in localized.items():
            results["rules"][label]["localization"] = numbers
            click.echo(f"{escape_terminal(label)}: pointing game {numbers['pointing_game']:.3f}, "
                       f"mu {numbers['mu']:.3f}, mu_w {numbers['mu_w']:.3f}")
        out = ensure_dir(out_dir)
        for line in table(results):
            click.echo(line)
        click.echo(f"(accuracy on the {results['correctly_classified']} correctly classified samples, "
                   f"{results['ranking']} relevance per {results['unit']}; AOPC: MoRF region perturbation of the "
                   "explained value, the input of the Softmax if there is one)")
        write_bytes(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
        write_bytes(out / "results.csv", results_csv(results).encode())
        save_plots(results, out)
    click.echo(f"wrote {show(out / 'results.json')}, results.csv, masked_accuracy.png, aopc.png")
    return results
