"""cross-kv-inputs: cross-attention reads its K/V from inputs `cross_k`/`cross_v` [1, SRC, kv_heads, D].

In an encoder-decoder model, cross-attention's K and V depend only on the encoder output, so the
runtime computes them once per source sentence (the `cross_kv` network) instead of in every
decoder step. This pass finds each attention whose K/V are computed from the
`encoder_hidden_states` input, makes them network inputs in the runtime's [batch, seq, heads,
head_dim] cache layout, and drops the projections, and the `encoder_hidden_states` input when
nothing else reads it. It marks those attentions as cross-attention: kv-layout and concat-cache,
which are about the self-attention cache, leave them alone.
"""

from __future__ import annotations

import torch

from graphopt.ir import NetworkGraph, shape_of
from graphopt.contract import CROSS_K, CROSS_V, DECODER_BLOCK, DECODER_BLOCK_CACHE, ENCODER_HIDDEN_STATES
from graphopt.pass_manager import Pass, PassResult, register_pass
from graphopt.passes._attention import CROSS_ATTENTION, attention_nodes, kv_names, sdpa_arg, set_sdpa_arg

aten = torch.ops.aten
ENCODER_INPUT = ENCODER_HIDDEN_STATES


@register_pass
class CrossKvInputs(Pass):
    """Make cross-attention K/V the inputs cross_k/cross_v [1,SRC,kv_heads,D], computed once per source."""

    name = "cross-kv-inputs"
    applies_to = frozenset({DECODER_BLOCK, DECODER_BLOCK_CACHE})
    requires = ("attention.canonical",)
    ensures = ("cross_kv.inputs",)

    def run(self, net: NetworkGraph) -> PassResult:
        encoder = net.input(ENCODER_INPUT)
        if encoder is None:
            raise self.cannot(net, f"the network has no '{ENCODER_INPUT}' input")
        from_encoder = net.computed_from(encoder)
        cross = [n for n in attention_nodes(net) if sdpa_arg(n, "key") in from_encoder]
        if not cross:
            raise self.cannot(net, f"no attention reads K/V computed from '{ENCODER_INPUT}'")
        for node, names in zip(cross, kv_names(CROSS_K, CROSS_V, len(cross))):
            if sdpa_arg(node, "query") in from_encoder or sdpa_arg(node, "value") not in from_encoder:
                raise self.cannot(net, f"attention '{node.name}' mixes encoder and decoder "
                                     "operands other than as cross-attention (query from the decoder, K/V from the encoder)")
            for operand, name in zip(("key", "value"), names):
                batch, kv_heads, length, head_dim = shape_of(sdpa_arg(node, operand))
                bshd = net.add_input(name, (batch, length, kv_heads, head_dim), sdpa_arg(node, operand).meta["val"].dtype)
                with net.graph.inserting_before(node):
                    set_sdpa_arg(node, operand, net.graph.call_function(aten.permute.default, (bshd, [0, 2, 1, 3])))
            node.meta[CROSS_ATTENTION] = True
        net.graph.eliminate_dead_code()
        dropped = not encoder.users
        if dropped:
            net.graph.erase_node(encoder)
        return PassResult(len(cross), f"{len(cross)} cross-attention(s) read cross_k/cross_v inputs"
                          + (f"; '{ENCODER_INPUT}' input dropped" if dropped else ""))
