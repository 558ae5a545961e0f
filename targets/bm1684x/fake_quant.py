"""The quantized reference: the ONNX networks with their Linear weights rounded the way
TPU-MLIR's W4/W8 modes store them, run in onnxruntime.

Against the fp32 networks, a W4 bmodel differs by the quantization itself, which depends on
the model (tiny-llama's large random weights lose far more than a trained model: block output
cosine 0.920 in onnxruntime alone). Against this reference it differs only by what the
compiler and the chip's 16-bit activations add, so that comparison can hold a tight bar
whatever the model, and a compiler bug cannot hide inside "quantization loss".

TPU-MLIR's scheme (measured to match its simulator to cosine 0.9999+): per output channel,
groups of `group_size` input channels, asymmetric min/max with 2^bits - 1 steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.checkpoint_codes import kept_initializers
from graphopt.errors import GraphoptError
from graphopt.onnx_ir import linear_layout_problems


def fake_quantize(weight: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Round a Linear weight [out, in] per group of input channels, asymmetric min/max."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size).astype(np.float64)
    low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    levels = 2 ** bits - 1
    scale = np.where(high > low, (high - low) / levels, 1.0)
    zero = np.round(-low / scale)
    q = np.clip(np.round(groups / scale) + zero, 0, levels)
    return ((q - zero) * scale).reshape(out_features, in_features).astype(np.float32)


def linear_weights(model: onnx.ModelProto) -> set[str]:
    """Initializers a MatMul multiplies by, directly or through a Transpose: the weights W4/W8 quantize."""
    initializers = {i.name for i in model.graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    names = set()
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            source = transposed.get(node.input[1], node.input[1])
            if source in initializers:
                names.add(source)
    return names


def write_quantized_copy(src: Path, dst: Path, bits: int, group_size: int, kept: frozenset[str] = frozenset()) -> int:
    """`src` with its Linear weights fake-quantized, saved as `dst`; returns how many were. `kept`: weights the
    bmodel computes from a pre-quantized checkpoint's own codes (checkpoint_codes.py), whose dequantized value
    the ONNX already holds, so they stay as they are. The weights
    must be in Linear layout ([out, in] behind a Transpose, what onnx-tidy checks): quantizing groups
    along axis 1 of an [in, out] weight would group the wrong channels."""
    model = onnx.load(str(src))
    names = linear_weights(model) - kept
    problems = linear_layout_problems(model, names)
    if problems:
        raise GraphoptError(f"{src.name} is not in the Linear layout the W4/W8 reference quantizes: "
                            f"{'; '.join(problems)}. Networks written by graphopt's pipeline are (onnx-tidy checks it).")
    for init in model.graph.initializer:
        if init.name in names:
            weight = numpy_helper.to_array(init)
            if weight.ndim == 2 and weight.shape[1] % group_size == 0:
                # Linear layout: the weight is [out, in] and the graph transposes it.
                init.CopyFrom(numpy_helper.from_array(fake_quantize(weight, bits, group_size), init.name))
    large = sum(i.ByteSize() for i in model.graph.initializer) > (1 << 30)
    onnx.save_model(model, str(dst), save_as_external_data=large, location=dst.name + ".data" if large else None)
    return len(names)


def quantized_reference(folder: Path, manifest: dict, specs, group_size: int, into: Path) -> Path:
    """A copy of the output directory's networks in `into`, with W4/W8 nets fake-quantized (but for the
    weights they keep as checkpoint codes: a pre-quantized model's reference is its dequantized self)."""
    into.mkdir(parents=True, exist_ok=True)
    bits_of = {s.onnx_network: s.weight_bits for s in specs}
    for net in manifest["networks"]:
        src = folder / net["file"]
        bits = bits_of.get(net["name"])
        kept = frozenset(kept_initializers(folder / net["codes"] if "codes" in net else None))
        if bits and linear_weights(onnx.load(str(src), load_external_data=False)) - kept:
            write_quantized_copy(src, into / net["file"], bits, group_size, kept)
        else:
            for name in [net["file"], *net["external_data"]]:
                target = into / name
                if not target.exists():
                    target.symlink_to((folder / name).absolute())
    return into
