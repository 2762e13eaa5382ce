"""Reading untrusted ONNX models safely, and writing every output atomically.

Whatever the input, :func:`read_model` (and :func:`load_model`, without the digest) either returns a checked
:class:`onnx.ModelProto` or raises :class:`~onnxlrp.errors.OnnxlrpError` with one line naming the file (or
``model`` for a ``ModelProto`` given in memory) and the cause.  Files and in-memory models take one path through
the same checks; :func:`read_model` lists them.  Unknown operator domains are *not* refused there: the compiler
calls :func:`check_domains` for the nodes on the relevance path only.

Modules, by concern:

- :mod:`.load`: the load path (:func:`read_model`, :func:`load_model`);
- :mod:`.parse`: reading the file, parsing, the basic and version checks;
- :mod:`.tensors`: each tensor's dims against its data, the total bytes claimed;
- :mod:`.external`: external data references, validated before any byte is read;
- :mod:`.bombs`: ops whose constant inputs ask for huge tensors;
- :mod:`.structure`: names, producers, cycles, topological order, operator domains;
- :mod:`.checker`: onnx's checker and shape inference, in a child process with ``isolate``;
- :mod:`.digest`: the source sha256, streamed; :mod:`.wire`: a model's serialized size and its serialization
  piece by piece (also past protobuf's 2 GiB);
- :mod:`.atomic`: the one atomic writer and the one SIGTERM guard;
- :mod:`.save`: saving a model atomically, with external data past 2 GiB.

The message helpers are in :mod:`onnxlrp.messages`, the outer-scope walker in :mod:`onnxlrp.scopes`.
"""

from .atomic import sigterm_guard, umask_mode, write_atomic, write_files_atomic
from .bombs import MAX_BOMB_ELEMENTS, check_resource_bombs
from .digest import model_digest
from .load import load_model, read_model
from .parse import stat_path, stat_regular_file
from .save import EXTERNAL_DATA_THRESHOLD, ORT_MAX_IR_VERSION, clamp_ir_version, save_model_atomic
from .structure import KNOWN_DOMAINS, check_domains, check_structure
from .tensors import DEFAULT_MAX_BYTES, check_tensor_sizes

__all__ = [
    "DEFAULT_MAX_BYTES",
    "EXTERNAL_DATA_THRESHOLD",
    "KNOWN_DOMAINS",
    "MAX_BOMB_ELEMENTS",
    "ORT_MAX_IR_VERSION",
    "check_domains",
    "check_resource_bombs",
    "check_structure",
    "check_tensor_sizes",
    "clamp_ir_version",
    "load_model",
    "model_digest",
    "read_model",
    "save_model_atomic",
    "sigterm_guard",
    "stat_path",
    "stat_regular_file",
    "umask_mode",
    "write_atomic",
    "write_files_atomic",
]
