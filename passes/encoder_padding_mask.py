"""encoder-padding-mask: an encoder's attentions read one additive key-padding mask, built in one
known form from its `attention_mask` input.

transformers turns the encoder's [1,SRC] 0/1 `attention_mask` into a [1,1,SRC,SRC] mask with
code that changes between releases (a bool mask for SDPA in 5.x, `finfo.min` fills in 4.x).
Neither survives a 16-bit chip: a bool mask exports as Where(-inf) plus an IsNaN guard, and
`finfo(float32).min` rounds to -inf in bf16, where `0 * -inf` is NaN. This pass gives every
encoder attention the mask `(attention_mask - 1) * 10000` shaped [batch,1,1,SRC] instead: 0 over
tokens, -10000 over padding, the values of the decoder's fixed masks. Like transformers' masks
it masks padded keys only; padded query rows still attend to the tokens.

The mask it replaces must be computed from `attention_mask` alone (not from the token ids or
hidden states), so the rewrite cannot drop a mask that carries anything but padding.
"""

from __future__ import annotations

import torch

from graphopt.ir import NetworkGraph, shape_of
from graphopt.contract import ENCODER, INPUT_IDS, MASK_VALUE, SOURCE_VALID
from graphopt.pass_manager import Pass, PassResult, register_pass
from graphopt.passes._attention import attention_nodes, sdpa_arg, set_sdpa_arg

aten = torch.ops.aten
MASK_INPUT = SOURCE_VALID
IDS_INPUT = INPUT_IDS


@register_pass
class EncoderPaddingMask(Pass):
    """Give an encoder's attentions the additive padding mask (attention_mask - 1) * 10000, [1,1,1,SRC]."""

    name = "encoder-padding-mask"
    applies_to = frozenset({ENCODER})
    requires = ("attention.canonical",)
    # attention-lower needs every mask to be additive and final; for an encoder that is this one.
    ensures = ("mask.fixed",)

    def run(self, net: NetworkGraph) -> PassResult:
        valid = net.input(MASK_INPUT)
        if valid is None:
            raise self.cannot(net, f"the encoder has no '{MASK_INPUT}' input to build the "
                                 "padding mask from")
        from_mask, from_ids = net.computed_from(valid), net.computed_from(net.input(IDS_INPUT))
        attentions = attention_nodes(net, include_cross=True)
        if not attentions:
            raise self.cannot(net, "found no attention call in the encoder")
        for node in attentions:
            operand = sdpa_arg(node, "attn_mask")
            if operand is None:
                raise self.cannot(net, f"attention '{node.name}' uses no mask, so the source "
                                     f"padding would be attended to; the encoder ignores its '{MASK_INPUT}' input")
            if operand not in from_mask or operand in from_ids:
                raise self.cannot(net, f"the mask of attention '{node.name}' (by '{operand.name}') "
                                     f"is not computed from the '{MASK_INPUT}' input alone, so it is more than "
                                     "source padding")
            if sdpa_arg(node, "is_causal"):
                raise self.cannot(net, f"attention '{node.name}' is causal: not an encoder's")
        graph = net.graph
        with graph.inserting_before(attentions[0]):
            as_float = graph.call_function(aten._to_copy.default, (valid,), {"dtype": torch.float32})
            padding = graph.call_function(aten.sub.Tensor, (as_float, 1.0))
            additive = graph.call_function(aten.mul.Tensor, (padding, -MASK_VALUE))
            batch, length = shape_of(valid)
            mask = graph.call_function(aten.reshape.default, (additive, [batch, 1, 1, length]))
        for node in attentions:
            set_sdpa_arg(node, "attn_mask", mask)
        return PassResult(len(attentions), f"{len(attentions)} attention mask(s) replaced by the additive padding mask of "
                          f"'{MASK_INPUT}'")
