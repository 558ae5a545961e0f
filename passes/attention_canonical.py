"""attention-canonical: one attention form for every pass after it, with K and V in kv-heads.

transformers repeats K/V heads for grouped-query attention (`repeat_kv`: unsqueeze → expand
→ reshape, or `repeat_interleave` in other code) right before the attention call. This pass
removes that repeat and lets the attention node read the kv-head tensors directly
(`enable_gqa=True`), so `kv-layout` can expose the un-repeated K/V and `concat-cache` can
extend them along the sequence without touching shapes baked into the repeat.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.ir import NetworkGraph, shape_of
from graphopt.contract import BLOCKS, ENCODER
from graphopt.pass_manager import Pass, PassResult, register_pass
from graphopt.passes._attention import attention_nodes, sdpa_arg, set_sdpa_arg
from graphopt.passes.attention_explicit import SOFTMAX, read_attention

aten = torch.ops.aten
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_COPIES = (aten.clone.default, aten.contiguous.default)


def unrepeated(node: fx.Node) -> fx.Node | None:
    """The kv-head tensor whose heads `node` repeats, or None if `node` is no head repeat."""
    if node.op != "call_function":
        return None
    if node.target == aten.repeat_interleave.self_int and node.args[2:3] == (1,):
        return node.args[0]
    if node.target not in _RESHAPES:
        return None
    expanded = node.args[0]
    while expanded.op == "call_function" and expanded.target in _COPIES:
        expanded = expanded.args[0]
    if expanded.op != "call_function" or expanded.target != aten.expand.default:
        return None
    inserted = expanded.args[0]
    if inserted.op != "call_function" or inserted.target != aten.unsqueeze.default or inserted.args[1] != 2:
        return None
    source = inserted.args[0]
    b, kv, s, d = shape_of(source)
    eb, ekv, rep, es, ed = shape_of(expanded)
    if (eb, ekv, es, ed) != (b, kv, s, d) or shape_of(node) != (b, kv * rep, s, d):
        return None
    return source


@register_pass
class AttentionCanonical(Pass):
    """Let attention read K/V in kv-heads (enable_gqa) instead of after repeat_kv."""

    name = "attention-canonical"
    applies_to = BLOCKS | {ENCODER}
    requires = ("layout.free",)  # it swaps attention operands, which a view would pin to their old strides
    ensures = ("attention.canonical",)
    hint = ("graphopt finds attention as torch's scaled_dot_product_attention, or written out as a product of "
            "queries and keys, a scale, a mask, a softmax and a product with values (attention-explicit).")

    def run(self, net: NetworkGraph) -> PassResult:
        attentions = attention_nodes(net, include_cross=True)
        if not attentions:
            softmaxes = [read_attention(s) for s in net.calls(*SOFTMAX)]
            why = "; ".join(r for r in softmaxes if isinstance(r, str)) or "it has no softmax either"
            raise self.cannot(net, f"found no attention (no scaled_dot_product_attention, and no attention written out "
                                 f"that attention-explicit could read: {why})")
        stripped, grouped = 0, 0
        for node in attentions:
            q_heads = shape_of(sdpa_arg(node, "query"))[1]
            for operand in ("key", "value"):
                source = unrepeated(sdpa_arg(node, operand))
                if source is not None:
                    set_sdpa_arg(node, operand, source)
                    stripped += 1
            kv_heads = shape_of(sdpa_arg(node, "key"))[1]
            if shape_of(sdpa_arg(node, "value"))[1] != kv_heads or q_heads % kv_heads:
                raise self.cannot(net, f"attention '{node.name}' has {q_heads} query heads, "
                                     f"{kv_heads} key heads and {shape_of(sdpa_arg(node, 'value'))[1]} value heads, "
                                     "and its K/V head repeat is not one graphopt recognises")
            if kv_heads != q_heads and not sdpa_arg(node, "enable_gqa"):
                set_sdpa_arg(node, "enable_gqa", True)
                grouped += 1
        return PassResult(stripped + grouped, f"{len(attentions)} attention(s), {stripped} head repeat(s) removed")
