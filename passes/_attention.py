"""Finding attention by meaning: the call that takes q, k, v and a mask.

After `attention-canonical` every attention in a network is one
`aten.scaled_dot_product_attention` node whose k and v are in kv-heads
(`enable_gqa=True` when there are fewer kv heads than query heads). The passes that come
after it find K, V and the mask through these accessors, never through the op sequence
one transformers release happens to emit around them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.ir import NetworkGraph

SDPA = torch.ops.aten.scaled_dot_product_attention.default
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


# Set in node.meta by `cross-kv-inputs` on attentions whose K/V are the network's cross_k/cross_v
# inputs. The cache passes (kv-layout, concat-cache) are about self-attention and skip them.
CROSS_ATTENTION = "graphopt.cross_attention"


def attention_nodes(net: NetworkGraph, include_cross: bool = False) -> list[fx.Node]:
    """The network's attention calls: self-attention only, unless `include_cross`."""
    return [n for n in net.calls(SDPA) if include_cross or not n.meta.get(CROSS_ATTENTION)]


def cross_attention_nodes(net: NetworkGraph) -> list[fx.Node]:
    return [n for n in net.calls(SDPA) if n.meta.get(CROSS_ATTENTION)]


def sdpa_arg(node: fx.Node, name: str):
    index = _SDPA_ARGS.index(name)
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, _SDPA_DEFAULTS.get(name))


def set_sdpa_arg(node: fx.Node, name: str, value) -> None:
    """Rewrite one argument, normalising the call to (q, k, v) positional + keywords."""
    values = {a: sdpa_arg(node, a) for a in _SDPA_ARGS}
    values[name] = value
    node.args = (values["query"], values["key"], values["value"])
    node.kwargs = {a: values[a] for a in _SDPA_ARGS[3:] if values[a] != _SDPA_DEFAULTS[a]}


def kv_names(k: str, v: str, count: int) -> list[tuple[str, str]]:
    """`k`/`v` for the usual one attention per network; numbered `k_0`, `v_0`, ... when it has several."""
    return [(k, v)] if count == 1 else [(f"{k}_{i}", f"{v}_{i}") for i in range(count)]
