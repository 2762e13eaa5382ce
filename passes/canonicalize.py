"""Canonicalization before the relevance pass.

1. Upgrade the default-domain opset to at least 13 (the version converter).
2. Turn Constant nodes into initializers; initializers listed as graph inputs (IR < 4) become plain constants.
3. Constant-fold weight subgraphs (nodes whose inputs are all constant) so every weight is an initializer,
   refusing any fold that would allocate more than :data:`MAX_FOLD_ELEMENTS`; an If with a constant condition
   becomes the branch it takes. The folded values serve the compile-time analysis; the compiled model gets the
   subgraphs back where they are smaller than their values (:class:`FoldedConstants`, :func:`restore_folded`), as in
   a Caffe2 file whose weights are made by ConstantOfShape, Tile or Reshape of a few bytes.
4. Drop Dropout and Identity.
5. Infer shapes (strictly), with user-given input shapes where the model leaves spatial dims open.

BatchNormalization is not rewritten here: the forward graph stays as exported, so its outputs are unchanged
bit for bit. The relevance pass folds a BatchNormalization into the linear layer before it
(:func:`onnxlrp.passes.linear.linear_layer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter
from onnx.reference import ReferenceEvaluator

from onnxlrp.errors import OnnxlrpError
from onnxlrp.graph import implicit_inputs

from .control_flow import every_name, inline_if
from .onnx_ml import ML, declared_shapes, lower_ml_ops
from .ops import spec
from .quantized import has_quantized_operators, standard_form

MIN_OPSET = 13
MAX_FOLD_ELEMENTS = 1 << 28


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # not SerializeToString: that fails past protobuf's 2 GB limit
    return copy


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def upgrade_opset(model: onnx.ModelProto, target: int | None) -> onnx.ModelProto:
    current = default_opset(model)
    wanted = max(target or current, MIN_OPSET)
    if wanted == current:
        return model
    if wanted < current:
        raise OnnxlrpError(f"--opset {target} is below the model's opset {current}")
    try:
        converted = version_converter.convert_version(model, wanted)
    except Exception as err:  # the converter raises many types, natively included
        raise OnnxlrpError(f"cannot upgrade the model from opset {current} to {wanted}: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    restore_legacy_resizes(converted, legacy_resizes(model, current))
    if not converted.functions:  # the converter drops model-local functions and their domains
        converted.functions.extend(model.functions)
    known = {i.domain for i in converted.opset_import}
    converted.opset_import.extend(i for i in model.opset_import if i.domain not in known)
    return converted


def legacy_resizes(model: onnx.ModelProto, opset: int) -> list[tuple[str, np.ndarray | None]]:
    """Upsample (opsets 7-10) and Resize-10 nodes in graph order: their mode and constant scales (None if unknown)."""
    if opset > 10:
        return []
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type in ("Upsample", "Resize") and node.domain in ("", "ai.onnx"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            mode = attrs.get("mode", b"nearest")
            scales = attrs.get("scales") or (values.get(node.input[1]) if len(node.input) > 1 else None)
            found.append((mode.decode() if isinstance(mode, bytes) else mode,
                          None if scales is None else np.asarray(scales, np.float32)))
    return found


def restore_legacy_resizes(model: onnx.ModelProto, legacy: list[tuple[str, np.ndarray | None]]) -> None:
    """Give the Resize nodes that the version converter made of Upsample/Resize-10 (in the same order, under new
    output names) their old coordinates.

    Before opset 11 the output coordinate ``x`` read the input at ``x / scale`` (asymmetric); nearest took its
    floor, or (onnxruntime, Resize-10) its ceiling on a downsampled axis. The converter writes a Resize with the
    defaults (half_pixel, round_prefer_floor), which moves linear interpolation (by 0.14 on a 3x3 map scaled by 1.5
    and 2.5): the original outputs would change."""
    resizes = [n for n in model.graph.node if n.op_type == "Resize" and n.domain in ("", "ai.onnx")]
    if len(resizes) != len(legacy):
        raise OnnxlrpError(f"the opset upgrade turned {len(legacy)} Upsample/Resize nodes into {len(resizes)} Resize "
                           "nodes; their coordinates cannot be restored")
    for node, (mode, scales) in zip(resizes, legacy, strict=True):
        kept = [a for a in node.attribute if a.name not in ("coordinate_transformation_mode", "nearest_mode")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        if mode == "nearest":
            down, up = (scales is not None and bool((scales < 1).any())), (scales is None or bool((scales > 1).any()))
            if down and up:
                raise OnnxlrpError(f"node {node.name or node.output[0]!r} (Resize, opset 10) upsamples one axis and "
                                   "downsamples another with nearest rounding, which no later Resize expresses")
            node.attribute.append(helper.make_attribute("nearest_mode", "ceil" if down else "floor"))


def constants_to_initializers(graph: onnx.GraphProto, ir_version: int) -> None:
    """Constant nodes become initializers. Under IR < 4 every initializer must be listed as a graph input, and
    those inputs are constants, so they stop being inputs; from IR 4 on such an input is a default a caller may
    override: it stays an input, and the rules use its default as the weight."""
    if ir_version < 4:
        init_names = {t.name for t in graph.initializer}
        kept_inputs = [v for v in graph.input if v.name not in init_names]
        del graph.input[:]
        graph.input.extend(kept_inputs)
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            value = _constant_value(node)
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.asarray(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.asarray(attr.floats, dtype=np.float32)
    if attr.name == "value_int":
        return np.asarray(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.asarray(attr.ints, dtype=np.int64)
    return None


def _fold_size(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> int | None:
    """Element count a shape-creating node would allocate, computed without allocating."""
    if node.op_type == "ConstantOfShape":
        return int(np.prod(values[node.input[0]].astype(object)))
    if node.op_type == "Expand":
        shape = np.broadcast_shapes(values[node.input[0]].shape, tuple(int(d) for d in values[node.input[1]]))
        return int(np.prod(np.asarray(shape, dtype=object)))
    if node.op_type == "Tile":
        reps = values[node.input[1]].astype(object)
        return int(values[node.input[0]].size * np.prod(reps))
    if node.op_type == "Range":
        start, limit, delta = (values[n].item() for n in node.input)
        return int(max(np.ceil((limit - start) / delta), 0)) if delta else 0
    return None


@dataclass
class FoldedConstants:
    """What :func:`fold_constants` evaluated: the folded nodes in graph order, and the constants they read that no
    folded node produces (the model's own initializers, kept here when the folding left them unused)."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    leaves: dict[str, onnx.TensorProto] = field(default_factory=dict)


def fold_constants(graph: onnx.GraphProto, opset_imports) -> FoldedConstants:
    """Evaluate nodes whose inputs are all constant and store their outputs as initializers; replace an If whose
    condition is constant by the nodes of the branch it takes (:mod:`onnxlrp.passes.control_flow`), which are
    folded in turn. Returns the folded nodes and what they read, so that :func:`restore_folded` can put them
    back."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors = {t.name: t for t in graph.initializer}
    elem_types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
    folded = FoldedConstants()
    produced: set[str] = set()
    kept = []
    pending = list(reversed(graph.node))
    taken: set[str] | None = None
    while pending:
        node = pending.pop()
        if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[0] in values \
                and values[node.input[0]].size == 1:
            taken = every_name(graph) if taken is None else taken
            inlined = inline_if(node, bool(values[node.input[0]].item()), taken)
            if inlined is not None:
                nodes, initializers = inlined
                graph.initializer.extend(initializers)
                values.update({t.name: numpy_helper.to_array(t) for t in initializers})
                tensors.update({t.name: t for t in initializers})
                pending.extend(reversed(nodes))
                continue
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and node.input[0] in values \
                and elem_types.get(node.input[1]):
            # CastLike(constant, x) reads only x's element type: a constant once that type is declared (the dynamo
            # exporter's zero bias of a bias-free Conv is ``Expand(CastLike(0, input), ...)``); it stays folded
            value = values[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(elem_types[node.input[1]]))
            values[node.output[0]] = value
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            tensors[node.output[0]] = folded.leaves[node.output[0]] = graph.initializer[-1]
            continue
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.input
            and all(not n or n in values for n in node.input)
            and spec(node).foldable  # not random, not control flow (the op registry's fact)
        )
        if not foldable:
            kept.append(node)
            continue
        size = _fold_size(node, values)
        if size is not None and size > MAX_FOLD_ELEMENTS:
            raise OnnxlrpError(f"node {node.name or node.output[0]!r} ({node.op_type}) would create a tensor of "
                               f"{size} elements; refusing to allocate it")
        try:
            outputs = _evaluate(node, values, opset_imports)
        except Exception:
            kept.append(node)  # leave it to onnxruntime at run time
            continue
        for name in node.input:
            if name and name not in produced:
                folded.leaves[name] = tensors[name]
        for name, value in zip(node.output, outputs, strict=False):
            if name:
                values[name] = value
                graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
                tensors[name] = graph.initializer[-1]
                produced.add(name)
        folded.nodes.append(node)
    if folded.nodes or folded.leaves or taken is not None:
        for name, tensor in folded.leaves.items():  # a copy: the list below drops the unused ones
            folded.leaves[name] = onnx.TensorProto()
            folded.leaves[name].CopyFrom(tensor)
        del graph.node[:]
        graph.node.extend(drop_dead_nodes(graph, kept) if taken is not None else kept)
        _drop_unused_initializers(graph)
    return folded


def restore_folded(graph: onnx.GraphProto, folded: FoldedConstants) -> None:
    """Replace the folded values that ``graph`` still reads by the nodes that computed them, wherever that makes the
    file smaller: per connected group of folded nodes, when the constants they read (and ``graph`` lacks) take
    fewer bytes than the values they produce. onnxruntime folds them again when it creates the session, as it does
    for the source model. The nodes go first in the graph (they read only constants). A folded node's constant input
    that the graph reads itself (a QDQ model's integer weight, which the rules dequantize with ops of their own) is
    put back whatever is restored."""
    initializers = {t.name: t for t in graph.initializer}
    read = _used_names(graph)
    written = {o for n in graph.node for o in n.output} | {v.name for v in graph.input}
    for name in sorted(read - set(initializers) - written):  # a leaf the relevance graph reads itself
        if name in folded.leaves:
            graph.initializer.append(folded.leaves[name])
            initializers[name] = graph.initializer[-1]
    producer = {o: i for i, n in enumerate(folded.nodes) for o in n.output if o}
    wanted = [name for name in read if name in producer and name in initializers]
    closure: set[int] = set()
    stack = [producer[name] for name in wanted]
    while stack:
        i = stack.pop()
        if i not in closure:
            closure.add(i)
            stack.extend(producer[n] for n in folded.nodes[i].input if n in producer)
    group = {i: i for i in closure}

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in closure:
        for name in folded.nodes[i].input:
            if name in producer and producer[name] in closure:
                group[root(i)] = root(producer[name])
    taken = {o for n in graph.node for o in n.output} | set(initializers)
    restored: set[int] = set()
    for members in _groups(closure, root).values():
        outputs = {o for i in members for o in folded.nodes[i].output if o}
        values = sum(_nbytes(initializers[o]) for o in outputs if o in initializers and o in read)
        leaves = {n for i in members for n in folded.nodes[i].input if n and n not in producer}
        added = sum(_nbytes(folded.leaves[n]) for n in leaves if n not in initializers)
        clash = any(o in taken and not (o in initializers and o in read) for o in outputs)
        if added < values and not clash:
            restored |= members
    if not restored:
        return
    outputs = {o for i in restored for o in folded.nodes[i].output if o}
    leaves = {n for i in restored for n in folded.nodes[i].input if n and n not in producer}
    kept = [t for t in graph.initializer if t.name not in outputs]
    kept += [folded.leaves[n] for n in sorted(leaves) if n not in initializers]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [folded.nodes[i] for i in sorted(restored)] + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def _groups(members: set[int], root) -> dict[int, set[int]]:
    groups: dict[int, set[int]] = {}
    for i in members:
        groups.setdefault(root(i), set()).add(i)
    return groups


def _nbytes(tensor: onnx.TensorProto) -> int:
    return tensor.ByteSize()


def drop_dead_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads (after an If was inlined: the branch not taken left the
    nodes that only it read, e.g. the batch statistics of a training-mode BatchNorm)."""
    used = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):
        if any(o in used for o in node.output):
            kept.append(node)
            used |= set(node.input) | implicit_inputs(node)
    return kept[::-1]


#: onnx's reference evaluator implements these from opset 19 on; for integer inputs the earlier versions compute the
#: same (opset 19 added float8 types, 21 blocked quantization), so the weights of a QDQ model exported at opset 13-18
#: are folded with opset 19's implementation
QUANTIZATION_OPS = ("DequantizeLinear", "QuantizeLinear")


def _evaluate(node, values, opset_imports):
    if node.op_type in QUANTIZATION_OPS and node.domain in ("", "ai.onnx"):
        opset_imports = [helper.make_opsetid(i.domain, max(i.version, 19)) if i.domain in ("", "ai.onnx") else i
                         for i in opset_imports]
    sub_inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in node.input if n]
    sub_outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in node.output if n]
    model = helper.make_model(helper.make_graph([node], "fold", sub_inputs, sub_outputs),
                              opset_imports=list(opset_imports))
    feeds = {n: values[n] for n in node.input if n}
    return ReferenceEvaluator(model).run(None, feeds)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node, a subgraph of a node (outer-scope reads), or a graph output."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used |= set(node.input) | implicit_inputs(node)
    return used


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers nothing reads, except the defaults of graph inputs (without it the input is required)."""
    used = _used_names(graph) | {v.name for v in graph.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def drop_identities(graph: onnx.GraphProto) -> None:
    """Remove Identity and (inference-mode) Dropout, rewiring readers to their input."""
    outputs = {o.name for o in graph.output}
    read_by_subgraphs = set().union(*(implicit_inputs(n) for n in graph.node))
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        is_noop = node.op_type in ("Identity", "Dropout") and node.domain in ("", "ai.onnx")
        dropout_mask_used = node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]
        if is_noop and not dropout_mask_used and node.output[0] not in outputs | read_by_subgraphs:
            rename[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique, non-empty name (the rule plan and error messages refer to nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def set_input_shapes(graph: onnx.GraphProto, input_shapes: dict[str, list[int]] | None) -> None:
    for vi in graph.input:
        if input_shapes and vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            wanted = input_shapes[vi.name]
            if len(dims) and len(dims) != len(wanted):
                raise OnnxlrpError(f"--input-shape for {vi.name!r} has rank {len(wanted)}, the model's input "
                                   f"has rank {len(dims)}")
            names = [d.dim_param for d in dims]
            del vi.type.tensor_type.shape.dim[:]
            for i, d in enumerate(wanted):
                dim = vi.type.tensor_type.shape.dim.add()
                if d > 0:
                    dim.dim_value = d
                else:  # stays open: the batch on axis 0, the model's own name elsewhere (a batch on axis 1, ...)
                    dim.dim_param = "batch" if i == 0 else (names[i] if i < len(names) and names[i] else f"dim{i}")


LIGHT_INITIALIZER_BYTES = 1 << 20


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list]]:
    """Strict shape inference: a model whose shapes contradict each other is refused here, not at run time.

    It runs on a light copy in which large initializers (inference needs only their shapes) are graph inputs, so
    big weights are never copied or serialized and models past protobuf's 2 GB limit work too. The inferred
    value_info is stored in ``model``, which is returned with the static shape of every tensor.

    Quantized operator nodes (onnxruntime's ``com.microsoft`` QLinearAdd, QGemm, ..., which onnx does not infer) are
    inferred in their standard form (:func:`onnxlrp.passes.quantized.standard_form`); the shapes returned include the
    tensors of that form, which the relevance pass's analysis view has too."""
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    graph = light.graph
    virtual: set[str] = set()
    if has_quantized_operators(model.graph.node):
        expansion = standard_form(list(model.graph.node), {t.name: numpy_helper.to_array(t)
                                                           for t in model.graph.initializer})
        graph.node.extend(expansion.nodes)
        graph.input.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape)
                           for name, value in expansion.constants.items())
        virtual = expansion.virtual
    else:
        graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if t.ByteSize() > LIGHT_INITIALIZER_BYTES:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            graph.initializer.append(t)
    try:
        declare_uninferred_outputs(light)
        inferred = shape_inference.infer_shapes(light, strict_mode=True, data_prop=True).graph
    except Exception as err:
        raise OnnxlrpError(f"the model is not valid: {str(err).strip().splitlines()[0]}") from err
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi for vi in inferred.value_info if vi.name not in virtual)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return model, shapes


