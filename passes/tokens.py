"""Token inputs: integer ids whose use is a lookup in an embedding table.

An integer graph input (``input_ids``) carries no relevance itself; its relevance is that of the vectors it selects.
Every ``Gather(table, ids)`` along axis 0 of a constant float table (``[vocab, hidden]``), reached from the input
through ops that only reshape or cast the ids, is a *lookup*: the sweep starts its relevance path at the lookup's
output (the ``[..., hidden]`` embeddings), and the input's relevance is the relevance of its lookups summed over
the hidden axis, reshaped like the ids (``[batch, tokens]``). Position and token-type tables that are not looked up
by a token input are constants whose share stays with them; an attention mask carries none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

INTEGER_TYPES = (TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT64,
                 TensorProto.UINT32, TensorProto.UINT16, TensorProto.UINT8)
REINDEX_IDS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Identity"}


@dataclass
class TokenInput:
    """An integer graph input and the outputs of its embedding lookups."""

    name: str
    lookups: list[str]


def token_inputs(graph: onnx.GraphProto, consumers: dict, constants: dict) -> list[TokenInput]:
    """The integer graph inputs that index an embedding table, with their lookups (see the module docstring)."""
    inits = {t.name for t in graph.initializer}
    found = []
    for vi in graph.input:
        if vi.name in inits or vi.type.tensor_type.elem_type not in INTEGER_TYPES:
            continue
        lookups, frontier, seen = [], [vi.name], {vi.name}
        while frontier:
            tensor = frontier.pop()
            for node, index in consumers.get(tensor, []):
                if node.op_type in REINDEX_IDS and index == 0 and node.output[0] not in seen:
                    seen.add(node.output[0])
                    frontier.append(node.output[0])
                elif node.op_type == "Gather" and index == 1 and is_table(constants.get(node.input[0])) and \
                        gather_axis(node) == 0:
                    lookups.append(node.output[0])
        if lookups:
            found.append(TokenInput(vi.name, lookups))
    return found


def is_table(value) -> bool:
    return value is not None and value.ndim == 2 and np.issubdtype(value.dtype, np.floating)


def gather_axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)
