"""fold-attention-scale: fold attention's 1/sqrt(head_dim) into the query projection's weights.

Attention computes softmax(q·kᵀ·s + mask)·v. When the query is a linear function of one
projection, q = f(x·Wᵀ + b) with f made of reshapes, transposes, slices, negations, products
with tensors that do not depend on the projection, and sums of such terms (RoPE is one), then
f(x·(sW)ᵀ + sb) = s·q. So the scale can live in the weights, for free, and the network loses a
multiply per attention on every call. A query that is not linear in the projection (Qwen3
normalises q per head, which undoes any scale) is left alone, and the note says why.

Run it with:  graphopt run tiny-llama --pass-file examples/passes/fold_attention_scale.py
It places itself before attention-lower (`insert_before`), which then emits no multiply for a scale of 1.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from graphopt.ir import NetworkGraph, shape_of
from graphopt.pass_manager import BLOCKS, Pass, PassResult, register_pass
from graphopt.passes._attention import attention_nodes, sdpa_arg, set_sdpa_arg

aten = torch.ops.aten

# Ops that are linear in each of their inputs: scaling the input scales the output.
LINEAR_OPS = {aten.reshape.default, aten.view.default, aten.transpose.int, aten.permute.default, aten.slice.Tensor,
              aten.neg.default, aten.cat.default, aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default,
              aten.expand.default, aten.select.int, aten.contiguous.default}
SUMS = {aten.add.Tensor, aten.sub.Tensor}  # linear when both terms scale
PRODUCTS = {aten.mul.Tensor}  # linear when exactly one factor scales


@register_pass
class FoldAttentionScale(Pass):
    """Fold the attention scale into the query projection's weights (and bias)."""

    name = "fold-attention-scale"
    applies_to = BLOCKS | {"encoder"}
    requires = ("attention.canonical",)
    ensures = ("attention.scale_folded",)
    insert_before = "attention-lower"  # where it goes, unless --insert-after/--insert-before say otherwise

    def run(self, net: NetworkGraph) -> PassResult:
        folded, skipped = 0, []
        for node in attention_nodes(net, include_cross=True):
            reason = self._fold(net, node)
            if reason:
                skipped.append(f"'{node.name}': {reason}")
            else:
                folded += 1
        note = f"folded the scale of {folded} attention(s) into their query projection"
        return PassResult(folded, note + (f"; left {len(skipped)} alone: {'; '.join(skipped)}" if skipped else ""))

    def _fold(self, net: NetworkGraph, attention: fx.Node) -> str | None:
        """Fold one attention's scale; None when done, else why not."""
        scale = sdpa_arg(attention, "scale")
        scale = 1.0 / math.sqrt(shape_of(attention.args[0])[-1]) if scale is None else float(scale)
        if scale == 1.0:
            return "its scale is already 1"
        query = sdpa_arg(attention, "query")
        projection, path = _linear_source(query)
        if projection is None:
            return path  # the reason
        # Every value on the path must flow only into the query: a second consumer would see the scale.
        for value in path:
            if any(user not in path and user is not attention for user in value.users):
                return f"'{value.name}' on the query's path is also used outside it"
        if query in (sdpa_arg(attention, "key"), sdpa_arg(attention, "value")):
            return "the query is also its key or value"
        with net.graph.inserting_before(projection):
            args = list(projection.args)
            for index in range(1, len(args)):  # weight, bias
                tensor = _tensor(net, args[index])
                scaled = (tensor.to(torch.float32) * scale).to(tensor.dtype)
                args[index] = net.constant(f"{args[index].target.replace('.', '_')}_scaled", scaled, projection)
            projection.args = tuple(args)
        set_sdpa_arg(attention, "scale", 1.0)
        return None


def _linear_source(query: fx.Node) -> tuple[fx.Node | None, set[fx.Node] | str]:
    """(the projection the query is linear in, the nodes between them), or (None, why not)."""
    path, stack, sources = set(), [query], set()
    while stack:
        node = stack.pop()
        if node in path:
            continue
        path.add(node)
        if node.op == "call_function" and node.target == aten.linear.default:
            if not all(a.op == "get_attr" for a in node.args[1:]):
                return None, f"the projection '{node.name}' does not multiply by a stored weight"
            sources.add(node)
            continue
        if node.op != "call_function":
            return None, f"the query comes from the input '{node.name}', not from a projection"
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if node.target in LINEAR_OPS or node.target in SUMS:
            stack += inputs
        elif node.target in PRODUCTS:
            factors = [a for a in node.args if isinstance(a, fx.Node)]
            scaled = [a for a in factors if _reaches_projection(a)]
            if len(scaled) != 1:
                return None, f"'{node.name}' multiplies {len(scaled)} factors that depend on the projection"
            stack.append(scaled[0])
        else:
            return None, f"'{node.name}' ({node.target}) is not linear in the query"
    if len(sources) != 1:
        return None, f"the query comes from {len(sources)} projections"
    return sources.pop(), path - sources


def _reaches_projection(node: fx.Node) -> bool:
    """Whether `node` is computed from a Linear (so scaling that Linear would scale it)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target == aten.linear.default:
            return True
        stack += n.all_input_nodes
    return False


def _tensor(net: NetworkGraph, node: fx.Node) -> torch.Tensor:
    owner, _, attr = node.target.rpartition(".")
    return getattr(net.gm.get_submodule(owner) if owner else net.gm, attr)