SAME_TYPE_AS_INPUT = ("GroupNormalization",)  # ops whose output onnx's shape inference leaves untyped (onnx 1.23)


def declare_uninferred_outputs(light: onnx.ModelProto) -> None:
    """Give the outputs of :data:`SAME_TYPE_AS_INPUT` ops their input's inferred type and shape, so that strict shape
    inference can go on past them."""
    graph = light.graph
    nodes = [n for n in graph.node if n.op_type in SAME_TYPE_AS_INPUT and n.domain in ("", "ai.onnx")]
    if not nodes:
        return
    loose = shape_inference.infer_shapes(light, data_prop=True).graph
    known = {vi.name: vi for vi in list(loose.value_info) + list(loose.input)}
    for node in nodes:
        if node.input[0] in known and node.output[0] not in known:
            declared = graph.value_info.add()
            declared.CopyFrom(known[node.input[0]])
            declared.name = node.output[0]


def to_float16(model: onnx.ModelProto) -> None:
    """Turn a float32 model into a float16 one in place: float initializers, graph inputs/outputs, Cast targets and
    float tensor attributes. (``--precision fp16``: the forward pass runs in float16; relevance stays float32.)"""
    graph = model.graph
    for i, t in enumerate(graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(graph.input) + list(graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del graph.value_info[:]
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))


