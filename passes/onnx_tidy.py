"""onnx-tidy: pin the IR version and opset TPU-MLIR reads, drop unused values and doc strings."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from graphopt.onnx_ir import IR_VERSION, OPSET, OnnxNetwork
from graphopt.pass_manager import Pass, register_pass


@register_pass
class OnnxTidy(Pass):
    """Remove unused values, strip doc strings, pin IR version 8 / opset 15 (TPU-MLIR's onnx 1.14 reads them)."""

    name = "onnx-tidy"
    level = "onnx"
    ensures = ("onnx.tidy",)

    def run(self, net: OnnxNetwork) -> str:
        graph = gs.import_onnx(net.model)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        model = gs.export_onnx(graph, do_type_check=False)
        for node in model.graph.node:
            node.doc_string = ""
        model.doc_string = ""
        model.producer_name, model.producer_version = "graphopt", ""
        del model.opset_import[:]
        model.opset_import.append(onnx.helper.make_opsetid("", OPSET))
        model.ir_version = IR_VERSION
        if model.ByteSize() < (1 << 31) - 1:  # the checker cannot take a model past protobuf's limit
            onnx.checker.check_model(model)
        net.model = model
        return f"{len(model.graph.node)} nodes, opset {OPSET}, IR {IR_VERSION}"
