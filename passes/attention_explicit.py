"""attention-explicit: attention written out as tensor ops becomes the one attention call the passes read.

transformers' eager attention and hand-written models spell attention as ops: a product of queries and
keys, a scale, a mask (added, or applied with masked_fill / where), a softmax (with or without an fp32
upcast, dropout in eval), a product with values. From each softmax, this pass reads that sequence (the
rules below, as data) and replaces it with `aten.scaled_dot_product_attention(q, k, v, attn_mask, scale)`,
the form attention-canonical and every pass after it read. A softmax that is not attention (a router's)
is left alone, and the report says why; attention-canonical names the reason when a network ends up with
no attention at all.

Every run compares the traced network's outputs with the rewritten one's ("fx-rewritten vs traced"), so
each rewrite is proven on the traced shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.contract import BLOCKS, ENCODER
from graphopt.ir import NetworkGraph, shape_of
from graphopt.pass_manager import Pass, PassResult, register_pass
from graphopt.passes._attention import SDPA

aten = torch.ops.aten

SOFTMAX = (aten.softmax.int, aten._softmax.default)
# Ops that leave attention's values as they are: dtype casts (the fp32 upcast and back), copies. (Dropout in
# eval is not traced at all.)
PASS_THROUGH = (aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.clone.default,
                aten.contiguous.default)
MATMUL = (aten.matmul.default,)
SCALES = {aten.mul.Tensor: lambda c: c, aten.mul.Scalar: lambda c: c,
          aten.div.Tensor: lambda c: 1.0 / c, aten.div.Scalar: lambda c: 1.0 / c}
ADD_MASK = (aten.add.Tensor,)
FILL_MASK = (aten.masked_fill.Scalar, aten.masked_fill.Tensor)  # (scores, masked, value)
WHERE_MASK = (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)  # (condition, a, b)
NEGATIONS = (aten.bitwise_not.default, aten.logical_not.default)
# Ops between the scores and the softmax that attention's one call cannot express.
SOFT_CAP = (aten.tanh.default,)
# A fill value at most this low means "masked" (exp of it minus any score is 0 in fp32): -inf, finfo.min, -1e4 ...
MASKED_BELOW = -1e4


@dataclass
class Explicit:
    """One attention written out: its operands, its mask (and how it reads), its scale, its output."""

    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: fx.Node | None
    mask_means: str  # "add" (an additive mask), "keep" (True: may look) or "hide" (True: masked)
    scale: float
    output: fx.Node


def _through(node: fx.Node) -> fx.Node:
    """Back through the ops that leave the values as they are."""
    while node.op == "call_function" and node.target in PASS_THROUGH:
        node = node.args[0]
    return node


def _forward(node: fx.Node) -> fx.Node | None:
    """Forward through them, while each has one user."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.target not in PASS_THROUGH:
            return user
        node = user
    return None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _transposed_last(node: fx.Node) -> fx.Node | None:
    """The tensor `node` is with its last two axes swapped (K for Kᵀ), or None."""
    if node.op != "call_function":
        return None
    rank = len(shape_of(node))
    if node.target == aten.transpose.int:
        axes = {a % rank for a in node.args[1:3]}
        return node.args[0] if axes == {rank - 2, rank - 1} else None
    if node.target == aten.permute.default:
        order = [a % rank for a in node.args[1]]
        return node.args[0] if order == [*range(rank - 2), rank - 1, rank - 2] else None
    return None


