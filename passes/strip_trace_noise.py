"""strip-trace-noise: drop what export leaves for its own checking, so matchers see the dataflow."""

from __future__ import annotations

import torch

from graphopt.ir import NetworkGraph
from graphopt.pass_manager import Pass, PassResult, register_pass

aten = torch.ops.aten

# Nodes that only check things at run time; they have no users.
_CHECKS = (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default)
# Conversions that are the identity when they keep dtype. (Clones are not: a later `view`
# may need the contiguous copy.)
_IDENTITY_IF_SAME_DTYPE = (aten._to_copy.default, aten.to.dtype)
# Aliases are the identity in export's functional inference IR. A no-op slice such as
# transformers 4.x's `attention_mask[:, :, :, : key.shape[-2]]` decomposes to one.
_ALIASES = (aten.alias.default,)


@register_pass
class StripTraceNoise(Pass):
    """Remove runtime asserts, aliases and same-dtype conversions that torch.export leaves in the graph."""

    name = "strip-trace-noise"
    ensures = ("trace.clean",)

    def run(self, net: NetworkGraph) -> PassResult:
        removed = 0
        for node in net.calls(*_CHECKS):
            net.graph.erase_node(node)
            removed += 1
        for node in net.calls(*_IDENTITY_IF_SAME_DTYPE):
            source = node.args[0]
            if node.meta["val"].dtype == source.meta["val"].dtype:
                node.replace_all_uses_with(source)
                net.graph.erase_node(node)
                removed += 1
        for node in net.calls(*_ALIASES):
            node.replace_all_uses_with(node.args[0])
            net.graph.erase_node(node)
            removed += 1
        return PassResult(removed, f"removed {removed} nodes")
