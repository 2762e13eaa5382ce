"""Canonicalization before the relevance pass.

1. Upgrade the default-domain opset to at least 13 (the version converter).
2. Turn Constant nodes into initializers; initializers listed as graph inputs (IR < 4) become plain constants.
3. Constant-fold weight subgraphs (nodes whose inputs are all constant) so every weight is an initializer,
   refusing any fold that would allocate more than :data:`~onnxlrp.passes.folding.MAX_FOLD_ELEMENTS`; an If with a
   constant condition becomes the branch it takes (:mod:`onnxlrp.passes.folding`). The folded values serve the
   compile-time analysis; the compiled model gets the subgraphs back where they are smaller than their values
   (:class:`~onnxlrp.passes.folding.FoldedConstants`, :func:`~onnxlrp.passes.folding.restore_folded`), as in a Caffe2
   file whose weights are made by ConstantOfShape, Tile or Reshape of a few bytes.
4. Drop Dropout and Identity.
5. Infer shapes (strictly), with user-given input shapes where the model leaves spatial dims open.

BatchNormalization is not rewritten here: the forward graph stays as exported, so its outputs are unchanged
bit for bit. The relevance pass folds a BatchNormalization into the linear layer before it
(:func:`onnxlrp.passes.linear.linear_layer`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter

from onnxlrp.errors import OnnxlrpError
from onnxlrp.graph import implicit_inputs

from .folding import FoldedConstants, fold_constants, fold_static_shapes
from .onnx_ml import ML, declared_shapes, lower_ml_ops
from .quantized import has_quantized_operators, standard_form

MIN_OPSET = 13


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


