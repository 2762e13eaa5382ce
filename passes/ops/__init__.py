"""The op registry, filled: importing this package registers every op's facts and backward emitter."""

from . import elementwise, gates, linear, normalization, pooling, reindex  # noqa: F401  (each module registers its ops)
from .registry import OPS, OpSpec, data_input_indices, lookup, spec, unsupported_reason

__all__ = ["OPS", "OpSpec", "data_input_indices", "lookup", "spec", "unsupported_reason"]
