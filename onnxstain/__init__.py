"""onnxstain: stain and lock pre-trained vision models in ONNX files, without retraining."""

__version__ = "0.1.0"
