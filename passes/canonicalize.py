"""Canonicalization before the relevance pass.

1. Upgrade the default-domain opset to at least 13 (the version converter).
2. Turn Constant nodes into initializers; initializers listed as graph inputs (IR < 4) become plain constants.
3. Constant-fold weight subgraphs (nodes whose inputs are all constant) so every weight is an initializer,
   refusing any fold that would allocate more than :data:`MAX_FOLD_ELEMENTS`.
4. Drop Dropout and Identity.
5. Fold BatchNormalization into the preceding Conv/Gemm/MatMul; any other BatchNormalization becomes a
   per-channel ``Mul`` + ``Add`` by constants.
6. Infer shapes, with user-given input shapes where the model leaves spatial dims open.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference, version_converter
from onnx.reference import ReferenceEvaluator

from onnxlrp.errors import OnnxlrpError

MIN_OPSET = 13
MAX_FOLD_ELEMENTS = 1 << 28


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
        return version_converter.convert_version(model, wanted)
    except Exception as err:  # the converter raises many types, natively included
        raise OnnxlrpError(f"cannot upgrade the model from opset {current} to {wanted}: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


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
    folded_any = False
    kept = []
    for node in graph.node:
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


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def drop_identities(graph: onnx.GraphProto) -> None:
    """Remove Identity and (inference-mode) Dropout, rewiring readers to their input."""
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        is_noop = node.op_type in ("Identity", "Dropout") and node.domain in ("", "ai.onnx")
        dropout_mask_used = node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]
        if is_noop and not dropout_mask_used and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def fold_batchnorm(graph: onnx.GraphProto, shapes: dict[str, list]) -> None:
    """Fold BatchNormalization into the linear producer, else rewrite it as a per-channel affine map."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}

    def sole_reader(tensor: str) -> bool:
        return readers.get(tensor) == 1 and tensor not in outputs

    kept = []
    for node in graph.node:
        if node.op_type != "BatchNormalization" or any(n not in inits for n in node.input[1:5]):
            kept.append(node)
            continue
        scale, beta, mean, var = (_array(inits, n) for n in node.input[1:5])
        s = scale / np.sqrt(var + next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5))
        shift = beta - mean * s
        src = producer.get(node.input[0])
        if src is not None and sole_reader(node.input[0]) and \
                _fold_into(src, s, shift, graph, inits, producer, sole_reader):
            src.output[0] = node.output[0]
            continue
        channel_shape = (-1,) + (1,) * max(len(shapes.get(node.input[0]) or [0, 0]) - 2, 0)
        mul_c = _add_init(graph, inits, f"{node.name}/bn_scale", s.reshape(channel_shape))
        add_c = _add_init(graph, inits, f"{node.name}/bn_shift", shift.reshape(channel_shape))
        scaled = f"{node.output[0]}/bn_scaled"
        kept.append(helper.make_node("Mul", [node.input[0], mul_c], [scaled], name=f"{node.name}/bn_mul"))
        kept.append(helper.make_node("Add", [scaled, add_c], [node.output[0]], name=f"{node.name}/bn_add"))
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)


def _add_init(graph, inits, name, value) -> str:
    while name in inits:
        name += "_"
    tensor = numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
    graph.initializer.append(tensor)
    inits[name] = tensor
    return name


def _array(inits, name) -> np.ndarray:
    return numpy_helper.to_array(inits[name]).astype(np.float64)


def _fold_into(src: onnx.NodeProto, s: np.ndarray, shift: np.ndarray, graph, inits, producer, sole_reader) -> bool:
    """Scale the output channels of a Conv / Gemm / MatMul(+Add) producer by ``s`` and shift them by ``shift``."""
    has_bias = len(src.input) > 2 and bool(src.input[2])
    if src.op_type == "Conv" and src.input[1] in inits and (not has_bias or src.input[2] in inits):
        w = _array(inits, src.input[1])
        bias = _array(inits, src.input[2]) if has_bias else np.zeros(w.shape[0])
        src.input[1] = _add_init(graph, inits, f"{src.input[1]}/bn_folded", w * s.reshape(-1, *([1] * (w.ndim - 1))))
    elif src.op_type == "Gemm" and src.input[1] in inits and (not has_bias or src.input[2] in inits):
        attrs = {a.name: helper.get_attribute_value(a) for a in src.attribute}
        if attrs.get("transA", 0):
            return False
        w = _array(inits, src.input[1]) * attrs.get("alpha", 1.0)
        w = w if attrs.get("transB", 0) else w.T  # [out, in]
        bias = np.zeros(w.shape[0]) if not has_bias else \
            np.broadcast_to(_array(inits, src.input[2]).reshape(-1) * attrs.get("beta", 1.0), (w.shape[0],))
        del src.attribute[:]
        src.attribute.append(helper.make_attribute("transB", 1))
        src.input[1] = _add_init(graph, inits, f"{src.input[1]}/bn_folded", w * s[:, None])
    elif src.op_type == "Add":  # MatMul(x, W) + b
        const = [i for i, n in enumerate(src.input) if n in inits]
        matmul = producer.get(src.input[1 - const[0]]) if len(const) == 1 else None
        if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in inits or \
                not sole_reader(matmul.output[0]):
            return False
        w, bias = _array(inits, matmul.input[1]), _array(inits, src.input[const[0]])
        if w.ndim != 2 or bias.size != w.shape[1]:
            return False
        matmul.input[1] = _add_init(graph, inits, f"{matmul.input[1]}/bn_folded", w * s[None, :])
        src.input[const[0]] = _add_init(graph, inits, f"{src.name}/bn_folded_bias", bias.reshape(-1) * s + shift)
        return True
    else:
        return False
    bias_name = _add_init(graph, inits, f"{src.name}/bn_folded_bias", bias * s + shift)
    if has_bias:
        src.input[2] = bias_name
    else:
        src.input.append(bias_name)
    return True


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
            del vi.type.tensor_type.shape.dim[:]
            for i, d in enumerate(wanted):
                dim = vi.type.tensor_type.shape.dim.add()
                if i == 0 and d <= 0:
                    dim.dim_param = "batch"
                else:
                    dim.dim_value = d


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list]]:
    """Strict shape inference: a model whose shapes contradict each other is refused here, not at run time."""
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as err:
        raise OnnxlrpError(f"the model is not valid: {str(err).strip().splitlines()[0]}") from err
    shapes: dict[str, list] = {}
    graph = inferred.graph
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    return inferred, shapes


def canonicalize(model: onnx.ModelProto, *, opset: int | None = None,
                 input_shapes: dict[str, list[int]] | None = None) -> tuple[onnx.ModelProto, dict[str, list]]:
    """Return the canonical model and the static shape of every tensor (None for unknown dims)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    ir_version = model.ir_version
    constants_to_initializers(model.graph, ir_version)
    model = upgrade_opset(model, opset)
    model.ir_version = max(ir_version, 7)
    graph = model.graph
    name_nodes(graph)
    constants_to_initializers(graph, ir_version)
    fold_constants(graph, model.opset_import)
    drop_identities(graph)
    set_input_shapes(graph, input_shapes)
    if any(n.op_type == "BatchNormalization" for n in graph.node):
        fold_batchnorm(graph, infer_shapes(model)[1])
    return infer_shapes(model)
