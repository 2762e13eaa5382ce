"""The op registry, filled: importing this package registers every op's facts and backward emitter."""

from . import (  # noqa: F401  (each module registers its ops)
    attention,
    elementwise,
    extremum,
    gates,
    indexing,
    linear,
    magnitude,
    normalization,
    pooling,
    quantized,
    recurrent,
    reindex,
    resize,
)
from .registry import OPS, OpSpec, data_input_indices, data_output_indices, lookup, spec, unsupported_reason

__all__ = ["OPS", "OpSpec", "data_input_indices", "data_output_indices", "lookup", "spec", "unsupported_reason"]
