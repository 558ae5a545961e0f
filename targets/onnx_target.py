"""The generic `onnx` target: the rewritten networks as ONNX files, nothing after that.

Its pipelines are the reference order every hardware target starts from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    fx_pipeline: tuple[str, ...]
    onnx_pipeline: tuple[str, ...]


FX_PIPELINE = (
    "strip-trace-noise",    # first: asserts and no-op casts would hide dataflow from matchers
    "views-to-reshapes",    # before any rewrite that changes a tensor's producer (and so its strides)
    "attention-canonical",  # K/V in kv-heads: kv-layout and concat-cache rely on it
    "rope-table",
    "fixed-mask",
    "kv-layout",            # before concat-cache: exposes the new token's K/V, not the concatenation
    "concat-cache",         # block_cache only; widens the mask input fixed-mask wired up
    "attention-lower",      # last rewrite: ONNX ≤ 17 has no attention op
    "onnx-legalize",        # exporter-facing renames, after every pass that matches on ATen ops
)

ONNX_PIPELINE = (
    "onnx-simplify",
    "linear-weight-layout",  # after onnx-simplify, which would fold the Transpose it restores
    "onnx-tidy",
)

ONNX_TARGET = Target("onnx", "per-network ONNX files + manifest.json", FX_PIPELINE, ONNX_PIPELINE)
