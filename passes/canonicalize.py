"""Canonicalization before the relevance pass.

1. Upgrade the default-domain opset to at least 13 (the version converter).
2. Turn Constant nodes into initializers; initializers listed as graph inputs (IR < 4) become plain constants.
3. Constant-fold weight subgraphs (nodes whose inputs are all constant) so every weight is an initializer,
   refusing any fold that would allocate more than :data:`MAX_FOLD_ELEMENTS`.
4. Drop Dropout and Identity.
5. Infer shapes (strictly), with user-given input shapes where the model leaves spatial dims open.

BatchNormalization is not rewritten here: the forward graph stays as exported, so its outputs are unchanged
bit for bit. The relevance pass folds a BatchNormalization into the linear layer before it
(:func:`onnxlrp.passes.relevance.linear_layer`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter
from onnx.reference import ReferenceEvaluator

from onnxlrp.errors import OnnxlrpError
from onnxlrp.graph import implicit_inputs

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
    if not converted.functions:  # the converter drops model-local functions and their domains
        converted.functions.extend(model.functions)
    known = {i.domain for i in converted.opset_import}
    converted.opset_import.extend(i for i in model.opset_import if i.domain not in known)
    return converted


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


def fold_constants(graph: onnx.GraphProto, opset_imports) -> None:
    """Evaluate nodes whose inputs are all constant and store their outputs as initializers."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    elem_types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
    folded_any = False
    kept = []
    for node in graph.node:
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and node.input[0] in values \
                and elem_types.get(node.input[1]):
            # CastLike(constant, x) reads only x's element type: a constant once that type is declared (the dynamo
            # exporter's zero bias of a bias-free Conv is ``Expand(CastLike(0, input), ...)``)
            value = values[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(elem_types[node.input[1]]))
            values[node.output[0]] = value
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            folded_any = True
            continue
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.input
            and all(not n or n in values for n in node.input)
            and node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                     "Multinomial", "If", "Loop", "Scan")
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
        for name, value in zip(node.output, outputs, strict=False):
            if name:
                values[name] = value
                graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        folded_any = True
    if folded_any:
        del graph.node[:]
        graph.node.extend(kept)
        _drop_unused_initializers(graph)


def _evaluate(node, values, opset_imports):
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
    used = _used_names(graph)
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
    value_info is stored in ``model``, which is returned with the static shape of every tensor."""
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if t.ByteSize() > LIGHT_INITIALIZER_BYTES:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            graph.initializer.append(t)
    try:
        inferred = shape_inference.infer_shapes(light, strict_mode=True, data_prop=True).graph
    except Exception as err:
        raise OnnxlrpError(f"the model is not valid: {str(err).strip().splitlines()[0]}") from err
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.value_info)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return model, shapes


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
                 precision: str | None = None) -> tuple[onnx.ModelProto, dict[str, list]]:
    """Return the canonical model and the static shape of every tensor (None for unknown dims)."""
    model = _copy(model)
    ir_version = model.ir_version
    constants_to_initializers(model.graph, ir_version)
    model.ir_version = max(ir_version, 7)  # initializers are no longer inputs: no longer an IR-3 graph
    model = upgrade_opset(model, opset)
    graph = model.graph
    name_nodes(graph)
    constants_to_initializers(graph, ir_version)
    fold_constants(graph, model.opset_import)
    drop_identities(graph)
    set_input_shapes(graph, input_shapes)
    if precision == "fp16":
        to_float16(model)
    elif precision not in (None, "fp32"):
        raise OnnxlrpError(f"unknown precision {precision!r}; valid: fp32, fp16")
    return infer_shapes(model)