def canonicalize(model: onnx.ModelProto, *, opset: int | None = None, input_shapes: dict[str, list[int]] | None = None,
                 precision: str | None = None) -> tuple[onnx.ModelProto, dict[str, list], FoldedConstants]:
    """Return the canonical model, the static shape of every tensor (None for unknown dims) and the constant
    subgraphs that were folded (to put back into the compiled model, :func:`restore_folded`; none for
    ``precision="fp16"``, whose folded values are converted to float16 with the other initializers)."""
    model = _copy(model)
    ir_version = model.ir_version
    constants_to_initializers(model.graph, ir_version)
    model.ir_version = max(ir_version, 7)  # initializers are no longer inputs: no longer an IR-3 graph
    model = upgrade_opset(model, opset)
    graph = model.graph
    name_nodes(graph)
    if any(node.domain == ML for node in graph.node):
        lower_ml_ops(graph, default_opset(model), declared_shapes(model))
    constants_to_initializers(graph, ir_version)
    folded = fold_constants(graph, model.opset_import)
    drop_identities(graph)
    set_input_shapes(graph, input_shapes)
    if precision == "fp16":
        to_float16(model)
        folded = FoldedConstants()
    elif precision not in (None, "fp32"):
        raise OnnxlrpError(f"unknown precision {precision!r}; valid: fp32, fp16")
    model, shapes = infer_shapes(model)
    if fold_static_shapes(model.graph, shapes):
        more = fold_constants(model.graph, model.opset_import)
        folded.nodes.extend(more.nodes)
        folded.leaves.update({k: v for k, v in more.leaves.items() if k not in folded.leaves})
        model, shapes = infer_shapes(model)
    return model, shapes, folded


