"""fixed-mask: the additive attention mask is the network's `attention_mask` input, nothing built inside.

The runtime (LLM-TPU's chat demo) builds the causal mask itself and passes it in with a
fixed shape, [1,1,SEQ,SEQ] for prefill and [1,1,1,SEQ+1] for decode, −10000 where masked.
This pass wires every attention's mask operand straight to that input (skipping no-op
slices, replacing `is_causal=True`). A mask the network builds itself from positions and
constants (a hand-written model's `arange(t) <= position`) is read by what it computes: run on
the positions of prompts of several lengths, it must let each prompt row see exactly the keys the
runtime's causal mask lets it see; then the input replaces it, else the pass says how it
differs. It then refuses any mask-building op left in the network (arange, cumsum,
comparisons, tril/triu, where, masked_fill) that is computed from positions and constants
alone. The same ops computed from the hidden states are an
activation, such as Apertus' xIELU (`where(x > 0, ...)`), not a mask. A cross-attention
(see cross-kv-inputs) takes the `encoder_attention_mask` input [1,1,steps,SRC] instead.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.ir import NetworkGraph, shape_of
from graphopt.contract import (ATTENTION_MASK, BLOCKS, ENCODER_ATTENTION_MASK, INPUT_STATES, MASK_VALUE, POSITION_IDS,
                               causal_mask)
from graphopt.pass_manager import Pass, PassResult, register_pass
from graphopt.passes._attention import attention_nodes, cross_attention_nodes, sdpa_arg, set_sdpa_arg

aten = torch.ops.aten
MASK_INPUT = ATTENTION_MASK
ENCODER_MASK_INPUT = ENCODER_ATTENTION_MASK  # cross-attention's [1, 1, steps, SRC] additive mask
HIDDEN_INPUT = INPUT_STATES
POSITION_INPUT = POSITION_IDS

MASK_BUILDING_OPS = {
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.cumsum.default,
    aten.lt.Tensor, aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar,
    aten.ge.Tensor, aten.ge.Scalar, aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar,
    aten.tril.default, aten.triu.default, aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor,
}


def _through_noop_slices(node: fx.Node) -> fx.Node:
    while (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.slice.Tensor
           and shape_of(node) == shape_of(node.args[0])):
        node = node.args[0]
    return node


@register_pass
class FixedMask(Pass):
    """Make the attention mask the fixed-shape `attention_mask` input; no mask-building ops remain."""

    name = "fixed-mask"
    applies_to = BLOCKS
    # After cross-kv-inputs, which marks the cross-attentions (they take the source mask instead).
    requires = ("attention.canonical", "cross_kv.inputs")
    ensures = ("mask.fixed",)
    hint = ("The runtime builds the causal mask itself and passes it in: a block must take its additive mask "
            "from the attention_mask input, not build one from positions.")

    def run(self, net: NetworkGraph) -> PassResult:
        mask = net.input(MASK_INPUT)
        if mask is None:
            raise self.cannot(net, f"the network has no '{MASK_INPUT}' input")
        rewired = 0
        for node in attention_nodes(net):
            operand = sdpa_arg(node, "attn_mask")
            if operand is None and sdpa_arg(node, "is_causal"):
                set_sdpa_arg(node, "is_causal", False)
            elif operand is None:
                raise self.cannot(net, f"attention '{node.name}' uses no mask at all")
            elif _through_noop_slices(operand) is not mask and (why := self._not_causal(net, operand)):
                raise self.cannot(net, f"the mask of attention '{node.name}' is computed inside the network (by "
                                     f"'{operand.name}') and is not the causal mask the '{MASK_INPUT}' input "
                                     f"holds: {why}")
            if operand is not mask:
                set_sdpa_arg(node, "attn_mask", mask)
                rewired += 1
        for node in cross_attention_nodes(net):
            rewired += self._wire_cross_attention_mask(net, node)
        net.graph.eliminate_dead_code()
        activations = net.computed_from(net.input(HIDDEN_INPUT))
        builders = sorted({str(n.target) for n in net.calls(*MASK_BUILDING_OPS) if n not in activations})
        if builders:
            raise self.cannot(net, "ops that build a mask from positions remain after the "
                                 f"attention masks were rewired: {', '.join(builders)}")
        return PassResult(rewired, f"{rewired} mask operand(s) rewired to '{MASK_INPUT}' or '{ENCODER_MASK_INPUT}'")

    @staticmethod
    def _not_causal(net: NetworkGraph, operand: fx.Node) -> str | None:
        """None when `operand`, a mask computed from the positions and constants alone, lets every prompt row i
        see exactly keys 0..i (run on the positions the runtime writes for prompts of 1, 2, half, all but one
        and all of the network's rows, the rest padding); else how it differs."""
        allowed = {net.input(POSITION_INPUT), net.input(MASK_INPUT)}
        reads = [p for p in net.placeholders() if operand in net.computed_from(p)]
        if other := [p.name for p in reads if p not in allowed]:
            return f"it is computed from {', '.join(other)}, not from the positions alone"
        rows = shape_of(net.input(POSITION_INPUT))[1] if net.input(POSITION_INPUT) is not None else 0
        evaluate = _cut(net, operand)
        for length in sorted({1, 2, rows // 2, rows - 1, rows} & set(range(1, rows + 1))):
            positions = torch.zeros(1, rows, dtype=torch.int64)
            positions[0, :length] = torch.arange(length)
            feeds = {POSITION_INPUT: positions}
            if net.input(MASK_INPUT) is not None:
                feeds[MASK_INPUT] = torch.from_numpy(causal_mask(rows, shape_of(net.input(MASK_INPUT))[-1], length))
            visible = _visibility(evaluate(feeds))
            if visible is None:
                return f"its values do not read as one [queries, keys] mask (shape {list(shape_of(operand))})"
            expected = torch.ones(length, visible.shape[1], dtype=torch.bool).tril()
            if not torch.equal(visible[:length], expected):
                i, j = (visible[:length] != expected).nonzero()[0].tolist()
                return (f"for a {length}-token prompt it lets row {i} {'see' if visible[i, j] else 'not see'} key "
                        f"{j}, which the runtime's causal mask does {'not ' if visible[i, j] else ''}allow")
        return None

    def _wire_cross_attention_mask(self, net: NetworkGraph, node: fx.Node) -> int:
        """Cross-attention masks source padding: it takes the `encoder_attention_mask` input."""
        mask = net.input(ENCODER_MASK_INPUT)
        if mask is None:
            raise self.cannot(net, f"cross-attention '{node.name}' has no '{ENCODER_MASK_INPUT}' "
                                 "input to mask the source padding with")
        operand = sdpa_arg(node, "attn_mask")
        if operand is not None and _through_noop_slices(operand) is not mask:
            raise self.cannot(net, f"the mask of cross-attention '{node.name}' is computed inside "
                                 f"the network (by '{operand.name}'), not taken from the '{ENCODER_MASK_INPUT}' input")
        if operand is mask:
            return 0
        set_sdpa_arg(node, "attn_mask", mask)
        return 1


def _cut(net: NetworkGraph, node: fx.Node):
    """`feeds -> node's value`: the part of the network's graph `node` is computed by (the inputs not fed: zeros)."""
    gm = net.subgraph([node])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def evaluate(feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        args = [feeds[p.name] if p.name in feeds else torch.zeros(shape_of(p), dtype=p.meta["val"].dtype)
                for p in placeholders]
        with torch.no_grad():
            return gm(*args)[0]

    return evaluate


def _visibility(mask: torch.Tensor) -> torch.Tensor | None:
    """[queries, keys] True where a query may look, from a boolean (True: look) or additive (0: look) mask
    that is the same for every batch and head; None where it is not."""
    if mask.dim() < 2:
        return None
    visible = mask if mask.dtype == torch.bool else mask > MASK_VALUE / 2
    flat = visible.reshape(-1, *visible.shape[-2:])
    return flat[0] if bool((flat == flat[0]).all()) else None
