"""attention-lower: spell attention as MatMul/Softmax for ONNX opset ≤ 17, which has no attention op.

The form is `softmax((q·scale)·kᵀ + mask)·v`, which TPU-MLIR's ONNX importer reads as plain
Mul/MatMul/Add/Softmax. In a decode network, grouped-query K/V are not repeated to the query
heads (a Tile over the whole cache on every token, 4.8% of an 8B decode block): the query heads
that share a K/V head become rows of one matrix product with it. Prefill networks repeat them
(see `run` for why).
"""

from __future__ import annotations

import math

import torch

from graphopt.ir import NetworkGraph, shape_of
from graphopt.contract import BLOCKS, ENCODER
from graphopt.pass_manager import Pass, PassResult, register_pass
from graphopt.passes._attention import attention_nodes, sdpa_arg

aten = torch.ops.aten


@register_pass
class AttentionLower(Pass):
    """Lower attention to Mul/MatMul/Add/Softmax/MatMul; decode shares K/V heads by reshape (ONNX ≤ 17 has no attention op)."""

    name = "attention-lower"
    applies_to = BLOCKS | {ENCODER}
    # The last rewrite of attention: every pass that finds attention as one node runs before it.
    requires = ("mask.fixed", "kv.exposed", "cache.concat")
    ensures = ("attention.lowered",)

    def run(self, net: NetworkGraph) -> PassResult:
        attentions = attention_nodes(net, include_cross=True)
        graph = net.graph
        for node in attentions:
            query, key, value = (sdpa_arg(node, a) for a in ("query", "key", "value"))
            mask, scale = sdpa_arg(node, "attn_mask"), sdpa_arg(node, "scale")
            if sdpa_arg(node, "is_causal") or sdpa_arg(node, "dropout_p"):
                raise self.cannot(net, f"attention '{node.name}' still has is_causal or dropout")
            batch, heads, steps, head_dim = shape_of(query)
            kv_heads = shape_of(key)[1]
            # Decoding one token, the query heads that share a K/V head are rows of one product with it,
            # not a repeat of K/V (a Tile over the whole cache on every call). For a prefill the repeat is
            # cheaper: grouped rows need the [steps, keys] mask repeated or a 5-D add, either of which
            # TPU-MLIR does not fuse with the softmax (8B block_0 W4BF16: 19.33M -> 20.39M / 20.54M cycles).
            group = heads // kv_heads if steps == 1 else 1
            with graph.inserting_before(node):
                call = graph.call_function
                if group == 1:
                    key, value = (self._repeat_heads(graph, t, heads) for t in (key, value))
                scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
                # Scale the query, not the scores: [heads, steps, D] multiplies instead of
                # [heads, steps, keys], and in 16 bits the large scores are rounded once less.
                if scale != 1.0:  # 1 when a pass folded it into the weights (examples/passes/fold_attention_scale.py)
                    query = call(aten.mul.Tensor, (query, scale))
                if group > 1:  # [b, heads, 1, D] is [b, kv_heads, group, D] as it is: a group's heads are consecutive
                    query = call(aten.reshape.default, (query, [batch, kv_heads, group, head_dim]))
                scores = call(aten.matmul.default, (query, call(aten.transpose.int, (key, -2, -1))))
                if mask is not None:  # one row, [.., 1, keys]: it broadcasts over the group's rows
                    scores = call(aten.add.Tensor, (scores, mask))
                probs = call(aten.softmax.int, (scores, -1))
                out = call(aten.matmul.default, (probs, value))
                if group > 1:
                    out = call(aten.reshape.default, (out, [batch, heads, steps, head_dim]))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        return PassResult(len(attentions), f"lowered {len(attentions)} attention(s)")

    @staticmethod
    def _repeat_heads(graph, tensor, heads: int):
        batch, kv_heads, length, head_dim = shape_of(tensor)
        if kv_heads == heads:
            return tensor
        rep = heads // kv_heads
        inserted = graph.call_function(aten.unsqueeze.default, (tensor, 2))
        expanded = graph.call_function(aten.expand.default, (inserted, [batch, kv_heads, rep, length, head_dim]))
        return graph.call_function(aten.reshape.default, (expanded, [batch, heads, length, head_dim]))
