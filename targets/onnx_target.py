"""The generic `onnx` target: the rewritten networks as ONNX files, nothing after that."""

from __future__ import annotations

from graphopt.targets.base import Target
from graphopt.targets.pipeline import FX_PIPELINE, ONNX_PIPELINE

ONNX_TARGET = Target("onnx", "per-network ONNX files + manifest.json", FX_PIPELINE, ONNX_PIPELINE)
