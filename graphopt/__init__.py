"""graphopt: trace a PyTorch / Hugging Face model, rewrite the traced graph with passes,
emit one ONNX file per network, and hand those files to an accelerator toolchain."""

__version__ = "0.1.0"
