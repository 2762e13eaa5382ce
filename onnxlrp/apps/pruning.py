"""``onnxlrp prune``: neuron ranking by average relevance and pruning curves (Groudiev, Sec. 3.2, Fig. 3.4).

The neurons of an inner tensor (``--tensor``: the elements of a ``[N, K]`` tensor, the channels of a
``[N, C, ...]`` one) are ranked by the absolute value of their average relevance over ``--rank-data`` (the tensor's
relevance is what ``--relevance-at`` outputs; a channel's relevance is summed over its positions first) and, for
comparison, by the L1 and L2 norms of their incoming weights (the output unit's weights in the linear layer that
produces the tensor, through activations, BatchNormalization and a bias Add). Pruning a neuron sets its value to
0; for each ranking the neurons are pruned lowest first, and the accuracy and the cross-entropy loss of the
explained logits on ``--data`` are measured after each step.

Writes ``pruning.csv``, ``pruning.json``, ``pruning_accuracy.png`` and ``pruning_loss.png``.
"""

from __future__ import annotations

import json

import click
import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxlrp.contract import exact_output, inner_output
from onnxlrp.errors import OnnxlrpError
from onnxlrp.io import read_model
from onnxlrp.messages import show

from .files import check_out_dir, ensure_dir, write_bytes
from .in_memory import load_dataset
from .models import forward_model, prepare
from .rulespec import parse_rules

PASSING = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Identity", "Dropout", "BatchNormalization", "Add",
           "Elu", "Selu", "Gelu", "Softplus")
MASK_INPUT = "onnxlrp_neuron_mask"


def neuron_scores(relevance: np.ndarray) -> np.ndarray:
    """``|mean over samples of R|`` per neuron: per element of ``[N, K]``, per channel (summed over its positions)
    of ``[N, C, ...]``."""
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim > 2:
        r = r.reshape(r.shape[0], r.shape[1], -1).sum(axis=2)
    return np.abs(r.mean(axis=0))


def incoming_weights(model: onnx.ModelProto, tensor: str) -> np.ndarray | None:
    """``[K, fan-in]``: each neuron's incoming weights in the linear layer that produces ``tensor`` (through
    element-wise activations, BatchNormalization and a constant Add), or None when no such layer is found."""
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    t = tensor
    while t in producer:
        node = producer[t]
        if node.op_type in ("Gemm", "MatMul", "Conv") and node.input[1] in weights:
            w = weights[node.input[1]].astype(np.float64)
            if node.op_type == "Conv":
                return w.reshape(w.shape[0], -1)
            transposed = any(a.name == "transB" and a.i for a in node.attribute)
            return w if transposed else w.T
        if node.op_type not in PASSING or (node.op_type == "Add" and not any(i in weights for i in node.input)):
            return None
        t = next(i for i in node.input if i not in weights)
    return None


def masked_forward(compiled: onnx.ModelProto, explained: str, tensor: str, mask_shape: list[int]) -> onnx.ModelProto:
    """The forward pass with ``tensor`` multiplied by the input ``onnxlrp_neuron_mask`` (``mask_shape``: ``[K]``,
    or ``[C, 1, ...]`` for a ``[N, C, ...]`` tensor): 0 prunes a neuron."""
    fwd = forward_model(compiled, [explained])
    masked = tensor + "/pruned"
    mul = helper.make_node("Mul", [tensor, MASK_INPUT], [masked], name=masked)
    nodes = [] if any(tensor in n.output for n in fwd.graph.node) else [mul]
    for node in fwd.graph.node:
        node.input[:] = [masked if i == tensor else i for i in node.input]
        nodes.append(node)
        if tensor in node.output:
            nodes.append(mul)
    del fwd.graph.node[:]
    fwd.graph.node.extend(nodes)
    fwd.graph.input.append(helper.make_tensor_value_info(MASK_INPUT, onnx.TensorProto.FLOAT, mask_shape))
    return fwd


def curves(session, x: np.ndarray, labels: np.ndarray, input_name: str, explained: str, order: np.ndarray,
           steps: list[int], mask_shape: list[int], batch_size: int) -> tuple[list[float], list[float]]:
    """Accuracy and mean cross-entropy of the explained logits after pruning ``order[:n]`` for each ``n`` in
    ``steps``."""
    accuracy, loss = [], []
    for n in steps:
        mask = np.ones(mask_shape[0], dtype=np.float32)
        mask[order[:n]] = 0
        mask = mask.reshape(mask_shape)
        logits = np.concatenate([
            session.run([explained], {input_name: x[i:i + batch_size], MASK_INPUT: mask})[0].reshape(
                len(x[i:i + batch_size]), -1) for i in range(0, len(x), batch_size)]).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        accuracy.append(float((logits.argmax(axis=1) == labels).mean()))
        loss.append(float(-log_probs[np.arange(len(labels)), labels].mean()))
    return accuracy, loss