def read_attention(softmax: fx.Node) -> Explicit | str:
    """The attention `softmax` is the middle of, or why it is not attention (which node breaks the pattern)."""
    rank = len(shape_of(softmax))
    if softmax.args[1] % rank != rank - 1:
        return f"softmax '{softmax.name}' is not over the last axis"
    product = _forward(softmax)
    if product is None or product.target not in MATMUL or _through(product.args[0]) is not softmax:
        used_by = ", ".join(f"'{u.name}'" for u in softmax.users)
        return f"softmax '{softmax.name}' is not multiplied by values (used by {used_by})"
    scores, mask, means = _through(softmax.args[0]), None, "add"
    if scores.target in ADD_MASK:
        a, b = scores.args[:2]
        scores, mask = (a, b) if _is_scores(a) else (b, a) if _is_scores(b) else (None, None)
        if scores is None:
            return f"softmax '{softmax.name}' reads '{softmax.args[0].name}', a sum of which no side is a product of queries and keys"
    elif scores.target in FILL_MASK:
        if (_number(scores.args[2]) or 0.0) > MASKED_BELOW:
            return f"'{scores.name}' fills in {scores.args[2]}, not a masking value"
        scores, mask, means = scores.args[0], scores.args[1], "hide"
    elif scores.target in WHERE_MASK:
        condition, a, b = scores.args[:3]
        if _is_scores(a) and (_number(b) or 0.0) <= MASKED_BELOW:
            scores, mask, means = a, condition, "keep"
        elif _is_scores(b) and (_number(a) or 0.0) <= MASKED_BELOW:
            scores, mask, means = b, condition, "hide"
        else:
            return f"'{scores.name}' selects between other values than the scores and a masking value"
    scale = 1.0
    scores = _through(scores)
    while scores.target in SCALES and _number(scores.args[1]) is not None:
        scale *= SCALES[scores.target](_number(scores.args[1]))
        scores = _through(scores.args[0])
    if scores.target in SOFT_CAP:
        return (f"the scores are soft-capped ('{scores.name}', tanh) before the softmax, which attention's one call "
                "cannot express")
    if scores.target not in MATMUL:
        return f"the scores of softmax '{softmax.name}' come from '{scores.name}' ({scores.target}), not a product of queries and keys"
    key = _transposed_last(scores.args[1])
    if key is None:
        return f"'{scores.name}' multiplies queries by '{scores.args[1].name}', which is not keys with their last two axes swapped"
    query, value = scores.args[0], product.args[1]
    if not len(shape_of(query)) == len(shape_of(key)) == len(shape_of(value)) == 4:
        return f"'{scores.name}' is not over [batch, heads, sequence, head_dim] tensors"
    return Explicit(query, key, value, mask, means, scale, product)


def _is_scores(node) -> bool:
    """Whether `node` is (after scales and casts) a product of queries and keys, or soft-capped scores (which
    read_attention then names as what stops it)."""
    if not isinstance(node, fx.Node):
        return False
    node = _through(node)
    while node.target in SCALES and _number(node.args[1]) is not None:
        node = _through(node.args[0])
    return node.target in SOFT_CAP or (node.target in MATMUL and _transposed_last(node.args[1]) is not None)


def rewrite(net: NetworkGraph, found: Explicit) -> fx.Node:
    """Replace the written-out attention with one attention call (its mask as SDPA reads it: additive, or
    True where a query may look)."""
    graph = net.graph
    with graph.inserting_before(found.output):
        mask = found.mask
        if mask is not None and found.mask_means == "hide":
            negated = mask.op == "call_function" and mask.target in NEGATIONS
            mask = mask.args[0] if negated else graph.call_function(aten.logical_not.default, (mask,))
            if not negated:
                mask.meta["val"] = torch.logical_not(found.mask.meta["val"])
        kwargs = {"scale": found.scale} | ({"attn_mask": mask} if mask is not None else {})
        attention = graph.call_function(SDPA, (found.query, found.key, found.value), kwargs)
    attention.meta = dict(found.output.meta)
    found.output.replace_all_uses_with(attention)
    return attention


@register_pass
class AttentionExplicit(Pass):
    """Attention written out (q @ kᵀ, a scale, a mask, softmax, @ v) becomes one attention call."""

    name = "attention-explicit"
    applies_to = BLOCKS | {ENCODER}
    ensures = ("attention.called",)

    def run(self, net: NetworkGraph) -> PassResult:
        found, skipped = [], []
        for softmax in net.calls(*SOFTMAX):
            read = read_attention(softmax)
            (found if isinstance(read, Explicit) else skipped).append(read)
        for attention in found:
            rewrite(net, attention)
        if found:
            net.graph.eliminate_dead_code()
        return PassResult(len(found), f"{len(found)} written-out attention(s) made one call"
                          + (f"; not attention: {'; '.join(skipped)}" if skipped else ""))
