"""Pre-quantized checkpoints: what their `quantization_config` says, and their Linear weights as codes.

Three formats, each read as its own documentation and reference code pack it:
  gptq                AutoGPTQ / GPTQModel: `qweight` int32 [K*bits/32, N] (codes packed along the input
                      channels), `qzeros` int32 [G, N*bits/32], `scales` [G, N], `g_idx` [K]; checkpoint
                      format `gptq` (v1) stores each zero point minus one, `gptq_v2` stores it as is.
  awq                 AutoAWQ `version: gemm`: `qweight` int32 [K, N/8] (codes packed along the output
                      channels, in the order 0 2 4 6 1 3 5 7), `qzeros` [G, N/8] packed alike, `scales` [G, N].
  compressed-tensors  `format: pack-quantized`: `weight_packed` int32 [N, K*bits/32], `weight_scale` [N, G],
                      `weight_zero_point` int32 [N*bits/32, G] when asymmetric; codes stored signed, offset
                      by 2^(bits-1) before packing.

Whatever the format, a Linear becomes one `QuantizedLinear` in a single layout, the one TPU-MLIR's
A16MatMul takes: codes [N, K] (unsigned), scales [N, G] and zero points [N, G] (unsigned), groups of
`group_size` consecutive input channels; its weight is (code - zero) * scale. That form is exact for
every format here (an unsigned code is the signed one plus the offset, the zero point alike), and
the dequantized fp32 weight is exact too: a code difference times a 16-bit scale fits fp32's mantissa.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from graphopt.errors import GraphoptError

METHODS = ("gptq", "awq", "compressed-tensors")
BITS = (4, 8)  # what TPU-MLIR's A16MatMul takes on BM1684X (weight_bits)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's gemm packing: nibble i holds output channel AWQ_ORDER[i]


@dataclass(frozen=True)
class QuantScheme:
    """A checkpoint's quantization, from config.json's `quantization_config`."""

    method: str  # one of METHODS
    bits: int
    group_size: int  # input channels per scale; 0: one group per output channel (GPTQ -1, strategy channel)
    symmetric: bool
    gptq_v1: bool = False  # GPTQ stores zero points minus one
    ignore: tuple[str, ...] = ()  # modules left unquantized (compressed-tensors `ignore`, AWQ modules_to_not_convert)

    def describe(self) -> str:
        group = f"group {self.group_size}" if self.group_size else "per channel"
        return f"{self.method} int{self.bits}, {group}, {'symmetric' if self.symmetric else 'asymmetric'}"

    @property
    def suffix(self) -> str:
        """The tensor that marks a quantized Linear in the checkpoint: `<module>.<suffix>`."""
        return "weight_packed" if self.method == "compressed-tensors" else "qweight"

    @property
    def scales_suffix(self) -> str:
        """The tensor of a quantized Linear's scales: `<module>.<scales_suffix>`."""
        return "weight_scale" if self.method == "compressed-tensors" else "scales"


def _config_error(what: str, config: dict) -> GraphoptError:
    return GraphoptError(
        f"config.json's quantization_config {what} (it reads {config}). graphopt keeps the codes of GPTQ (4 or 8 bit), "
        "AWQ (version gemm, 4 bit) and compressed-tensors pack-quantized (4 or 8 bit int weights) checkpoints; fix "
        "the config to describe the checkpoint's tensors, or give the unquantized model.")


