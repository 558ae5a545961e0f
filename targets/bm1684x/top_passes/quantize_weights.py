"""quantize-weights: each Linear's weight quantized to int4 here, exactly as model_deploy would, as top.A16MatMul.

In a W4 mode (W4BF16, W4F16) model_deploy lowers a top.MatMul that reads a 2-D weight to tpu.A16MatMul and then
quantizes that weight element by element (TPU-MLIR's A16MatMulAdjust): of an 8B block's 10.5 s lowering, 8 s.
Given top.A16MatMul with the codes, scales and zero points (as keep-checkpoint-codes writes a GPTQ checkpoint's),
the lowering only converts the scales to the half type: 1.4 s. This pass does the quantization on whole arrays
with the same float32 arithmetic, so the bmodel is the same bytes (tests/test_bm1684x.py holds it to that):

    scale = max(max - min, 1e-5) / 15, zero = clamp(-round(min / scale), 0, 15),
    code = clamp(round(w / scale) + zero, 0, 15)     per group along K (int4_groups.py)

Matched as TPU-MLIR's W4A16MatMulPreparePattern picks MatMuls for A16MatMul: the weight is [K, N] float32 with
N a multiple of the chip's 64 lanes (others TPU-MLIR lowers in the float mode, or splits), and K must split into
groups. A MatMul with an attribute off its default, or a weight with other readers, is left to model_deploy
(which quantizes it the same way, only slower). The float32 weight leaves the weights file with its MatMul.
Each weight's result is checked on two output channels against the same arithmetic done another way.
"""

from __future__ import annotations

import numpy as np
from mlir.ir import F32Type, RankedTensorType

from _mlir import bool_attr, int_attr, name_of, producer, shape, to_a16_matmul
from int4_groups import Buffers, quantize, quantize_rows

NAME = "quantize-weights"
BITS = 4
NPU_NUM = 64  # BM1684X's lanes: A16MatMul's output channels come in multiples of them
DEFAULTS = {"do_relu": False, "hdim_is_batch": False, "is_lora": False, "left_transpose": False,
            "output_transpose": False, "right_transpose": False}


def why_not(matmul, weight, group: int) -> str:
    """"" if model_deploy would make `matmul`, which reads top.Weight `weight`, an int4 A16MatMul; else why not."""
    dims = shape(weight.results[0])
    if len(dims) != 2:
        return f"its weight is {len(dims)}-D"
    if not F32Type.isinstance(RankedTensorType(weight.results[0].type).element_type):
        return "its weight is not float32"
    readers = len(list(weight.results[0].uses))
    if readers != 1:
        return f"its weight has {readers} readers"
    off = [name for name, default in DEFAULTS.items() if bool_attr(matmul, name) != default]
    attributes = matmul.attributes
    if "q_group_size" in attributes and int_attr(matmul, "q_group_size") != 0:
        off.append("q_group_size")
    if "dq_type" in attributes and str(attributes["dq_type"]) != '"NONE"':
        off.append("dq_type")
    if off:
        return f"attributes off their defaults ({', '.join(off)})"
    if dims[1] % NPU_NUM:
        return f"its {dims[1]} output channels are not a multiple of {NPU_NUM}"
    if dims[0] % group:
        return f"its K {dims[0]} does not split into groups of {group}"
    return ""


def _check(name: str, weight_kn: np.ndarray, group: int, result) -> None:
    """The first and last output channel of `result` as int4_groups.quantize_rows computes them (rounding in double)."""
    rows = sorted({0, weight_kn.shape[1] - 1})
    for part, got, expected in zip(("codes", "scales", "zero points"), result, quantize_rows(weight_kn, group, rows)):
        if not np.array_equal(got[rows], expected):
            raise RuntimeError(f"{NAME}: {name}'s {part} for output channels {rows} are not what TPU-MLIR's arithmetic "
                               "gives computed row by row (int4_groups.quantize_rows)")


def run(block, none, context) -> dict:
    group = context.q_group_size
    if context.weight_bits != BITS or not group:
        return {"changed": 0, "summary": f"not an int{BITS} mode with groups", "skipped": []}
    changed, skipped, buffers = 0, [], Buffers()
    for matmul in [o.operation for o in block.operations if o.operation.name == "top.MatMul"]:
        weight = producer(matmul.operands[1])
        if weight is None or weight.name != "top.Weight":  # attention's MatMuls read two activations: no candidates
            continue
        why = why_not(matmul, weight, group)
        if why:
            skipped.append(f"{name_of(matmul)}: {why}")
            continue
        dims = shape(weight.results[0])
        value = context.weights.take(name_of(weight))  # (the weight file holds it flat)
        if value.dtype != np.float32 or value.size != dims[0] * dims[1]:
            raise RuntimeError(f"{NAME}: {name_of(weight)} holds {value.size} {value.dtype} values; "
                               f"its type says {dims} f32")
        codes, scale, zero = quantize(value.reshape(dims), group, buffers)
        _check(name_of(weight), value.reshape(dims), group, (codes, scale, zero))
        named = name_of(matmul)
        to_a16_matmul(block, matmul, context.weights,
                      {f"{named}_codes": codes, f"{named}_scale": scale, f"{named}_zero": zero}, group, BITS)
        weight.erase()  # (its only reader is gone, and the file no longer holds it)
        changed += 1
    return {"changed": changed, "summary": f"{changed} Linear weight(s) quantized to int{BITS} in groups of {group}",
            "skipped": skipped}
