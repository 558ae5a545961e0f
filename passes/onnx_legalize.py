"""onnx-legalize: rename ATen ops the TorchScript ONNX exporter has no symbolic for.

Rules as data: each entry maps an op torch.export emits to an equivalent the exporter knows.
"""

from __future__ import annotations

import torch

from graphopt.ir import NetworkGraph
from graphopt.pass_manager import Pass, register_pass

aten = torch.ops.aten


def _to_copy(node):
    """_to_copy(x, dtype=d) → to(x, d): the exporter has `to` but not `_to_copy`."""
    return aten.to.dtype, (node.args[0], node.kwargs.get("dtype", node.meta["val"].dtype)), {}


def _same_args(target):
    return lambda node: (target, node.args, node.kwargs)


RULES = {
    aten._to_copy.default: _to_copy,
    aten._unsafe_view.default: _same_args(aten.reshape.default),
}


@register_pass
class OnnxLegalize(Pass):
    """Replace ATen ops without a TorchScript-exporter symbolic (_to_copy, _unsafe_view) by equivalents."""

    name = "onnx-legalize"
    ensures = ("onnx.legal",)

    def run(self, net: NetworkGraph) -> str:
        count = 0
        for node in net.calls(*RULES):
            node.target, node.args, node.kwargs = RULES[node.target](node)
            count += 1
        return f"renamed {count} op(s)"
