"""onnxlrp: compile an ONNX model into one that also computes LRP relevance.

``onnxlrp.compile(model_or_path, rule=...) -> onnx.ModelProto`` and ``onnxlrp.Explainer(model_or_path, rule=...)``.
"""

__version__ = "0.1.0"
__all__ = ["compile", "inspect", "Explainer", "OnnxlrpError"]


def __getattr__(name):  # imported on first use, so that `onnxlrp.errors` stays light for every module
    if name in ("compile", "inspect"):
        from . import compiler

        return getattr(compiler, name)
    if name == "Explainer":
        from .runtime import Explainer

        return Explainer
    if name == "OnnxlrpError":
        from .errors import OnnxlrpError

        return OnnxlrpError
    raise AttributeError(name)
