"""The first-order Taylor decomposition at a root point as a propagation family (Bach et al. 2015, the Taylor-type
decomposition beside LRP; ``shared/papers/lrp-original-notes.txt``):

    f(x) = f(x0) + sum_d df/dx_d(x0) (x_d - x0_d) + (higher orders),   R_d = df/dx_d(x0) (x_d - x0_d).

The compiled model computes both in one graph:

- :func:`with_root_copy` appends a second forward pass to the canonical graph: every node that depends on a float
  data input ``x`` is copied with its tensors renamed under :data:`ROOT` (``taylor_root/``), reading the baseline
  ``x0`` broadcast to ``x``'s shape instead of ``x``. Initializers are not copied: both passes read the same
  weights.
- The sweep then runs on the copy with :class:`TaylorFamily`: the seed is ``one_hot(target)`` (the derivative of the
  selected score), each node sends back its vector-Jacobian product (:mod:`onnxlrp.passes.gradients`) at the copy's
  forward values, forks sum. The target class is the arg-max of the scores at ``x`` (not at ``x0``).
- :meth:`TaylorFamily.finish` multiplies the gradient by ``x - x0`` and adds the outputs ``taylor_root_value``
  (``f(x0)``, the explained score at the root point) and ``taylor_residual`` (``f(x) - f(x0) - sum_d R_d``, the
  higher orders the decomposition leaves out; 0 for a model that is linear between ``x0`` and ``x``). Where ``f``
  has no finite derivative at ``x0`` (a square root or logarithm at 0, a division by 0), the gradient is taken as 0
  and that input's part shows in the residual: no NaN or infinity leaves the graph.

Baselines (:func:`baselines`): ``zeros``; ``mean``, the mean over the samples of a data set (``--baseline-data``:
an ``.npy`` array ``[N, ...]`` or an ``.npz`` with one array, or ``x``): the average input the model was shown, as
captum and SHAP use it; or a ``.npy`` file holding ``x0`` itself (one sample's shape, with or without a batch axis
of 1, or anything that broadcasts to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import first_line, reason, show
from onnxlrp.rules import Rule

from .families import Family
from .gradients import gradient_emitter, gradient_reason

ROOT = "taylor_root/"
ROOT_VALUE_OUTPUT = "taylor_root_value"
RESIDUAL_OUTPUT = "taylor_residual"
BASELINES = ("zeros", "mean")


@dataclass(frozen=True)
class TaylorGradient(Rule):
    """What ``inspect`` shows for every rule-bearing node under the Taylor family."""

    name = "taylor"
    summary = "first-order Taylor decomposition at a baseline: R = df/dx(x0) * (x - x0) (Bach et al.)"
    kinds = ("linear", "join", "average_pool", "max_pool", "gate", "normalization")


class TaylorFamily(Family):
    """Gradients instead of relevance: seed ``one_hot(target)``, vector-Jacobian products per node, sums at forks;
    ``finish`` turns the gradient at ``x0`` into ``R = g * (x - x0)``. ``points``: root source -> data input."""

    name = "taylor"
    divides_by_outputs = False
    fuses_patterns = False  # differentiated op by op: a fused pattern is its ops

    def __init__(self, points: dict[str, str], baseline: str = ""):
        self.points, self.baseline = points, baseline  # baseline: what x0 is, for the model's metadata

    def plan(self, nodes):
        return {node.name: TaylorGradient() for node in nodes}

    def seed(self, ctx, one_hot, selected):
        return one_hot

    def emitter(self, ctx, node):
        return gradient_emitter(node)

    def unsupported_reason(self, ctx, node):
        return gradient_reason(ctx, node)

    def finish(self, ctx, relevance):
        b = ctx.b
        out, total = {}, []
        for root, x in self.points.items():
            g = relevance.get(root)
            if g is None:
                continue
            broken = b.op("Or", [b.op("IsNaN", [g]), b.op("IsInf", [g])], "no_derivative")
            g = b.op("Where", [broken, b.const(0.0, "zero"), g], "gradient")  # see the module docstring
            out[root] = b.op("Mul", [g, b.op("Sub", [ctx.value(x), ctx.value(root)], "step")], "R_taylor")
            total.append(ctx.reduce("ReduceSum", b.op("Flatten", [out[root]], "R_flat", axis=1), [1], keepdims=0))
        f_x0 = ctx.explained_value
        f_x = ctx.reduce("ReduceSum", b.op("Mul", [ctx.one_hot, b.op("Flatten", [ctx.value(ctx.predicted_from)],
                                                                       "scores", axis=1)]), [1], keepdims=0)
        residual = b.op("Sub", [f_x, f_x0], "difference")
        for t in total:
            residual = b.op("Sub", [residual, t], "residual")
        batch = ctx.batch_dim()
        for name, value in ((ROOT_VALUE_OUTPUT, f_x0), (RESIDUAL_OUTPUT, residual)):
            b.nodes.append(helper.make_node("Identity", [value], [name], name=b.fresh(name)))
            ctx.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch]))
        return out


def with_root_copy(model: onnx.ModelProto, shapes: dict[str, list], sources: list[str], explained: str,
                   points: dict[str, np.ndarray]) -> tuple[dict[str, list], dict[str, str]]:
    """Append to ``model`` (in place) the forward pass at the root point: ``ROOT + x = Expand(x0, Shape(x))`` for
    each source ``x`` and a copy of every node that depends on a source and leads to ``explained``, its tensors
    renamed under :data:`ROOT`. Returns the shapes with the copies' and {root source: source}."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack = set(), [explained]
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        if t in producer:
            stack.extend(i for i in producer[t].input if i)
    renamed = {s: ROOT + s for s in sources}
    copies = []
    for node in graph.node:
        if not any(i in renamed for i in node.input) or not any(o in needed for o in node.output):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise OnnxlrpError(f"node {node.name!r} ({node.op_type}): the taylor rule does not copy control flow")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = ROOT + node.name
        for k, i in enumerate(copy.input):
            copy.input[k] = renamed.get(i, i)
        for k, o in enumerate(copy.output):
            if o:
                renamed[o] = copy.output[k] = ROOT + o
        copies.append(copy)
    types = {vi.name: vi for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}
    starts = []
    for x in sources:
        elem = types[x].type.tensor_type.elem_type if x in types else TensorProto.FLOAT
        x0 = helper.make_tensor(ROOT + x + "/baseline", elem, points[x].shape,
                                points[x].astype(onnx.helper.tensor_dtype_to_np_dtype(elem)).ravel().tolist())
        graph.initializer.append(x0)
        shape = ROOT + x + "/shape"
        starts += [helper.make_node("Shape", [x], [shape], name=ROOT + x + "/shape_node"),
                   helper.make_node("Expand", [x0.name, shape], [ROOT + x], name=ROOT + x + "/expand")]
    graph.node.extend(starts + copies)
    for old, new in renamed.items():
        if old in types:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(types[old])
            vi.name = new
            graph.value_info.append(vi)
    shapes = dict(shapes) | {new: shapes[old] for old, new in renamed.items() if old in shapes}
    return shapes, {ROOT + s: s for s in sources}


