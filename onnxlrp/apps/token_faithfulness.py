"""The AttnLRP paper's faithfulness test for token models (Achtibat et al., ICML 2024, Sec. 4.1).

Input tokens are removed in the order of their relevance, the most relevant first (MoRF) or the least relevant first
(LeRF), and the explained score (the logit of the explained class, at the explained position of a decoder) is
recorded after each removal. A relevance that ranks the tokens the prediction rests on first makes the MoRF curve
fall early and the LeRF curve stay high, so the area between them, ``delta_AF = A_LeRF - A_MoRF``, is large.

- *Removing* a token sets its word embedding, the output of its lookup (:mod:`onnxlrp.passes.tokens`), to 0; the
  position and token-type embeddings stay, as the attention mask does. The forward pass is the compiled model's own
  (:func:`onnxlrp.apps.models.forward_model`), with a ``Mul`` by a keep mask behind every lookup.
- Only real tokens are ranked and removed: those with ``attention_mask`` 1 (all, without a mask).
- The curves are sampled at ``steps + 1`` fractions ``f = 0, 1/steps, ..., 1`` of a sample's real tokens
  (``round(f * n)`` removed) and averaged over the samples; an area is the mean of the curve (the trapezoid rule
  over ``f`` in ``[0, 1]``), in the units of the score.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxlrp.contract import CLASS_OUTPUT, RELEVANCE_OUTPUT
from onnxlrp.errors import OnnxlrpError

from .models import forward_model, metadata

__all__ = ["KEEP_INPUT", "removal_model", "removal_order", "run_evaluate_text", "token_faithfulness"]

KEEP_INPUT = "onnxlrp_token_keep"


def removal_model(compiled: onnx.ModelProto, token_input: str) -> tuple[onnx.ModelProto, str]:
    """The forward pass of ``compiled`` that outputs its explained tensor, with an input :data:`KEEP_INPUT` (float
    ``[batch, tokens]``, 1 keep, 0 remove) that multiplies every word embedding that ``token_input`` looks up. Returns
    the model and the explained tensor's name."""
    from onnxlrp.graph import GraphView
    from onnxlrp.passes.tokens import token_inputs

    explained = metadata(compiled).get("onnxlrp.explained", "")
    if not explained:
        raise OnnxlrpError("the model was compiled without the onnxlrp.explained metadata; compile it again")
    model = forward_model(compiled, [explained])
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    found = [t for t in token_inputs(graph, GraphView.of(graph).consumers, constants) if t.name == token_input]
    if not found:
        raise OnnxlrpError(f"input {token_input!r} looks up no embedding table: no token to remove")
    nodes = []
    axes = numpy_helper.from_array(np.array([-1], np.int64), f"{KEEP_INPUT}_axes")
    graph.initializer.append(axes)
    keep3 = f"{KEEP_INPUT}_3d"
    nodes.append(helper.make_node("Unsqueeze", [KEEP_INPUT, axes.name], [keep3], name=keep3))
    lookups = set(found[0].lookups)
    for node in graph.node:
        nodes.append(node)
        for k, out in enumerate(node.output):
            if out in lookups:
                node.output[k] = f"{out}_embedding"
                nodes.append(helper.make_node("Mul", [node.output[k], keep3], [out], name=f"{out}_keep"))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.FLOAT, ["batch", "tokens"]))
    return model, explained


def removal_order(relevance: np.ndarray, real: np.ndarray, most_first: bool) -> np.ndarray:
    """The real tokens' positions of one sample in the order of removal: by relevance, the largest first
    (``most_first``) or the smallest first; ties in position order."""
    positions = np.flatnonzero(real)
    key = -relevance[positions] if most_first else relevance[positions]
    return positions[np.argsort(key, kind="stable")]