def fold_static_shapes(graph: onnx.GraphProto, shapes: dict[str, list]) -> bool:
    """Replace by constants the ``Shape`` nodes whose input has static dims (over the node's ``start:end``), and the
    ``Gather``s of constant indices from a ``Shape`` whose gathered dims are static (a dynamic batch stays open).
    torch's TorchScript exporter computes the bounds of ``chunk`` from ``Shape(x)``; as constants they fold, and the
    Slices get constant bounds. Returns whether anything was folded."""
    constants = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    folded = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Shape" and shapes.get(node.input[0]) is not None:
            dims = shapes[node.input[0]]
            start, end = (next((a.i for a in node.attribute if a.name == key), default)
                          for key, default in (("start", 0), ("end", len(dims))))
            if None not in dims[start:end]:
                folded[node.output[0]] = np.asarray(dims[start:end], dtype=np.int64)
        elif node.op_type == "Gather" and node.input[1] in constants and node.input[0] in producer:
            shape_node = producer[node.input[0]]
            dims = shapes.get(shape_node.input[0]) if shape_node.op_type == "Shape" and not shape_node.attribute \
                else None
            if dims is None:
                continue
            index = numpy_helper.to_array(next(t for t in graph.initializer if t.name == node.input[1]))
            picked = np.asarray(dims, dtype=object)[index.astype(np.int64) % len(dims)]
            if not any(d is None for d in np.atleast_1d(picked)):
                folded[node.output[0]] = np.asarray(picked, dtype=np.int64)  # a scalar index picks an int
    if not folded:
        return False
    kept = [n for n in graph.node if not (n.output and n.output[0] in folded)]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in folded.items())
    return True
