"""linear-weight-layout: keep Linear weights as [out, in] constants followed by a Transpose.

The exporter folds `x @ W.T` into a MatMul with a pre-transposed [in, out] constant. TPU-MLIR
quantises the [out, in] + Transpose form well (W8 cosine 0.99998, W4 g64 0.996) and a
plain [in, out] constant badly (0.71, measured here, design.md), so every MatMul whose
right operand is a 2-D constant gets its weight back in Linear layout, under its original
name where the traced model had one.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.onnx_ir import OnnxNetwork, weight_digest
from graphopt.pass_manager import Pass, register_pass


@register_pass
class LinearWeightLayout(Pass):
    """Store MatMul weights in Linear [out,in] layout with an explicit Transpose (TPU-MLIR quantises it well)."""

    name = "linear-weight-layout"
    level = "onnx"
    requires = ("onnx.simplified",)  # onnxsim would fold the Transpose again
    ensures = ("onnx.linear-layout",)

    def run(self, net: OnnxNetwork) -> str:
        graph = gs.import_onnx(net.model)
        restored = 0
        for node in [n for n in graph.nodes if n.op == "MatMul"]:
            weight = node.inputs[1]
            if not isinstance(weight, gs.Constant) or weight.values.ndim != 2:
                continue
            out_in = np.ascontiguousarray(weight.values.T)
            name = net.weight_names.get(weight_digest(out_in), f"{node.name or 'matmul'}.weight")
            stored = gs.Constant(name, out_in)
            transposed = gs.Variable(f"{name}.T", dtype=weight.values.dtype, shape=list(weight.values.shape))
            graph.nodes.append(gs.Node("Transpose", f"{name}.transpose", {"perm": [1, 0]}, [stored], [transposed]))
            node.inputs[1] = transposed
            restored += 1
        graph.cleanup().toposort()
        net.model = gs.export_onnx(graph, do_type_check=False)
        return f"{restored} weight(s) restored to [out,in] + Transpose"
