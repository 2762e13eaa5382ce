"""The op registry, filled: importing this package registers every op's facts and backward emitter."""

from . import elementwise, linear, magnitude, pooling, recurrent, reindex  # noqa: F401  (registers ops)
from .registry import OPS, OpSpec, data_input_indices, lookup, spec, unsupported_reason

__all__ = ["OPS", "OpSpec", "data_input_indices", "lookup", "spec", "unsupported_reason"]
