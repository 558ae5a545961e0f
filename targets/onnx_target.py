"""The generic `onnx` target: the rewritten networks as ONNX files, nothing after that.

Its pipelines are the reference order every hardware target starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class TargetBuild(Protocol):
    """What a hardware target does after the ONNX networks are written (vendor compiler, checks)."""

    def validate(self, source, options: dict[str, Any]) -> None:
        """Raise GraphoptError for anything wrong with the options or the set-up, before any work."""

    def build(self, folder: Path, manifest: dict, source, options: dict[str, Any], check: bool,
              show_progress: bool) -> "TargetResult": ...


class TargetResult(Protocol):
    ok: bool
    seconds: dict[str, float]  # per stage, merged into the run's stage times

    def report_lines(self) -> list[str]: ...

    def to_json(self) -> dict: ...


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    fx_pipeline: tuple[str, ...]
    onnx_pipeline: tuple[str, ...]
    build: TargetBuild | None = None  # None: the ONNX files are the product


FX_PIPELINE = (
    "strip-trace-noise",    # first: asserts and no-op casts would hide dataflow from matchers
    "views-to-reshapes",    # before any rewrite that changes a tensor's producer (and so its strides)
    "attention-canonical",  # K/V in kv-heads: kv-layout and concat-cache rely on it
    "cross-kv-inputs",      # encoder-decoder blocks; before fixed-mask and kv-layout, which tell
                            # self- from cross-attention by the mark it leaves
    "rope-table",
    "fixed-mask",
    "encoder-padding-mask", # the encoder's counterpart of fixed-mask: both give attention-lower
                            # additive masks
    "clamp-mask",           # after both: the mask inputs are final; a runtime's fp16 mask bits stay finite in bf16
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
