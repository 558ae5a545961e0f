"""sink-head-transpose: a one-token network computes RoPE in [1, 1, heads, D], before the head transpose.

transformers turns q/k/v [1, T, heads, D] into [1, heads, T, D] right after the projections and
rotates q and k in that layout. For one token (T = 1, a decode block) that transpose only moves an
axis of size 1, and RoPE's ops (products with cos/sin [1, 1, 1, D], slices and a concat along D,
a negation, a sum) act along D alone, so they give the same numbers before it. Computed before it,
the new K is RoPE's own output in [1, 1, KV, D]: the layout of the cache and of the past_k output,
so the permute kv-layout put on it cancels, and TPU-MLIR can write that row right after the cache
instead of copying the cache (merge-cache-concat; with the rotation after a Reshape it keeps copying).

For each transpose of axes 1 and 2 of a [1, 1, H, D] value: the ops after it that act along D, and
whose other operands broadcast the same either way (sizes 1 on axes 1 and 2), are rebuilt on the
value before the transpose; the transpose moves after them; a permute [0, 2, 1, 3] of a transpose
of axes 1 and 2 cancels.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.contract import DECODE_BLOCKS
from graphopt.ir import NetworkGraph, shape_of
from graphopt.pass_manager import Pass, PassResult, register_pass

aten = torch.ops.aten
# Ops that act element by element (operands broadcast) ...
ELEMENTWISE = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.div.Tensor}
# ... and ops that act along the last axis only (RoPE's rotate-half).
ALONG_LAST_AXIS = {aten.slice.Tensor: 1, aten.cat.default: 1}  # the position of their dim argument


def _head_transpose(node: fx.Node) -> fx.Node | None:
    """The [1,1,H,D] value `node` turns into [1,H,1,D] by a transpose of axes 1 and 2, or None."""
    if node.op != "call_function":
        return None
    swaps = ((node.target == aten.transpose.int and sorted(node.args[1:3]) == [1, 2]) or
             (node.target == aten.permute.default and list(node.args[1]) == [0, 2, 1, 3]))
    if not swaps:
        return None
    source = node.args[0]
    dims = shape_of(source)
    return source if len(dims) == 4 and dims[0] == 1 and dims[1] == 1 else None


def _acts_along_last_axis(node: fx.Node) -> bool:
    if node.target in ELEMENTWISE:
        return True
    if node.target in ALONG_LAST_AXIS:
        rank = len(shape_of(node))
        index = ALONG_LAST_AXIS[node.target]
        dim = node.args[index] if len(node.args) > index else node.kwargs.get("dim", 0)
        return dim in (-1, rank - 1)
    return False


def _swap_invariant(value) -> bool:
    """An operand that broadcasts the same against [1,H,1,D] and [1,1,H,D]: sizes 1 on axes 1 and 2."""
    if not isinstance(value, fx.Node):
        return True  # a scalar
    dims = shape_of(value)
    padded = (1,) * (4 - len(dims)) + tuple(dims)
    return len(dims) <= 4 and padded[1] == 1 and padded[2] == 1


def _region(transpose: fx.Node) -> list[fx.Node]:
    """The ops after `transpose` that can move before it, in graph order."""
    region, frontier = {transpose}, [transpose]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in region or user.op != "call_function" or not _acts_along_last_axis(user):
                continue
            operands = user.args[0] if user.target == aten.cat.default else user.args
            if all(a in region or _swap_invariant(a) for a in operands if isinstance(a, (fx.Node, int, float))
                   and not isinstance(a, bool)):
                region.add(user)
                frontier.append(user)
    return [n for n in transpose.graph.nodes if n in region and n is not transpose]


@register_pass
class SinkHeadTranspose(Pass):
    """One-token networks rotate q/k (RoPE) in [1,1,heads,D], before the head transpose, so the new K is RoPE's output."""

    name = "sink-head-transpose"
    applies_to = DECODE_BLOCKS
    # After concat-cache and kv-layout, which read K/V through the transpose; rope-table has made cos/sin
    # tables gathered by position ([1,1,1,D]: the same either way).
    requires = ("cache.concat", "rope.tabled")
    ensures = ("rope.before-head-transpose",)

    def run(self, net: NetworkGraph) -> PassResult:
        moved, cancelled = 0, 0
        for transpose in list(net.graph.nodes):
            source = _head_transpose(transpose)
            if source is None or transpose.graph is not net.graph:
                continue
            region = _region(transpose)
            if not region:
                continue
            rebuilt = {transpose: source}
            for node in region:
                with net.graph.inserting_after(node):
                    rebuilt[node] = net.graph.node_copy(node, lambda n: rebuilt.get(n, n))
                rebuilt[node].meta["val"] = node.meta["val"].transpose(1, 2)
            for node in region:
                outside = [u for u in node.users if u not in rebuilt]
                if outside:
                    with net.graph.inserting_after(rebuilt[node]):
                        back = net.graph.call_function(aten.transpose.int, (rebuilt[node], 1, 2))
                    back.meta["val"] = node.meta["val"]
                    for user in outside:
                        user.replace_input_with(node, back)
            moved += 1
        for permute in list(net.calls(aten.permute.default)):
            if list(permute.args[1]) == [0, 2, 1, 3] and isinstance(permute.args[0], fx.Node) and \
                    permute.args[0].target == aten.transpose.int and sorted(permute.args[0].args[1:3]) == [1, 2]:
                permute.replace_all_uses_with(permute.args[0].args[0])
                cancelled += 1
        net.graph.eliminate_dead_code()
        return PassResult(moved + cancelled, f"moved the ops after {moved} head transpose(s) before it; "
                                             f"{cancelled} permute(s) of a transpose cancelled")
