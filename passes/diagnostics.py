"""What the relevance pass says when a model needs something from the user: the batch axis of an input (for
``--input-shape`` hints) and the one-line summary of the nodes on the relevance path that have no rule."""

from __future__ import annotations

import re

import onnx

from onnxlrp.messages import quote

#: Names of a batch axis in ``dim_param`` (exporters write "batch", "batch_size", "N", "bs", ...).
BATCH_NAMES = re.compile(r"batch|^(n|b|bs|bsz|none)$", re.IGNORECASE)


def input_dims(vi: onnx.ValueInfoProto) -> list:
    """An input's dims: the size of a fixed one, the name of an open one, "?" for an open one without a name."""
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in vi.type.tensor_type.shape.dim]


def batch_axis(dims: list) -> tuple[int | None, str]:
    """The batch axis of an input's dims (ints for fixed sizes, names or "?" for open ones), and how it was found:
    the first open axis whose name says batch (:data:`BATCH_NAMES`), else axis 0 when it is open, else none."""
    for i, d in enumerate(dims):
        if isinstance(d, str) and BATCH_NAMES.search(d):
            return i, f"by its name {quote(d)}"
    if dims and not isinstance(dims[0], int):
        return 0, "the first axis, open, as exporters write the batch"
    return None, "none is named like a batch and axis 0 is fixed"


#: Longest summary of the unsupported nodes in an error line (``onnxlrp inspect`` lists every node).
MAX_SUMMARY_CHARS = 400
#: Node names listed per op type in that summary, and the longest name and reason shown.
NAMES_PER_OP, MAX_NAME, MAX_REASON = 3, 40, 120


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unsupported_summary(problems: list[tuple[onnx.NodeProto, str]]) -> str:
    """The unsupported nodes grouped by op type, most frequent first: ``LSTM x2 (lstm_1, lstm_2: reason); ...``
    with a few names per type, cut at about :data:`MAX_SUMMARY_CHARS` characters (the rest counted)."""
    groups: dict[str, list[tuple[onnx.NodeProto, str]]] = {}
    for node, reason in problems:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        groups.setdefault(_cut(op, MAX_NAME), []).append((node, reason))
    parts = []  # (text, node count), most frequent op type first; ties keep the graph order
    for op, members in sorted(groups.items(), key=lambda item: -len(item[1])):
        names = [_cut(node.name or node.output[0], MAX_NAME) for node, _ in members[:NAMES_PER_OP]]
        reasons = list(dict.fromkeys(reason for _, reason in members))
        reason = _cut(reasons[0], MAX_REASON) + (" (and other reasons)" if len(reasons) > 1 else "")
        more = ", ..." if len(members) > NAMES_PER_OP else ""
        parts.append((f"{op} x{len(members)} ({', '.join(names)}{more}: {reason})", len(members)))
    shown: list[str] = []
    for part, _ in parts:
        if shown and len("; ".join(shown + [part])) > MAX_SUMMARY_CHARS:
            break
        shown.append(_cut(part, MAX_SUMMARY_CHARS))
    text = "; ".join(shown)
    left = parts[len(shown):]
    if left:
        text += f"; and {len(left)} more op type(s), {sum(count for _, count in left)} node(s)"
    return text + "; onnxlrp inspect lists every node"