def inner_relevance(prepared, tensor: str, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The relevance of ``tensor`` for every sample (float64 path counts where the semiring has them)."""
    from onnxlrp.runtime import Explainer

    explainer = Explainer(prepared.model)
    name = inner_output(tensor)
    parts = []
    for i in range(0, len(x), batch_size):
        extra = explainer(x[i:i + batch_size]).extra
        parts.append(np.asarray(extra.get(exact_output(name), extra[name]), dtype=np.float64))
    return np.concatenate(parts)


def default_steps(size: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, size, num=min(size + 1, 26))})


def run_prune(model, data: str, *, tensor: str, out_dir: str, rules: str = "lrp0,viterbi,boolean,counting",
              rank_data: str | None = None, steps: list[int] | None = None, preprocess: str = "none",
              limit: int | None = None, batch_size: int = 128, input_shapes=None) -> dict:
    """Rank the neurons of ``tensor`` by each rule's average relevance over ``rank_data`` (default: ``data``) and by
    their weights' L1/L2 norms; prune them lowest first; accuracy and loss on ``data`` per step."""
    from onnxlrp.heatmap import save_plot
    from onnxlrp.io import write_atomic
    from onnxlrp.runtime import make_session

    check_out_dir(out_dir)
    source, _ = read_model(model)
    evaluation = load_dataset(source, model, data, preprocess, limit, input_shapes)
    ranking = evaluation if rank_data is None else load_dataset(source, model, rank_data, preprocess, limit,
                                                                             input_shapes)
    scores, shape, first = {}, None, None
    for spec in parse_rules(rules):
        prepared = prepare(source, shown_as=model, rule=spec.rule, input_shapes=input_shapes, relevance_at=[tensor],
                           **spec.params)
        relevance = inner_relevance(prepared, tensor, ranking.x, batch_size)
        scores[spec.label] = neuron_scores(relevance)
        shape, first = list(relevance.shape), first or prepared
        click.echo(f"{spec.label}: relevance of {shape[1]} neurons of {tensor!r} over {len(ranking.x)} samples")
    weights = incoming_weights(first.model, tensor)
    if weights is not None and len(weights) == shape[1]:
        scores["L1 norm"] = np.abs(weights).sum(axis=1)
        scores["L2 norm"] = np.sqrt((weights ** 2).sum(axis=1))
    else:
        click.echo(f"no linear layer found right before {tensor!r}: no L1/L2 rankings")
    steps = default_steps(shape[1]) if steps is None else sorted(set(steps))
    if steps[0] < 0 or steps[-1] > shape[1]:
        raise OnnxlrpError(f"--steps must lie in 0..{shape[1]} (the neurons of {tensor!r})")
    mask_shape = [shape[1]] + [1] * (len(shape) - 2)
    session = make_session(masked_forward(first.model, first.explained, tensor, mask_shape))
    results = {"model": show(model) if not hasattr(model, "graph") else "model", "data": evaluation.source,
               "rank_data": ranking.source, "tensor": tensor, "neurons": shape[1], "steps": steps, "methods": {}}
    for method, score in scores.items():
        order = np.argsort(score, kind="stable")
        accuracy, loss = curves(session, evaluation.x, evaluation.labels, first.input_name, first.explained, order,
                                steps, mask_shape, batch_size)
        results["methods"][method] = {"order": order.tolist(), "accuracy": accuracy, "loss": loss}
        click.echo(f"{method}: accuracy {accuracy[0]:.4f} -> {accuracy[len(steps) // 2]:.4f} (half the steps) -> "
                   f"{accuracy[-1]:.4f}")
    out = ensure_dir(out_dir)
    write_bytes(out / "pruning.json", json.dumps(results, indent=1).encode())
    rows = ["method,pruned,accuracy,loss"] + [f"{m},{n},{a:.6f},{lo:.6f}" for m, r in results["methods"].items()
                                              for n, a, lo in zip(steps, r["accuracy"], r["loss"], strict=True)]
    write_bytes(out / "pruning.csv", ("\n".join(rows) + "\n").encode())
    for metric in ("accuracy", "loss"):
        write_atomic(out / f"pruning_{metric}.png", lambda tmp, metric=metric: save_plot(
            tmp, steps, {m: r[metric] for m, r in results["methods"].items()},
            title=f"Pruning {tensor} (lowest first; {len(evaluation.x)} samples)", xlabel="neurons pruned",
            ylabel=metric))
    click.echo(f"wrote pruning.csv, pruning.json and the plots to {show(out)}")
    return results