def token_faithfulness(compiled: onnx.ModelProto, feeds: dict[str, np.ndarray], *, steps: int = 20,
                       position: int = -1, providers=None) -> dict:
    """Run ``compiled`` (a token model compiled by onnxlrp, one token input) on ``feeds`` and return the MoRF and
    LeRF curves of the explained score (``[steps + 1]``, averaged over the samples), their areas and ``delta_AF``
    (see the module docstring), with the per-sample areas. ``position``: the explained position of a
    ``[batch, tokens, classes]`` output (as compiled)."""
    from onnxlrp.runtime import make_session, with_target

    if steps < 1:
        raise OnnxlrpError(f"steps must be at least 1, got {steps}")
    outputs = {o.name for o in compiled.graph.output}
    tokens = [i.name for i in compiled.graph.input if f"{RELEVANCE_OUTPUT}.{i.name}" in outputs]
    if len(tokens) != 1:
        raise OnnxlrpError(f"the faithfulness test needs a model with one token input (integer ids looked up in an "
                           f"embedding table); this one has {len(tokens)}")
    token = tokens[0]
    explainer = make_session(compiled, providers)
    result = dict(zip([o.name for o in explainer.get_outputs()],
                      explainer.run(None, with_target(explainer, feeds)), strict=True))
    relevance = np.asarray(result[f"{RELEVANCE_OUTPUT}.{token}"], dtype=np.float64)
    classes = np.asarray(result[CLASS_OUTPUT]).reshape(-1)
    ids = feeds[token]
    real = np.asarray(feeds.get("attention_mask", np.ones_like(ids))) != 0
    model, explained = removal_model(compiled, token)
    session = make_session(model, providers)
    wanted = {i.name for i in session.get_inputs()}
    base = {k: v for k, v in feeds.items() if k in wanted}
    fractions = np.linspace(0.0, 1.0, steps + 1)
    curves = {}
    for label, most_first in (("morf", True), ("lerf", False)):
        curve = np.zeros((len(ids), steps + 1))
        for s, fraction in enumerate(fractions):
            keep = np.ones(ids.shape, dtype=np.float32)
            for i in range(len(ids)):
                order = removal_order(relevance[i], real[i], most_first)
                keep[i, order[:int(round(fraction * len(order)))]] = 0.0
            score = np.asarray(session.run([explained], base | {KEEP_INPUT: keep})[0], dtype=np.float64)
            if score.ndim == 3:
                score = score[:, position]
            curve[:, s] = score[np.arange(len(ids)), classes]
        curves[label] = curve
    area = {label: (curve[:, 1:] + curve[:, :-1]).sum(1) / (2 * steps) for label, curve in curves.items()}
    return {"fractions": fractions.tolist(), "morf": curves["morf"].mean(0).tolist(),
            "lerf": curves["lerf"].mean(0).tolist(), "area_morf": float(area["morf"].mean()),
            "area_lerf": float(area["lerf"].mean()), "delta_af": float((area["lerf"] - area["morf"]).mean()),
            "delta_af_per_sample": (area["lerf"] - area["morf"]).tolist(), "explained": explained,
            "explained_class": classes.tolist(), "samples": int(len(ids)), "steps": steps}


def run_evaluate_text(model, texts, tokenizer, *, rules: str = "attnlrp,cp-lrp", steps: int = 20,
                      position: int | None = None, out_dir="onnxlrp-evaluate") -> dict:
    """``onnxlrp evaluate MODEL --text ... --tokenizer tokenizer.json``: :func:`token_faithfulness` per rule of
    ``rules`` on each text (tokenized with :func:`onnxlrp.apps.text.load_tokenizer`), averaged over the texts; prints a
    table and writes ``results.json`` into ``out_dir``."""
    import json
    from pathlib import Path

    import click

    from onnxlrp.compiler import compile as compile_model
    from onnxlrp.compiler import is_compiled
    from onnxlrp.io import read_model, write_atomic
    from onnxlrp.messages import show
    from onnxlrp.naming import escape_terminal

    from .files import check_out_dir, ensure_dir
    from .rulespec import parse_rules
    from .text import feeds_for, load_tokenizer

    check_out_dir(out_dir)
    specs = parse_rules(rules)
    tok = load_tokenizer(tokenizer)
    encodings = [tok.encode(text) for text in texts]
    if not encodings or any(len(e.ids) == 0 for e in encodings):
        raise OnnxlrpError("evaluate --text: a text has no tokens")
    source, _ = read_model(model)
    if is_compiled(source):
        raise OnnxlrpError(f"{show(model)}: is compiled already; evaluate needs the plain model (it compiles one per "
                           "rule)")
    results = {"model": str(model), "texts": list(texts), "steps": steps,
               "score": "the explained logit at the explained class", "removal": "word embedding set to 0",
               "rules": {}}
    click.echo(f"{'rule':<14}{'A_MoRF':>10}{'A_LeRF':>10}{'delta_AF':>10}")
    for spec in specs:
        compiled = compile_model(model, spec.rule, position=position, **spec.params)
        per_text = [token_faithfulness(compiled, feeds_for(compiled, e)[0], steps=steps,
                                       position=-1 if position is None else position) for e in encodings]
        summary = {key: float(np.mean([r[key] for r in per_text])) for key in ("area_morf", "area_lerf", "delta_af")}
        summary.update(morf=np.mean([r["morf"] for r in per_text], 0).tolist(),
                       lerf=np.mean([r["lerf"] for r in per_text], 0).tolist(),
                       delta_af_per_text=[r["delta_af"] for r in per_text], rule=spec.rule, params=dict(spec.params))
        results["rules"][spec.label] = summary
        click.echo(f"{escape_terminal(spec.label):<14}{summary['area_morf']:>10.4g}{summary['area_lerf']:>10.4g}"
                   f"{summary['delta_af']:>10.4g}")
    out = ensure_dir(Path(out_dir))
    text = json.dumps(results, indent=1) + "\n"
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    click.echo(f"wrote {show(out / 'results.json')} (areas over the fraction of real tokens removed, {steps} steps; "
               "delta_AF = A_LeRF - A_MoRF, larger is more faithful)")
    return results
