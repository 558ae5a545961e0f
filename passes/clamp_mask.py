"""clamp-mask: a block's additive mask inputs are clamped at −10000 before attention reads them.

A chip runtime writes its masks as 16-bit bit patterns, and which pattern it writes is its own
choice, not the net's. LLM-TPU's Llama3_1 demo writes 0xF0E2 (−10000 in fp16) whatever the
net's dtype; read as bf16 those bits are −5.6e29, and TPU-MLIR's bf16 attention turns a row
masked that hard everywhere (a padding row of the prefill) into NaN, which the next layer reads
through its K/V. Today's LLM-TPU demos write 0xC61C (bf16 −9984) for bf16 nets. Clamped at
−10000 (−9984 once the net is bf16), both patterns mean "masked" in both dtypes, so every
--quantize mode runs under either runtime. The runtime's own value (−10000) is left as it is.
"""

from __future__ import annotations

import torch

from graphopt.ir import NetworkGraph
from graphopt.contract import ATTENTION_MASK, BLOCKS, ENCODER_ATTENTION_MASK, MASK_VALUE
from graphopt.pass_manager import Pass, PassResult, register_pass

aten = torch.ops.aten


@register_pass
class ClampMask(Pass):
    """Clamp the additive mask inputs at −10000, so a runtime's fp16 mask bits stay finite in a bf16 net."""

    name = "clamp-mask"
    applies_to = BLOCKS
    requires = ("mask.fixed",)
    ensures = ("mask.clamped",)

    def run(self, net: NetworkGraph) -> PassResult:
        clamped = []
        for name in (ATTENTION_MASK, ENCODER_ATTENTION_MASK):
            mask = net.input(name)
            if mask is None or not mask.users:
                continue
            readers = list(mask.users)
            with net.graph.inserting_after(net.placeholders()[-1]):
                floor = net.graph.call_function(aten.clamp_min.default, (mask, MASK_VALUE))
            for reader in readers:
                reader.replace_input_with(mask, floor)
            clamped.append(name)
        return PassResult(len(clamped), f"clamped {', '.join(clamped)} at {MASK_VALUE:g}" if clamped else
                          "no mask input is read")
