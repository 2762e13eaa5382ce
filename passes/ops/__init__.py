"""The op registry, filled: importing this package registers every op's facts and backward emitter."""

# each module registers its ops
from . import attention, elementwise, indexing, interim_norms_gates, linear, magnitude, pooling, recurrent, reindex  # noqa: F401
from .registry import OPS, OpSpec, data_input_indices, lookup, spec, unsupported_reason

__all__ = ["OPS", "OpSpec", "data_input_indices", "lookup", "spec", "unsupported_reason"]
