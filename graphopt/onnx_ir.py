"""FX → ONNX: export a rewritten network, and the form ONNX passes work on.

The TorchScript exporter (`dynamo=False`) is used because it writes opset 15 / IR 8, which
TPU-MLIR's ONNX importer (onnx 1.14) accepts; the dynamo exporter writes opset 18, whose
ReduceMean TPU-MLIR 1.30 rejects (see design.md). It accepts a plain GraphModule over
ATen ops, which is what the FX passes leave behind.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from graphopt.ir import NetworkGraph

OPSET = 15
IR_VERSION = 8
# Past this many bytes of weights a model is saved with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass
class OnnxNetwork:
    """One network as an ONNX model, between ONNX passes."""

    name: str
    kind: str
    model: onnx.ModelProto
    # sha1 of each 2-D weight's bytes in [out, in] layout -> its name in the traced model,
    # so passes can give folded constants their original names back.
    weight_names: dict[str, str] = field(default_factory=dict)
    properties: set[str] = field(default_factory=set)

    def finalize(self) -> None:
        pass

    def readable(self) -> str:
        return onnx.helper.printable_graph(self.model.graph)


def weight_digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def export_onnx(net: NetworkGraph, dynamic_axes: dict | None = None) -> OnnxNetwork:
    weight_names = {weight_digest(t.numpy()): name for name, t in net.gm.named_buffers() if t.dim() == 2}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / f"{net.name}.onnx"
        torch.onnx.export(
            net.gm, net.example_inputs(), str(path),
            input_names=[s.name for s in net.inputs], output_names=list(net.output_names),
            opset_version=OPSET, dynamo=False, do_constant_folding=True, dynamic_axes=dynamic_axes,
        )
        model = onnx.load(str(path))
    return OnnxNetwork(net.name, net.kind, model, weight_names, set(net.properties))


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes if not t.raw_data else len(t.raw_data) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write `path` (plus `path.data` for large models); return the files written."""
    if initializer_bytes(model) > EXTERNAL_DATA_BYTES:
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]