def _load_array(path: str | Path, what: str) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        cause = reason(err) if isinstance(err, OSError) else first_line(err)
        raise OnnxlrpError(f"{show(path)}: cannot read {what} ({cause})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        keys = list(loaded.keys())
        key = "x" if "x" in keys else keys[0] if len(keys) == 1 else None
        if key is None:
            raise OnnxlrpError(f"{show(path)}: {what}: an .npz needs one array or one named 'x' (found "
                               f"{', '.join(keys) or 'none'})")
        loaded = loaded[key]
    if not np.issubdtype(loaded.dtype, np.number) or not np.all(np.isfinite(loaded)):
        raise OnnxlrpError(f"{show(path)}: {what} must hold finite numbers")
    return loaded.astype(np.float64)


def describe_baseline(baseline: str | Path, baseline_data: str | Path | None, points: dict[str, np.ndarray]) -> str:
    """What the root point is, for the compiled model's ``onnxlrp.baseline`` metadata."""
    if baseline == "zeros":
        return "zeros"
    if baseline == "mean":
        return f"mean of {Path(baseline_data).name}"
    return f"file {Path(baseline).name}"


def baselines(baseline: str | Path, baseline_data: str | Path | None, sources: list[str],
              shapes: dict[str, list]) -> dict[str, np.ndarray]:
    """The root point of each source as an array that broadcasts to ``[batch, *sample]`` (see the module
    docstring for what ``zeros``, ``mean`` and a file mean)."""
    sample = {x: shapes.get(x) for x in sources}
    if baseline == "zeros":
        if baseline_data is not None:
            raise OnnxlrpError("--baseline-data is for --baseline mean")
        return {x: np.zeros([1] * len(sample[x] or [0, 0])) for x in sources}
    if len(sources) != 1:
        raise OnnxlrpError(f"--baseline {baseline} needs a model with one float input (this one has "
                           f"{len(sources)}: {', '.join(sources)}); --baseline zeros works for any")
    (x,) = sources
    dims = sample[x]
    if baseline == "mean":
        if baseline_data is None:
            raise OnnxlrpError("--baseline mean needs --baseline-data FILE (.npy or .npz of samples [N, ...]): the "
                               "baseline is their mean")
        data = _load_array(baseline_data, "--baseline-data")
        if dims is not None and data.ndim != len(dims):
            raise OnnxlrpError(f"{show(baseline_data)}: samples of shape {list(data.shape[1:])} for input {x!r} of "
                               f"shape {dims}")
        value, origin = data.mean(axis=0, keepdims=True), baseline_data
    else:
        if baseline_data is not None:
            raise OnnxlrpError("--baseline-data is for --baseline mean")
        if not str(baseline).endswith(".npy"):
            raise OnnxlrpError(f"--baseline {baseline!r}: valid: zeros, mean or a .npy file")
        value, origin = _load_array(baseline, "--baseline"), baseline
    if dims is not None:
        if value.ndim == len(dims) - 1:
            value = value[None]
        try:
            np.broadcast_shapes(value.shape, tuple(1 if d is None else d for d in dims))
            ok = value.ndim == len(dims) and value.shape[0] == 1 and all(
                v in (1, d) or d is None for v, d in zip(value.shape[1:], dims[1:], strict=True))
        except ValueError:
            ok = False
        if not ok:
            raise OnnxlrpError(f"{show(origin)}: a baseline of shape {list(value.shape)} does not fit input {x!r} "
                               f"of shape {dims}")
    return {x: value}
