"""Pre-quantized checkpoints written for the tests, from a seeded tiny model, in each format's documented packing.

The packers here are written from the formats' documentation and reference loops (AutoGPTQ's and
AutoAWQ's `pack`), independently of graphopt's readers (graphopt/models/quantized.py), and
compressed-tensors checkpoints are packed by the compressed-tensors library itself. The codes are
those of a clipped round-to-nearest: each group's scale is widened by a random factor, so a group
does not span the whole code range and re-quantizing the dequantized weights (what TPU-MLIR's W4
does by min/max) would give other codes — what "kept bit for bit" has to tell apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ WQLinear_GEMM: word nibble i holds column order[i] of its run
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Quantized:
    codes: np.ndarray  # uint8 [N, K]
    scales: torch.Tensor  # [N, G]
    zeros: np.ndarray  # int [N, G]


def quantize(weight: torch.Tensor, bits: int, group: int, symmetric: bool, generator: torch.Generator,
             scale_dtype=torch.float16) -> Quantized:
    n, k = weight.shape
    levels = (1 << bits) - 1
    groups = weight.double().reshape(n, k // group, group)
    widen = 1.0 + 0.5 * torch.rand(n, k // group, 1, generator=generator, dtype=torch.float64)
    if symmetric:
        scale = groups.abs().amax(-1, keepdim=True) * widen / (levels // 2)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low) * widen / levels
        # (never 0: GPTQ v1 stores zero - 1, and AutoGPTQ packs a -1 into the neighbouring codes)
        zero = torch.round(-low / scale + (levels - (high - low) / scale) / 2).clamp(1, levels)
    scale = scale.to(scale_dtype)
    codes = torch.clamp(torch.round(groups / scale.double()) + zero, 0, levels)
    return Quantized(codes.reshape(n, k).to(torch.uint8).numpy(), scale[..., 0],
                     zero[..., 0].to(torch.int64).numpy())


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's pack: rows 8i..8i+7 (4 bits) into row i of int32, the j-th at bit bits*j."""
    per = 32 // bits
    values = values.astype(np.uint64)
    out = np.zeros((values.shape[0] // per, values.shape[1]), np.uint64)
    for j in range(per):
        out |= values[j::per] << np.uint64(bits * j)
    return out.astype(np.uint32).view(np.int32)


def _pack_columns(values: np.ndarray, bits: int, order=None) -> np.ndarray:
    per = 32 // bits
    order = order or tuple(range(per))
    values = values.astype(np.uint64)
    out = np.zeros((values.shape[0], values.shape[1] // per), np.uint64)
    for j in range(per):
        out |= values[:, order[j]::per] << np.uint64(bits * j)
    return out.astype(np.uint32).view(np.int32)


def gptq_tensors(q: Quantized, bits: int, group: int, v1: bool = True) -> dict[str, torch.Tensor]:
    n, k = q.codes.shape
    zeros = q.zeros.T - (1 if v1 else 0)  # v1 stores zero - 1
    return {"qweight": torch.from_numpy(_pack_rows(q.codes.T, bits)),
            "qzeros": torch.from_numpy(_pack_columns(zeros & ((1 << bits) - 1), bits)),
            "scales": q.scales.T.contiguous(),
            "g_idx": torch.arange(k, dtype=torch.int32) // group}


def awq_tensors(q: Quantized) -> dict[str, torch.Tensor]:
    return {"qweight": torch.from_numpy(_pack_columns(q.codes.T, 4, AWQ_PACK_ORDER)),
            "qzeros": torch.from_numpy(_pack_columns(q.zeros.T, 4, AWQ_PACK_ORDER)),
            "scales": q.scales.T.contiguous()}


def compressed_tensors_tensors(q: Quantized, bits: int, symmetric: bool) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 1 << (bits - 1)
    signed = torch.from_numpy(q.codes.astype(np.int64) - offset).to(torch.int8)
    out = {"weight_packed": pack_to_int32(signed, bits), "weight_scale": q.scales.contiguous(),
           "weight_shape": torch.tensor(q.codes.shape)}
    if not symmetric:
        out["weight_zero_point"] = pack_to_int32(torch.from_numpy(q.zeros - offset).to(torch.int8), bits, packed_dim=0)
    return out


def quantization_config(method: str, bits: int, group: int, symmetric: bool) -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": symmetric, "desc_act": False,
                "checkpoint_format": "gptq"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": not symmetric}
    strategy = {"strategy": "group", "group_size": group} if group else {"strategy": "channel"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                          "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                                                      "dynamic": False, "actorder": None, **strategy}}}}


def write_checkpoint(directory: Path, config: dict, method: str, bits: int = 4, group: int = 32,
                     symmetric: bool = False, seed: int = 0, quant_config: dict | None = None) -> dict[str, Quantized]:
    """A tiny model of `config` (seeded), its decoder Linears quantized and packed as `method` stores them,
    everything else in float16, saved as config.json + model.safetensors (`quant_config` overrides the
    quantization_config's entries). Returns each Linear's codes by module name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(hf_config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    scale_dtype = torch.bfloat16 if method == "compressed-tensors" else torch.float16
    tensors, written = {}, {}
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in LINEARS:
            q = quantize(tensor, bits, group or tensor.shape[1], symmetric, generator, scale_dtype)
            packed = (gptq_tensors(q, bits, group or tensor.shape[1]) if method == "gptq" else awq_tensors(q)
                      if method == "awq" else compressed_tensors_tensors(q, bits, symmetric))
            tensors.update({f"{module}.{k}": v for k, v in packed.items()})
            written[module] = q
        else:
            tensors[name] = tensor.to(torch.float16).contiguous()
    if getattr(hf_config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    quant = {**quantization_config(method, bits, group, symmetric), **(quant_config or {})}
    data = {**hf_config.to_dict(), "quantization_config": {k: v for k, v in quant.items() if v is not None},
            "torch_dtype": "float16"}
    (directory / "config.json").write_text(json.dumps(data, indent=2))
    return written