def scheme_of(config) -> QuantScheme | None:
    """The checkpoint's QuantScheme (None for an unquantized one); a config graphopt cannot keep is an error."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = q.get("quant_method")
    if method not in METHODS:
        raise _config_error(f"names quant_method {method!r}, which graphopt does not read", q)
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(q)
    if "group_size" not in q:  # llm_convert crashes here (tpu-mlir issue 250)
        raise _config_error("has no group_size, so the scales' grouping is unknown (AutoGPTQ and AutoAWQ write it: "
                            "128 is their default)", q)
    bits, group = q.get("bits"), q["group_size"]
    if bits not in BITS or (method == "awq" and bits != 4):
        raise _config_error(f"gives bits {bits}; BM1684X's weight-only matmul takes {' or '.join(map(str, BITS))}-bit "
                            f"codes{' and AWQ packs 4' if method == 'awq' else ''}", q)
    if not isinstance(group, int) or not (group == -1 or group > 0) or (group > 0 and group & (group - 1)):
        raise _config_error(f"gives group_size {group!r}; it must be a power of two, or -1 for one group per channel", q)
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise _config_error(f"gives AWQ version {version!r}: only gemm packing is read (gemv and marlin pack "
                                "codes for their own kernels)", q)
        return QuantScheme("awq", 4, max(group, 0), not q.get("zero_point", True),
                           ignore=tuple(q.get("modules_to_not_convert") or ()))
    if q.get("lm_head"):
        raise _config_error("quantizes lm_head too (lm_head: true), which graphopt does not read yet; use "
                            "--lm-head w4 or w8 to quantize the head at compile time instead", q)
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _config_error(f"gives checkpoint_format {fmt!r}; the gptq (v1) and gptq_v2 layouts are read", q)
    return QuantScheme("gptq", bits, max(group, 0), bool(q.get("sym", True)), gptq_v1=fmt == "gptq")


def _compressed_tensors_scheme(q: dict) -> QuantScheme:
    if q.get("format") != "pack-quantized":
        raise _config_error(f"gives compressed-tensors format {q.get('format')!r}; pack-quantized is read", q)
    groups = list((q.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise _config_error(f"has {len(groups)} config_groups; one scheme for every quantized Linear is read", q)
    weights, activations = groups[0].get("weights") or {}, groups[0].get("input_activations")
    if activations:
        raise _config_error("quantizes input activations too; BM1684X's A16MatMul keeps weights only", q)
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    if weights.get("type", "int") != "int" or bits not in BITS:
        raise _config_error(f"quantizes weights to {weights.get('type')} {bits} bits; int 4 or 8 is read", q)
    if strategy not in ("group", "channel"):
        raise _config_error(f"uses strategy {strategy!r}; group and channel are read", q)
    group = int(weights.get("group_size") or 0) if strategy == "group" else 0
    if strategy == "group" and (group <= 0 or group & (group - 1)):
        raise _config_error(f"gives group_size {weights.get('group_size')!r}; it must be a power of two", q)
    if weights.get("actorder") not in (None, "static"):  # static: groups stay runs of channels
        raise _config_error(f"gives actorder {weights.get('actorder')!r}: groups are not runs of consecutive "
                            "input channels, which A16MatMul needs (actorder static or none is read)", q)
    ignore = tuple(i for i in (q.get("ignore") or ()) if not i.startswith("re:"))
    return QuantScheme("compressed-tensors", bits, group, bool(weights.get("symmetric", True)), ignore=ignore)


@dataclass
class QuantizedLinear:
    """One Linear's weight as codes: (codes - zeros[group]) * scales[group], groups of `group_size` input channels."""

    codes: np.ndarray  # uint8 [N, K]
    scales: torch.Tensor  # [N, G] in the checkpoint's dtype (float16, bfloat16 or float32)
    zeros: np.ndarray  # uint8 [N, G]
    bits: int
    group_size: int  # K when the checkpoint has one group per channel

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K]; exact (a code difference times a 16-bit scale is an fp32 number)."""
        groups = self.codes.shape[1] // self.group_size
        diff = torch.from_numpy(self.codes.astype(np.float32) - np.repeat(self.zeros, self.group_size, axis=1)
                                .astype(np.float32))
        return (diff.reshape(-1, groups, self.group_size) * self.scales.float()[:, :, None]).reshape(self.codes.shape)

    def packed(self) -> np.ndarray:
        """The codes as A16MatMul stores them: [N, K/2] with input channel 2j in the low nibble for 4 bits, else [N, K]."""
        if self.bits == 8:
            return self.codes
        return (self.codes[:, 0::2] | (self.codes[:, 1::2] << 4)).astype(np.uint8)


def unpack(packed: torch.Tensor, bits: int, axis: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Unsigned codes from int32 words holding 32/bits of them along `axis`, the i-th from bit bits*i
    (`order[i]`: the position that code i holds within its word's run, for AWQ)."""
    words = packed.numpy().view(np.uint32)
    per = 32 // bits
    codes = np.stack([(words >> np.uint32(bits * i)) & np.uint32((1 << bits) - 1) for i in range(per)], axis=axis + 1)
    if order is not None:  # codes[..., i] holds position order[i]: put each where it belongs
        codes = np.take(codes, np.argsort(order), axis=axis + 1)
    shape = list(words.shape)
    shape[axis] *= per
    return codes.reshape(shape).astype(np.uint8)


