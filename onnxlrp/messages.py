"""The pieces every one-line error message is built from, in one place.

Paths, model-provided names and the text of foreign exceptions reach the terminal only through these helpers, which
pass everything through :func:`~onnxlrp.naming.escape_terminal` (control characters and escape sequences become
inert text) and cut what could be huge.
"""

from __future__ import annotations

import os

from onnx import NodeProto

from onnxlrp.naming import escape_terminal

__all__ = ["explained_line", "first_line", "gib", "node_label", "prefix", "quote", "reason", "show"]

#: Longest model-provided name shown in a message; longer names are cut and end in "...".
MAX_NAME_CHARS = 200
#: Longest piece of a foreign exception's text shown in a message.
MAX_DETAIL_CHARS = 500


def show(path: str | os.PathLike[str]) -> str:
    """A path as it may be printed."""
    return escape_terminal(os.fspath(path))


def quote(name: str) -> str:
    """A model-provided name, quoted and made inert for the terminal (and cut when huge)."""
    text = escape_terminal(name)
    if len(text) > MAX_NAME_CHARS:
        text = text[:MAX_NAME_CHARS] + "..."
    return f"'{text}'"


def first_line(err: BaseException) -> str:
    """The first line of an exception's text (its type name when it has none), escaped and cut."""
    text = str(err).strip() or type(err).__name__
    return escape_terminal(text.splitlines()[0][:MAX_DETAIL_CHARS])


def reason(err: OSError) -> str:
    """What the operating system said (``strerror``), escaped."""
    return escape_terminal(err.strerror or str(err))


def gib(n: int) -> str:
    """A byte count in GiB, MiB or bytes."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def prefix(source: str | os.PathLike[str] | None) -> str:
    """``"FILE: "`` for a model read from a file, ``"model: "`` for one given in memory."""
    return f"{show(source)}: " if source is not None else "model: "


def node_label(node: NodeProto) -> str:
    """``node 'NAME' (OP)``, or ``OP node`` for an unnamed node."""
    if node.name:
        return f"node {quote(node.name)} ({escape_terminal(node.op_type)[:100]})"
    return f"{escape_terminal(node.op_type)[:100]} node"


def explained_line(tensor: str, why: str) -> str:
    """``explained tensor: NAME, WHAT IT IS (WHY)``, as compile, inspect and explain print it."""
    return f"explained tensor: {escape_terminal(tensor)}" + (f", {escape_terminal(why)}" if why else "")
