"""The reference pass pipelines every target starts from, in order, with why each pass stands where it does.

The order rules are also the passes' `requires`/`ensures`, which the pass manager checks before it
runs a pipeline (and tests/test_pipelines.py for every built-in target); the comments say why.
"""

from __future__ import annotations

FX_PIPELINE = (
    "strip-trace-noise",    # first: asserts and no-op casts would hide dataflow from matchers
    "views-to-reshapes",    # before any rewrite that changes a tensor's producer (and so its strides)
    "attention-explicit",   # written-out attention made one call, which attention-canonical then reads
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
    "sink-head-transpose",  # block_cache only: RoPE before the head transpose, the new K in the cache's layout
    "attention-lower",      # last rewrite: ONNX ≤ 17 has no attention op
    "export-legalize",      # exporter-facing renames, after every pass that matches on ATen ops
)

ONNX_PIPELINE = (
    "onnx-simplify",
    "onnx-tidy",             # last: pins the IR and opset, and checks the Linear layout W4/W8 quantization needs
)
