"""fixed-mask: the additive attention mask is the network's `attention_mask` input, nothing built inside.

The runtime (LLM-TPU's chat demo) builds the causal mask itself and passes it in with a
fixed shape, [1,1,SEQ,SEQ] for prefill and [1,1,1,SEQ+1] for decode, −10000 where masked.
This pass wires every attention's mask operand straight to that input (skipping no-op
slices, replacing `is_causal=True`) and then refuses any mask-building op left in the
network (arange, cumsum, comparisons, tril/triu, where, masked_fill) that is computed from
positions and constants alone. The same ops computed from the hidden states are an
activation, such as Apertus' xIELU (`where(x > 0, ...)`), not a mask.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.errors import PassMatchError
from graphopt.ir import NetworkGraph, shape_of
from graphopt.pass_manager import Pass, register_pass
from graphopt.passes._attention import attention_nodes, sdpa_arg, set_sdpa_arg

aten = torch.ops.aten
MASK_INPUT = "attention_mask"
HIDDEN_INPUT = "input_states"

MASK_BUILDING_OPS = {
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.cumsum.default,
    aten.lt.Tensor, aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar,
    aten.ge.Tensor, aten.ge.Scalar, aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar,
    aten.tril.default, aten.triu.default, aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor,
}


def _computed_from(net: NetworkGraph, source: fx.Node | None) -> set[fx.Node]:
    """Every node whose value depends on `source` (nodes are in topological order)."""
    reached = {source} if source is not None else set()
    for node in net.graph.nodes:
        if any(arg in reached for arg in node.all_input_nodes):
            reached.add(node)
    return reached


def _through_noop_slices(node: fx.Node) -> fx.Node:
    while (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.slice.Tensor
           and shape_of(node) == shape_of(node.args[0])):
        node = node.args[0]
    return node


@register_pass
class FixedMask(Pass):
    """Make the attention mask the fixed-shape `attention_mask` input; no mask-building ops remain."""

    name = "fixed-mask"
    applies_to = frozenset({"block", "block_cache"})
    requires = ("attention.canonical",)
    ensures = ("mask.fixed",)

    def run(self, net: NetworkGraph) -> str:
        mask = net.input(MASK_INPUT)
        if mask is None:
            raise PassMatchError(self.name, net.name, f"the network has no '{MASK_INPUT}' input")
        rewired = 0
        for node in attention_nodes(net):
            operand = sdpa_arg(node, "attn_mask")
            if operand is None and sdpa_arg(node, "is_causal"):
                set_sdpa_arg(node, "is_causal", False)
            elif operand is None:
                raise PassMatchError(self.name, net.name, f"attention '{node.name}' uses no mask at all")
            elif _through_noop_slices(operand) is not mask:
                raise PassMatchError(self.name, net.name, f"the mask of attention '{node.name}' is computed inside "
                                     f"the network (by '{operand.name}'), not taken from the '{MASK_INPUT}' input")
            if operand is not mask:
                set_sdpa_arg(node, "attn_mask", mask)
                rewired += 1
        net.graph.eliminate_dead_code()
        activations = _computed_from(net, net.input(HIDDEN_INPUT))
        builders = sorted({str(n.target) for n in net.calls(*MASK_BUILDING_OPS) if n not in activations})
        if builders:
            raise PassMatchError(self.name, net.name, "ops that build a mask from positions remain after the "
                                 f"attention masks were rewired: {', '.join(builders)}")
        return f"{rewired} mask operand(s) rewired to '{MASK_INPUT}'"
