"""onnx-simplify: fold constants and shape arithmetic with onnxsim."""

from __future__ import annotations

import onnxsim

from graphopt.errors import GraphoptError
from graphopt.onnx_ir import OnnxNetwork, changed_nodes, node_signatures
from graphopt.pass_manager import OnnxPass, PassResult, register_pass


@register_pass
class OnnxSimplify(OnnxPass):
    """Fold constants and shape computations (onnxsim), checked against the unsimplified model."""

    name = "onnx-simplify"
    ensures = ("onnx.simplified",)

    def run(self, net: OnnxNetwork) -> PassResult:
        before, nodes = node_signatures(net.model), len(net.model.graph.node)
        model, ok = onnxsim.simplify(net.model)
        if not ok:
            raise GraphoptError(f"onnxsim's check failed for network '{net.name}': the simplified ONNX does not "
                                "compute what the exported one does. Report it with the network's dump "
                                "(--dump-after onnx-simplify writes what onnxsim was given).")
        net.model = model
        return PassResult(changed_nodes(before, node_signatures(model)), f"{nodes} -> {len(model.graph.node)} nodes")