def read_linear(scheme: QuantScheme, prefix: str, tensor: Callable[[str], torch.Tensor],
                has: Callable[[str], bool]) -> QuantizedLinear:
    """The Linear `prefix` (e.g. `model.layers.0.self_attn.q_proj`) of a checkpoint in `scheme`, read through
    `tensor(name)`; its shapes are checked against each other, and a problem names the tensor."""
    name = lambda suffix: f"{prefix}.{suffix}"  # noqa: E731
    bits = scheme.bits
    if scheme.method == "gptq":
        qweight, scales = tensor(name("qweight")), tensor(name("scales"))
        codes = unpack(qweight, bits, 0).T  # [K, N] -> [N, K]
        zeros = unpack(tensor(name("qzeros")), bits, 1).T.astype(np.int32) if has(name("qzeros")) else None
        if zeros is None:
            zeros = np.full(codes.shape[:1] + (scales.shape[0],), 1 << (bits - 1), np.int32)
        elif scheme.gptq_v1:
            zeros = zeros + 1  # v1 stores zero - 1 (a zero of 16 is then possible, and kept as AutoGPTQ reads it)
        scales = scales.T
        if has(name("g_idx")):
            check_groups_in_order(tensor(name("g_idx")), codes.shape[1], scheme.group_size or codes.shape[1], name("g_idx"))
    elif scheme.method == "awq":
        codes = unpack(tensor(name("qweight")), bits, 1, AWQ_ORDER).T
        zeros = unpack(tensor(name("qzeros")), bits, 1, AWQ_ORDER).T.astype(np.int32)
        scales = tensor(name("scales")).T
    else:
        shape = tuple(int(v) for v in tensor(name("weight_shape")).tolist())
        codes = unpack(tensor(name("weight_packed")), bits, 1)[:, :shape[1]]
        scales = tensor(name("weight_scale"))
        zeros = unpack(tensor(name("weight_zero_point")), bits, 0).astype(np.int32)[:shape[0]] if not scheme.symmetric \
            else np.full((shape[0], scales.shape[1]), 1 << (bits - 1), np.int32)
        if has(name("weight_g_idx")):
            check_groups_in_order(tensor(name("weight_g_idx")), shape[1], scheme.group_size or shape[1], name("weight_g_idx"))
    n, k = codes.shape
    group = scheme.group_size or k
    if k % group or scales.shape != (n, k // group) or zeros.shape != (n, k // group):
        raise GraphoptError(
            f"{prefix}: the checkpoint's codes are [{n}, {k}] (output x input channels) but its scales are "
            f"{list(scales.shape)} and zero points {list(zeros.shape)}; with {scheme.describe()} both must be "
            f"[{n}, {k // group if group else '?'}]. The config's group_size does not describe these tensors.")
    if zeros.max(initial=0) > 255 or zeros.min(initial=0) < 0:
        raise GraphoptError(f"{prefix}: its zero points reach {int(zeros.min())}..{int(zeros.max())}, outside a byte.")
    return QuantizedLinear(np.ascontiguousarray(codes), scales.contiguous(), np.ascontiguousarray(zeros.astype(np.uint8)),
                           bits, group)


def linear_dims(scheme: QuantScheme, prefix: str, shape: Callable[[str], tuple[int, ...]]) -> tuple[int, int, int]:
    """(output channels N, input channels K, groups G) of Linear `prefix`, from its tensors' shapes alone
    (`shape(name)`), for the checks made before any work; shapes that do not fit together are an error."""
    per = 32 // scheme.bits
    if scheme.method == "compressed-tensors":
        packed, scales = shape(f"{prefix}.weight_packed"), shape(f"{prefix}.weight_scale")
        n, k, groups = packed[0], packed[1] * per, scales[-1] if len(scales) == 2 else 0
    else:
        packed, scales = shape(f"{prefix}.qweight"), shape(f"{prefix}.scales")
        n, k = (packed[1], packed[0] * per) if scheme.method == "gptq" else (packed[1] * per, packed[0])
        groups = scales[0] if len(scales) == 2 and scales[1] == n else 0
    group = scheme.group_size or k
    if not groups or k % group or groups != k // group:
        raise GraphoptError(
            f"{prefix}: its codes are {n} x {k} (output x input channels) and its scales {list(scales)}, which does not "
            f"fit {scheme.describe()}: that needs {k // group if k % group == 0 else 'a whole number of'} groups of "
            f"{group} input channels. The config's group_size does not describe these tensors.")
    return n, k, groups


def check_groups_in_order(g_idx: torch.Tensor, k: int, group: int, name: str) -> None:
    """Act-order checkpoints assign input channels to groups out of order; A16MatMul's groups are runs."""
    expected = torch.arange(k, dtype=torch.int64) // group
    if g_idx.shape != (k,) or not torch.equal(g_idx.to(torch.int64), expected):
        first = int((g_idx.to(torch.int64) != expected).nonzero()[0]) if g_idx.shape == (k,) else 0
        raise GraphoptError(
            f"{name} assigns input channels to quantization groups out of order (act-order / desc_act: channel "
            f"{first} is in group {int(g_idx[first])}, not {first // group}). BM1684X's weight-only matmul "
            "(A16MatMul) scales runs of consecutive input channels, so these codes cannot be kept as they are. "
            "Quantize the model again with desc_act=False (or GPTQModel's static_groups=True, which keeps groups in "
            "order), or give the unquantized model and let graphopt quantize it (--quantize w4bf16).")


def weight_digest(weight: torch.Tensor | np.ndarray) -> str:
    """How a kept Linear is found again downstream, whatever it is named there: the sha256 of its fp32 [N, K] bytes."""
    array = weight.numpy() if isinstance(weight, torch.Tensor) else weight
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()
