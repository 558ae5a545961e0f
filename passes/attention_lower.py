"""attention-lower: spell attention as MatMul/Softmax for ONNX opset ≤ 17, which has no attention op.

Grouped-query K/V are repeated to the query heads here, at the very end, after every pass
that needed them in kv-heads. The form `softmax(q·kᵀ·scale + mask)·v` is the one
TPU-MLIR's ONNX importer reads as plain MatMul/Mul/Add/Softmax.
"""

from __future__ import annotations

import math

import torch

from graphopt.errors import PassMatchError
from graphopt.ir import NetworkGraph, shape_of
from graphopt.pass_manager import BLOCKS, Pass, register_pass
from graphopt.passes._attention import attention_nodes, sdpa_arg

aten = torch.ops.aten


@register_pass
class AttentionLower(Pass):
    """Lower attention to repeat-kv + MatMul/Mul/Add/Softmax/MatMul (ONNX has no attention op ≤ 17)."""

    name = "attention-lower"
    applies_to = BLOCKS | {"encoder"}
    requires = ("mask.fixed",)
    ensures = ("attention.lowered",)

    def run(self, net: NetworkGraph) -> str:
        attentions = attention_nodes(net, include_cross=True)
        graph = net.graph
        for node in attentions:
            query, key, value = (sdpa_arg(node, a) for a in ("query", "key", "value"))
            mask, scale = sdpa_arg(node, "attn_mask"), sdpa_arg(node, "scale")
            if sdpa_arg(node, "is_causal") or sdpa_arg(node, "dropout_p"):
                raise PassMatchError(self.name, net.name, f"attention '{node.name}' still has is_causal or dropout")
            batch, heads, _, head_dim = shape_of(query)
            with graph.inserting_before(node):
                key, value = (self._repeat_heads(graph, t, heads) for t in (key, value))
                key_t = graph.call_function(aten.transpose.int, (key, -2, -1))
                scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
                # Scale the query, not the scores: [heads, steps, D] multiplies instead of
                # [heads, steps, keys], and in 16 bits the large scores are rounded once less.
                if scale != 1.0:  # 1 when a pass folded it into the weights (examples/passes/fold_attention_scale.py)
                    query = graph.call_function(aten.mul.Tensor, (query, scale))
                scores = graph.call_function(aten.matmul.default, (query, key_t))
                if mask is not None:
                    scores = graph.call_function(aten.add.Tensor, (scores, mask))
                probs = graph.call_function(aten.softmax.int, (scores, -1))
                out = graph.call_function(aten.matmul.default, (probs, value))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        return f"lowered {len(attentions)} attention(s)"

    @staticmethod
    def _repeat_heads(graph, tensor, heads: int):
        batch, kv_heads, length, head_dim = shape_of(tensor)
        if kv_heads == heads:
            return tensor
        rep = heads // kv_heads
        inserted = graph.call_function(aten.unsqueeze.default, (tensor, 2))
        expanded = graph.call_function(aten.expand.default, (inserted, [batch, kv_heads, rep, length, head_dim]))
        return graph.call_function(aten.reshape.default, (expanded, [batch, heads, length, head_dim]))
