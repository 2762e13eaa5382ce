"""One exception type for every failure a user can cause; the CLI prints it as one line."""


class OnnxlrpError(Exception):
    """A user-facing error: ``str(err)`` is one line naming the file or node and the cause."""

    exit_code = 1


class UnsupportedOpError(OnnxlrpError):
    """Ops on the relevance path that have no backward emitter (exit code 2)."""

    exit_code = 2
