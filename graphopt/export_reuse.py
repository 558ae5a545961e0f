"""ONNX export once per graph: block_1 … block_30 are block_0's rewritten FX graph over other weights, and
neither torch.onnx.export nor the ONNX passes ever see a weight's values (onnx_ir.py: weights are graph inputs
until save_onnx binds them). So a network whose graph this process has exported already gets that model, as the
export and the passes left it, with its own weights: an 8B block's export and ONNX passes (1-2.7 s) become a
copy of a 10 KB model, and the file saved is the same bytes.

`graph_key` says what must be equal: the FX graph's code (its ops, their arguments, the weights' names), the
value of every constant too small to be a weight (those stay in the graph, and the exporter folds them), every
weight's shape and dtype, the network's kind, inputs, outputs and properties, its dynamic axes and the ONNX
pipeline. Nothing is reused where a pass not built into graphopt is in the ONNX pipeline (it may read the
weights), or where the ONNX passes' graphs are dumped (each network's dump is its own).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import replace

import onnx
import torch

from graphopt.ir import NetworkGraph
from graphopt.onnx_ir import OnnxNetwork, is_weight, out_of_band_weights
from graphopt.pass_manager import PassRecord, get_pass


def graph_key(net: NetworkGraph, dynamic_axes: dict | None, onnx_pipeline: list[str]) -> str:
    digest = hashlib.sha256(net.gm.code.encode())
    for node in net.graph.nodes:
        if node.op != "get_attr":
            continue
        tensor = functools.reduce(getattr, node.target.split("."), net.gm)
        digest.update(repr((node.target, tuple(tensor.shape), str(tensor.dtype))).encode())
        if not is_weight(tensor):
            digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr((net.kind, sorted(net.properties), [(s.name, s.shape, str(s.dtype)) for s in net.inputs],
                        list(net.output_names), dynamic_axes, list(onnx_pipeline))).encode())
    return digest.hexdigest()


class ExportedGraphs:
    """The ONNX models (weights out of band, after the ONNX passes) this process exported, by graph_key, with
    the name of the network each was exported for."""

    def __init__(self, onnx_pipeline: list[str], dumping: bool):
        self.enabled = not dumping and all(get_pass(name).__module__.startswith("graphopt.passes.")
                                           for name in onnx_pipeline)
        self.pipeline = list(onnx_pipeline)
        self._models: dict[str, tuple[str, onnx.ModelProto, set[str], list[PassRecord]]] = {}

    def key(self, net: NetworkGraph, dynamic_axes: dict | None) -> str | None:
        return graph_key(net, dynamic_axes, self.pipeline) if self.enabled else None

    def find(self, key: str | None, net: NetworkGraph) -> tuple[OnnxNetwork, list[PassRecord], str] | None:
        """`net` as ONNX from the model of its graph exported before, the ONNX passes' records of that export,
        and the network it was exported for (None: export it)."""
        if key not in self._models:
            return None
        source, model, properties, records = self._models[key]
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return (OnnxNetwork(net.name, net.kind, copy, set(properties), out_of_band_weights(net.gm)),
                [replace(r, network=net.name, seconds=0.0) for r in records], source)

    def add(self, key: str | None, exported: OnnxNetwork, records: list[PassRecord], weights: dict) -> None:
        """Keep `exported`'s model for the graphs that come after, if the ONNX passes left its weights as the
        export gave them (`weights`: the same tensors, under the same names)."""
        if key is None or key in self._models:
            return
        if exported.weights.keys() != weights.keys() or any(exported.weights[k] is not w for k, w in weights.items()):
            return
        model = onnx.ModelProto()
        model.CopyFrom(exported.model)
        self._models[key] = (exported.name, model, set(exported.properties), list(records))
