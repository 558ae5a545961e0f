"""onnx-simplify: fold constants and shape arithmetic with onnxsim."""

from __future__ import annotations

import onnxsim

from graphopt.errors import GraphoptError
from graphopt.onnx_ir import OnnxNetwork
from graphopt.pass_manager import Pass, register_pass


@register_pass
class OnnxSimplify(Pass):
    """Fold constants and shape computations (onnxsim), checked against the unsimplified model."""

    name = "onnx-simplify"
    level = "onnx"
    ensures = ("onnx.simplified",)

    def run(self, net: OnnxNetwork) -> str:
        before = len(net.model.graph.node)
        model, ok = onnxsim.simplify(net.model)
        if not ok:
            raise GraphoptError(f"onnxsim's check failed for network '{net.name}': the simplified ONNX does not "
                                "compute what the exported one does. Run without --target optimisations or report it.")
        net.model = model
        return f"{before} -> {len(model.graph.node)} nodes"
