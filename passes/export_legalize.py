"""export-legalize: rewrite ATen ops the TorchScript ONNX exporter has no symbolic for (the last FX pass).

Rules as data: RULES renames an op torch.export emits to an equivalent the exporter knows;
EXPANSIONS replaces one by a few ops it knows. `_unsafe_view` never reaches it in the built-in
pipeline (views-to-reshapes makes every view a reshape); its rule guards graphs a user pass
writes after that.
"""

from __future__ import annotations

import torch

from graphopt.ir import NetworkGraph
from graphopt.pass_manager import Pass, PassResult, register_pass

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


def _expm1(graph, x):
    """expm1(x) → exp(x) − 1 (xIELU activations, Apertus). In fp32 the difference is ≤ 1e-7 absolute."""
    return graph.call_function(aten.sub.Tensor, (graph.call_function(aten.exp.default, (x,)), 1.0))


EXPANSIONS = {
    aten.expm1.default: _expm1,
}


@register_pass
class ExportLegalize(Pass):
    """Replace ATen ops without a TorchScript-exporter symbolic (_to_copy, _unsafe_view, expm1) by equivalents."""

    name = "export-legalize"
    requires = ("attention.lowered",)  # after every rewrite that matches on ATen ops, which it renames
    ensures = ("export.legal",)

    def run(self, net: NetworkGraph) -> PassResult:
        count = 0
        for node in net.calls(*RULES):
            node.target, node.args, node.kwargs = RULES[node.target](node)
            count += 1
        for node in net.calls(*EXPANSIONS):
            with net.graph.inserting_before(node):
                node.replace_all_uses_with(EXPANSIONS[node.target](net.graph, *node.args))
            net.graph.erase_node(node)
            count += 1
        return PassResult(count, f"rewrote {count} op(s)")
