"""onnxlrp: compile an ONNX model into one that also computes LRP relevance."""

__version__ = "0.1.0"
