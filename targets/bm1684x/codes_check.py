"""The checkpoint's codes read back from the compiled bmodel: the proof that keep-checkpoint-codes' A16MatMuls
reached the chip with the checkpoint's own numbers, not a re-quantization of them.

model_deploy stores an A16MatMul's codes as they are ([N, K/2] bytes for 4 bits) and lays its scales and zero
points out per NPU lane: [64, N/64, G], lane l holding output channels l, l+64, ... (measured on TPU-MLIR
1.30.2: the final MLIR's `tpu.A16MatMul.scale` is tensor<64xN/64xGxf16>). Scales are stored in the mode's
16-bit float, so they read back exactly only where the mode is the checkpoint's own float (W4F16 for float16
scales); the check compares them in the mode's float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphopt.checkpoint_codes import read_codes

NPU_LANES = 64  # BM1684X


def _per_lane(array: np.ndarray) -> np.ndarray:
    n, g = array.shape
    return np.ascontiguousarray(array.reshape(n // NPU_LANES, NPU_LANES, g).transpose(1, 0, 2))


def missing_codes(bmodel: Path, codes: Path, half: str) -> list[str]:
    """What of `codes` (a net's codes file) the compiled `bmodel` does not hold, as `initializer: part`;
    `half`: the mode's 16-bit float (F16 or BF16), which the scales are stored in."""
    import torch

    data = bmodel.read_bytes()
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}[half]
    missing = []
    for name, linear in read_codes(codes).items():
        scales = torch.from_numpy(linear["scales"]).to(dtype).view(torch.int16).numpy()
        parts = {"codes": linear["qweight"]}
        if scales.shape[0] % NPU_LANES == 0:  # (other widths are padded per lane: their codes are checked)
            parts.update({"scales": _per_lane(scales), "zero points": _per_lane(linear["zeros"])})
        missing += [f"{name}: {part}" for part, array in parts.items() if np.ascontiguousarray(array).tobytes() not in data]
    return missing
