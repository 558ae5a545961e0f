"""A network's checkpoint codes: the pre-quantized Linears its ONNX holds, as the checkpoint stores them.

The ONNX of a pre-quantized model holds each quantized Linear's dequantized fp32 weight: that is what
onnxruntime runs and every check compares with. Beside it, `<network>.codes.safetensors` keeps the
same weights as the checkpoint's codes, scales and zero points, for a target that computes with them
(bm1684x's keep-checkpoint-codes top pass writes TPU-MLIR's A16MatMul from them). A Linear is
named by its ONNX initializer and carries the sha256 of its dequantized [N, K] fp32 bytes, which is
how the target finds it again in its own IR, whatever that calls it.

Layout (safetensors, numpy arrays, written deterministically):
  `<initializer>.qweight`  uint8 [N, K/2] (4 bits: input channel 2j in the low nibble) or [N, K] (8 bits)
  `<initializer>.scales`   float32 [N, G] (the checkpoint's 16-bit scales, widened exactly)
  `<initializer>.zeros`    uint8 [N, G]
  metadata "linears": JSON {initializer: {param, digest, bits, group_size, scale_dtype}}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.errors import GraphoptError
from graphopt.models.quantized import QuantizedLinear, weight_digest

SUFFIX = ".codes.safetensors"
FORMAT = "graphopt-codes/1"


def network_codes(linears: dict[str, QuantizedLinear], model: onnx.ModelProto, weights: dict,
                  network: str) -> dict[str, tuple[str, QuantizedLinear, str]]:
    """{ONNX initializer: (parameter, codes, digest of its dequantized weight)} for each of the network's quantized Linears (`linears`, by
    parameter name), found in the ONNX by value; one the passes changed is an error, naming it."""
    wanted = {(digest := weight_digest(q.dequantized())): (name, q, digest) for name, q in linears.items()}
    shapes = {tuple(q.codes.shape) for q in linears.values()}
    found = {}
    candidates = [*weights.items(), *((i.name, i) for i in model.graph.initializer)]
    for onnx_name, tensor in candidates:
        dims = tuple(tensor.shape) if not isinstance(tensor, onnx.TensorProto) else tuple(tensor.dims)
        if dims not in shapes:
            continue
        value = numpy_helper.to_array(tensor) if isinstance(tensor, onnx.TensorProto) else tensor.detach().numpy()
        if value.dtype == np.float32 and (hit := wanted.get(weight_digest(value))) is not None:
            found[onnx_name] = hit
    missing = sorted(set(linears) - {param for param, _, _ in found.values()})
    if missing:
        raise GraphoptError(
            f"network '{network}': the checkpoint's quantized weight {missing[0]} (and {len(missing) - 1} more) is not "
            "in the exported ONNX as its dequantized value, so its codes cannot be kept: a pass changed the weight "
            "(folded a scale into it, or joined it with another). Leave such passes out for pre-quantized checkpoints.")
    return dict(sorted(found.items()))


def write_codes(path: Path, codes: dict[str, tuple[str, QuantizedLinear, str]]) -> Path:
    """Write `codes` (network_codes) to `path`, under a temporary name renamed when complete."""
    from safetensors.numpy import save_file

    tensors, linears = {}, {}
    for onnx_name, (param, q, digest) in codes.items():
        tensors[f"{onnx_name}.qweight"] = q.packed()
        tensors[f"{onnx_name}.scales"] = q.scales.float().numpy()
        tensors[f"{onnx_name}.zeros"] = q.zeros
        linears[onnx_name] = {"param": param, "digest": digest, "bits": q.bits,
                              "group_size": q.group_size, "scale_dtype": str(q.scales.dtype).removeprefix("torch.")}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"format": FORMAT, "linears": json.dumps(linears, sort_keys=True)})
    partial.replace(path)
    return path


def read_codes(path: Path) -> dict[str, dict]:
    """{initializer: its metadata plus `qweight`, `scales`, `zeros` arrays}."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        meta = handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise GraphoptError(f"{path} is not a graphopt codes file ({FORMAT}); export the model again.")
        linears = json.loads(meta["linears"])
        return {name: {**info, **{part: handle.get_tensor(f"{name}.{part}") for part in ("qweight", "scales", "zeros")}}
                for name, info in linears.items()}


def kept_initializers(path: Path | None) -> set[str]:
    """The initializers a codes file keeps (none without one)."""
    if path is None or not path.is_file():
        return set()
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        return set(json.loads((handle.metadata() or {}).get("linears", "{}")))
