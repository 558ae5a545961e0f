"""kv-layout: expose each attention's new K and V as outputs in [batch, seq, kv_heads, head_dim].

The runtime keeps its KV cache as [1, SEQ, KV, D] per layer and copies a block's K/V
outputs into it; it never sees the query-head repeat. So K and V are taken as the attention
reads them after `attention-canonical`: post-rope, before any GQA expansion.
"""

from __future__ import annotations

import torch

from graphopt.ir import NetworkGraph
from graphopt.contract import BLOCKS, PAST_K, PAST_V
from graphopt.pass_manager import Pass, PassResult, register_pass
from graphopt.passes._attention import attention_nodes, kv_names, sdpa_arg


@register_pass
class KvLayout(Pass):
    """Add outputs past_k/past_v: the new K/V in [batch, seq, kv_heads, head_dim], pre-GQA-repeat."""

    name = "kv-layout"
    applies_to = BLOCKS
    # After cross-kv-inputs, which marks the cross-attentions this pass leaves alone.
    requires = ("attention.canonical", "cross_kv.inputs")
    ensures = ("kv.exposed",)

    def run(self, net: NetworkGraph) -> PassResult:
        attentions = attention_nodes(net)
        if not attentions:
            raise self.cannot(net, "found no attention whose K/V could be exposed")
        for node, names in zip(attentions, kv_names(PAST_K, PAST_V, len(attentions))):
            for operand, name in zip(("key", "value"), names):
                with net.graph.inserting_before(net.output_node):
                    bshd = net.graph.call_function(torch.ops.aten.permute.default, (sdpa_arg(node, operand), [0, 2, 1, 3]))
                net.add_output(name, bshd)
        return PassResult(len(attentions), f"exposed K/V of {len(attentions)} attention(s) as [batch, seq, kv_heads, head_dim]")
