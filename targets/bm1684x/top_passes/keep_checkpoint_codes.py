"""keep-checkpoint-codes: a pre-quantized checkpoint's Linears computed from its own codes, as top.A16MatMul.

model_deploy's W4/W8 modes quantize each MatMul weight again by min/max, which changes a calibrated
checkpoint's codes whenever a group does not span the whole code range. TPU-MLIR's A16MatMul takes
the codes, scales and zero points as they are (llm_convert writes it for GPTQ and AWQ); model_deploy
lowers it and leaves them alone.

Matched: a top.MatMul whose right operand is a top.Weight holding exactly the dequantized value of a
Linear in the network's codes file (graphopt/checkpoint_codes.py: each Linear carries the sha256 of
its fp32 [N, K] weight; model_transform renames and transposes weights, values it keeps). Every Linear
of the codes file must be found, else the pass fails naming it: a bmodel that re-quantized one would
otherwise pass for one that kept it.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from _mlir import bool_attr, name_of, producer, shape, to_a16_matmul

NAME = "keep-checkpoint-codes"


def run(block, none, context) -> dict:
    if not context.codes:
        return {"changed": 0, "summary": "no checkpoint codes", "skipped": []}
    from safetensors import safe_open

    with safe_open(context.codes, framework="np") as handle:
        linears = json.loads(handle.metadata()["linears"])
        by_digest = {info["digest"]: name for name, info in linears.items()}
        kept, skipped = {}, []
        for matmul in [o.operation for o in block.operations if o.operation.name == "top.MatMul"]:
            weight = producer(matmul.operands[1])
            if weight is None or weight.name != "top.Weight":
                continue
            dims = shape(weight.results[0])
            if len(dims) != 2:
                continue
            value = np.asarray(context.weights[name_of(weight)])  # (the weight file holds it flat)
            if value.dtype != np.float32 or value.size != dims[0] * dims[1]:
                continue
            value = value.reshape(dims)
            nk = value if bool_attr(matmul, "right_transpose") else value.T  # the Linear's [N, K]
            linear = by_digest.get(hashlib.sha256(np.ascontiguousarray(nk).tobytes()).hexdigest())
            if linear is None:
                skipped.append(f"{name_of(matmul)}: its weight is no checkpoint Linear's")
                continue
            if linear in kept:
                raise RuntimeError(f"{NAME}: {linear} is the weight of two MatMuls ({kept[linear]}, {name_of(matmul)}); "
                                   "each checkpoint Linear is one MatMul")
            kept[linear] = name_of(matmul)
            _replace(block, matmul, linear, linears[linear], handle, context.weights)
    missing = sorted(set(linears) - set(kept))
    if missing:
        raise RuntimeError(f"{NAME}: the checkpoint Linear(s) {', '.join(missing)} are not the weight of any top.MatMul "
                           "in model_transform's MLIR, so model_deploy would quantize them again instead of keeping "
                           "their codes")
    bits = sorted({linears[n]["bits"] for n in kept})
    return {"changed": len(kept), "summary": f"{len(kept)} Linear(s) keep the checkpoint's int{'/'.join(map(str, bits))} "
            "codes (A16MatMul)", "kept": sorted(kept), "skipped": skipped}


def _replace(block, matmul, linear: str, info: dict, handle, weights) -> None:
    """top.MatMul(x, W) -> top.A16MatMul(x, codes, scales, zeros, bias), right-transposed ([N, K] codes)."""
    expected = shape(matmul.results[0])
    parts = {f"{linear}.{part}": handle.get_tensor(f"{linear}.{part}") for part in ("qweight", "scales", "zeros")}
    fused = to_a16_matmul(block, matmul, weights, parts, info["group_size"], info["bits"])
    if shape(fused.results[0]) != expected:
        raise RuntimeError(f"{NAME}: {linear}: A16MatMul's output {shape(fused.results[0])} differs from the MatMul's")
