"""Small ONNX models and sample data bundled with onnxlrp (installed as ``onnxlrp.models``)."""
