"""concat-cache: turn a one-token block into the decode network `block_cache_i` (and a chunk's block
into the history-KV prefill `block_kv_i`: the same rewrite for T new rows instead of one).

Adds inputs `history_k`/`history_v` [1, SEQ, KV, D] (the runtime's cache for this layer) and
concatenates them in front of the new token's K/V before attention, so attention sees
SEQ+1 keys and the mask input becomes [1, 1, 1, SEQ+1] ([1, 1, T, SEQ+T]). The block's past_k/past_v
outputs stay the new tokens' K/V only: the runtime writes them into its cache after the history.
Order matters: runs after `kv-layout` (which must expose the new K/V, not the concatenation)
and after `fixed-mask` (whose input this pass widens).
"""

from __future__ import annotations

import torch

from graphopt.ir import NetworkGraph, shape_of
from graphopt.contract import ATTENTION_MASK, HISTORY_BLOCKS, HISTORY_K, HISTORY_V
from graphopt.pass_manager import Pass, PassResult, register_pass
from graphopt.passes._attention import attention_nodes, kv_names, sdpa_arg, set_sdpa_arg

aten = torch.ops.aten


@register_pass
class ConcatCache(Pass):
    """Decode form: concatenate history_k/history_v [1,SEQ,KV,D] inputs in front of the new K/V."""

    name = "concat-cache"
    applies_to = HISTORY_BLOCKS  # the decode blocks (one new row) and block_kv_i (a chunk of them)
    requires = ("attention.canonical", "kv.exposed", "mask.fixed")
    ensures = ("cache.concat",)

    def run(self, net: NetworkGraph) -> PassResult:
        history = net.seq_length
        attentions = attention_nodes(net)
        for node, names in zip(attentions, kv_names(HISTORY_K, HISTORY_V, len(attentions))):
            for operand, name in zip(("key", "value"), names):
                new = sdpa_arg(node, operand)
                batch, kv_heads, steps, head_dim = shape_of(new)
                cache = net.add_input(name, (batch, history, kv_heads, head_dim), new.meta["val"].dtype)
                with net.graph.inserting_before(node):
                    bhsd = net.graph.call_function(aten.permute.default, (cache, [0, 2, 1, 3]))
                    joined = net.graph.call_function(aten.cat.default, ([bhsd, new], 2))
                set_sdpa_arg(node, operand, joined)
        batch, heads, steps, _ = shape_of(net.input(ATTENTION_MASK))
        net.set_input_shape(ATTENTION_MASK, (batch, heads, steps, history + steps))
        return PassResult(len(attentions), f"{len(attentions)} attention(s) read {history} cached positions + {steps} new")
