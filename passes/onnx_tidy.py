"""onnx-tidy: pin the IR version and opset TPU-MLIR reads, drop unused values and doc strings; check that
every MatMul weight is in Linear layout, which W4/W8 quantization needs."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from graphopt.onnx_ir import IR_VERSION, OPSET, OnnxNetwork, changed_nodes, linear_layout_problems, node_signatures
from graphopt.pass_manager import OnnxPass, PassResult, register_pass


@register_pass
class OnnxTidy(OnnxPass):
    """Remove unused values, strip doc strings, pin IR version 8 / opset 15 (TPU-MLIR's onnx 1.14 reads them)."""

    name = "onnx-tidy"
    requires = ("onnx.simplified",)  # the last ONNX pass: it pins what the passes before it wrote
    # weights.linear-layout: every MatMul weight [out, in] behind a Transpose, as the export leaves it
    # (weights travel out of band, so the exporter never folds them); TPU-MLIR quantizes that form well.
    ensures = ("onnx.tidy", "weights.linear-layout")

    def run(self, net: OnnxNetwork) -> PassResult:
        before = node_signatures(net.model)
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
        removed = changed_nodes(before, node_signatures(model))
        return PassResult(removed, f"{len(model.graph.node)} nodes ({removed} unused removed), opset {OPSET}, "
                                   f"IR {IR_VERSION}")

    def verify(self, net: OnnxNetwork) -> str | None:
        weights = set(net.weights) | {i.name for i in net.model.graph.initializer if len(i.dims) == 2}
        problems = linear_layout_problems(net.model, weights)
        return "; ".join(problems) or None
