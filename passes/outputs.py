"""The two ends of the relevance sweep: the seed at the explained tensor and the declared outputs.

:class:`SeedAndOutputs` is a part of :class:`onnxlrp.passes.relevance.RelevancePass` (its base class): the seed is the
family's start on one-hot(target) at the explained tensor (at one position of a ``[batch, tokens, classes]`` output);
the outputs are the relevance of every explained input and ``relevance_at`` tensor, the family's exact companions,
``explained_class`` and the ``target`` input (:mod:`onnxlrp.contract`). The methods read the pass's attributes
(``b``, ``graph``, ``shapes``, ``family``, ``target``, ``sources``, ...).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxlrp.builder import node_reads
from onnxlrp.contract import CLASS_OUTPUT, TARGET_INPUT, exact_output, inner_output, relevance_output
from onnxlrp.errors import OnnxlrpError

from .diagnostics import batch_axis, input_dims
from .explained import data_inputs


class SeedAndOutputs:
    """The seed (:meth:`initial_relevance`) and the outputs (:meth:`finish`) of :class:`RelevancePass`."""

    def sequence_position(self) -> int | None:
        """The position explained along the sequence axis (axis 1) of a ``[batch, tokens, classes]`` output (a
        decoder's logits): ``position`` (negative: from the end), by default the last; None for other outputs."""
        rank = len(self.shapes.get(self.target) or [])
        if rank == 3:
            return -1 if self.position is None else self.position
        if self.position is not None:
            raise OnnxlrpError(f"--position needs an explained output shaped [batch, tokens, classes]; "
                               f"{self.target!r} has rank {rank}")
        return None

    def initial_relevance(self) -> tuple[str, str]:
        """The family's seed on one-hot(target) and the explained tensor; a target of -1 (any negative value) means
        the arg-max. With a sequence axis (:meth:`sequence_position`) the target and the seed are taken at one
        position and the other positions start with 0. Returns the seed and the explained value per sample."""
        b = self.b
        b.scope = "init"
        y = self.value(self.target)
        b.scope = "init"
        position = self.sequence_position()
        at_position = None
        if position is not None:
            tokens = b.op("Gather", [b.op("Shape", [y]), b.const(1, "one_i", np.int64)], "tokens")
            index = b.const(position, "position", np.int64)
            if position < 0:
                index = b.op("Add", [index, tokens], "position")
            at_position = b.op("Equal", [b.op("Range", [b.const(0, "zero_i", np.int64), tokens,
                                                         b.const(1, "one_i", np.int64)], "positions"), index])
            y = b.op("Gather", [y, index], "logits", axis=1)
        flat = b.op("Flatten", [y], "logits", axis=1)
        scores = flat if self.predicted_from is None else \
            b.op("Flatten", [self.value(self.predicted_from)], "scores", axis=1)
        predicted = b.op("ArgMax", [scores], "predicted", axis=1, keepdims=0)
        target = b.op("Where", [b.op("Less", [TARGET_INPUT, b.const(0, "zero_i", np.int64)]), predicted,
                                TARGET_INPUT], "target")
        b.op("Identity", [target], "class")
        self.class_tensor = b.nodes[-1].output[0]
        classes = b.op("Range", [b.const(0, "zero_i", np.int64), b.op("Gather", [b.op("Shape", [flat]),
                                                                             b.const(1, "one_i", np.int64)]),
                                 b.const(1, "one_i", np.int64)], "classes")
        hit = b.op("Cast", [b.op("Equal", [b.op("Unsqueeze", [target, b.const([1], "axes", np.int64)]), classes])],
                   "one_hot", to=TensorProto.FLOAT)
        self.one_hot = hit
        selected = b.op("Mul", [hit, flat], "selected")
        value = self.reduce("ReduceSum", selected, [1], keepdims=0)
        seed = b.op("Reshape", [self.family.seed(self, hit, selected), b.op("Shape", [y])], "R0")
        if at_position is not None:  # [batch, classes] -> [batch, tokens, classes], zero off the position
            mask = b.op("Cast", [b.op("Reshape", [at_position, b.const([1, -1, 1], "shape", np.int64)])], "at_position",
                        to=TensorProto.FLOAT)
            seed = b.op("Mul", [b.op("Unsqueeze", [seed, b.const([1], "axes", np.int64)]), mask], "R0")
        return seed, value

    def finish(self, relevance: dict[str, str]) -> list[str]:
        """Scale (the family's final step), name and declare the outputs: the relevance of every data input, of
        every ``relevance_at`` tensor (each finished on its own), and the family's exact companions of both
        (:meth:`Family.exact`); returns the names of the sources' relevance outputs, in the order of the
        sources."""
        b = self.b
        b.scope = "outputs"
        raw = {name: relevance.get(name) or self.zeros_like(name) for name in self.sources}
        relevance = self.family.finish(self, dict(raw))
        lookups = {lookup for token in self.token_inputs for lookup in token.lookups}
        named = [name for name in self.sources if name not in lookups]
        single = len(named) == 1  # token inputs are always named: relevance.<ids>
        names = []
        for name in named:
            r = relevance[name]
            if self.elem_type(name) != TensorProto.FLOAT:
                r = b.op("Cast", [r], "R", to=TensorProto.FLOAT)
            label = self.label(name)
            out = relevance_output(label, single)
            vi = self.source_value_info(label)
            shape = None if vi is None or not vi.type.tensor_type.HasField("shape") else \
                [d.dim_param or d.dim_value or None for d in vi.type.tensor_type.shape.dim]
            names.append(self.declare_output(out, r, shape))
            exact = self.family.exact(self, raw[name])
            if exact is not None:
                self.declare_output(exact_output(out), exact, shape, self.algebra.dtype)
        for token in self.token_inputs:
            names.append(self.token_relevance(token, relevance))
        batch_name = self.batch_dim()
        for name in self.relevance_at:
            r = self.inner_relevance.get(name) or self.zeros_like(self.value(name))
            shape = [d if isinstance(d, int) else None for d in self.shapes.get(name) or []] or None
            if shape:
                shape[0] = batch_name
            self.declare_output(inner_output(name), self.family.finish(self, {name: r})[name], shape)
            exact = self.family.exact(self, r)
            if exact is not None:
                self.declare_output(exact_output(inner_output(name)), exact, shape, self.algebra.dtype)
        b.nodes.append(helper.make_node("Identity", [self.class_tensor], [CLASS_OUTPUT], name=b.fresh(CLASS_OUTPUT)))
        batch = self.batch_dim()
        self.graph.output.append(helper.make_tensor_value_info(CLASS_OUTPUT, TensorProto.INT64, [batch]))
        # a plain required input: every runtime lists and accepts it (an initializer-backed default is invisible to
        # onnxruntime-web and -node, and onnxruntime warns about it); -1 means "the predicted class"
        self.graph.input.append(helper.make_tensor_value_info(TARGET_INPUT, TensorProto.INT64, [batch]))
        b.drop_unread({o.name for o in self.graph.output})
        b.nodes = activation_work_first(b.nodes, TARGET_INPUT)
        b.commit()
        return names

    def declare_output(self, name: str, tensor: str, shape, elem_type: int = TensorProto.FLOAT) -> str:
        self.b.nodes.append(helper.make_node("Identity", [tensor], [name], name=self.b.fresh(name)))
        self.graph.output.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def token_relevance(self, token, relevance: dict[str, str | None]) -> str:
        """``relevance.<input>``: the relevance of the token input's lookups summed over the hidden axis, shaped like
        the ids (:mod:`onnxlrp.passes.tokens`)."""
        b = self.b
        vi = next(v for v in self.graph.input if v.name == token.name)
        parts = [self.reduce("ReduceSum", relevance[t], [-1], keepdims=0, hint="R_tokens")
                 for t in token.lookups if relevance.get(t) is not None]
        if parts:
            r = b.op("Reshape", [self.add_relevance(parts), b.op("Shape", [token.name])], "R")
        else:
            r = b.op("ConstantOfShape", [b.op("Shape", [token.name])], "zeros")
        shape = [d.dim_param or d.dim_value or None for d in vi.type.tensor_type.shape.dim]
        return self.declare_output(relevance_output(token.name, False), r, shape)

    def batch_dim(self):
        """The batch of ``target`` and ``explained_class``: axis 0 of the explained tensor (the seed takes one row
        per sample, and a time-major sequence model reads ``[T, B, ...]``), its size when static, else its symbolic
        name; else the name of the first data (or token) input's batch axis (:func:`batch_axis`: ``[2, 'batch',
        128]`` has it on axis 1), or "batch"."""
        shape = self.shapes.get(self.target)
        if shape and isinstance(shape[0], int):
            return shape[0]
        declared = {vi.name: vi for vi in list(self.graph.value_info) + list(self.graph.output)}
        info = declared.get(self.target)
        if info is not None and info.type.tensor_type.shape.dim and info.type.tensor_type.shape.dim[0].dim_param:
            return info.type.tensor_type.shape.dim[0].dim_param
        inits = {t.name for t in self.graph.initializer}
        first = (data_inputs(self.graph) or [v for v in self.graph.input if v.name not in inits])[0]
        dims = input_dims(first)
        axis, _ = batch_axis(dims)
        return dims[axis] if axis is not None and dims[axis] != "?" else "batch"


def activation_work_first(nodes: list[onnx.NodeProto], relevance_source: str) -> list[onnx.NodeProto]:
    """The emitted nodes that read only forward values (stabilized denominators, gates, casts) before those that
    carry relevance (everything downstream of ``relevance_source``), each group in emission order; the first group
    never reads the second, so the order stays topological.

    onnxruntime's default execution order is a depth-first search from the graph outputs that enters a node's
    inputs from the highest node index down. In this order it enters a relevance node's relevance input first, so
    an activation-only node runs just before the node that reads it, not during the forward pass, where its output
    would stay alive through the whole backward pass (ResNet50 epsilon at batch 16: peak 2463 -> 1662 MiB)."""
    carrying = {relevance_source}
    first, second = [], []
    for node in nodes:
        if any(i in carrying for i in node_reads(node)):
            carrying.update(node.output)
            second.append(node)
        else:
            first.append(node)
    return first + second
