"""fuse-flash-attention: MatMul/Softmax/MatMul attention becomes one top.FAttention.

TPU-MLIR's own LLM converter builds attention as `top.FAttention` (q [1,L,H,D], k/v [1,MK,KV,D],
an additive mask [1,1,L,MK], out [1,L,H·D]), whose BM1684X kernel keeps scores and
probabilities in local memory and reads grouped K/V heads without repeating them. From ONNX it
gets the ops one by one instead: the [H,L,MK] scores go to DDR and back, K/V are tiled to the
query heads, and q/k/v/out are permuted to [1,H,·,D] and back. Measured on one Llama-3.1-8B
layer at seq 512 (W4BF16): block_0 19.33M -> 18.09M cycles, block_cache_0 2.48M -> 2.35M.

Matched, from each Softmax over the last axis (the form `attention-lower` emits):

    scores = MatMul(q·scale [, Reshape to kv groups], Kᵀ)   Kᵀ: Permute [0,1,3,2] of K [1,KV,MK,D]
                                                            or [0,2,3,1] of K [1,MK,KV,D];
    probs  = Softmax(scores + mask)                         K, V maybe Tile-repeated to the heads
    out    = MatMul(probs, V) [-> Reshape] -> Permute([0,2,1,3]) -> Reshape [1,L,H·D]

q, k and v are handed over in [1,·,heads,D]: where they were permuted from that layout (or
concatenated along the sequence from such tensors, the decode cache) the originals are used,
otherwise a Permute is inserted. An attention that differs is left as it is, with the reason; so
is a multi-head prefill attention small enough that TPU-MLIR runs it faster unfused (see
LOCAL_MEMORY_ELEMENTS).
"""

from __future__ import annotations

from _mlir import (NoMatch, bool_attr, create, float_attr, int_attr, ints, is_op, name_of, producer, shape,
                   tensor_type, users)

NAME = "fuse-flash-attention"
REPEAT_OPS = ("top.Reshape", "top.Tile", "top.Unsqueeze")  # how a K/V repeat to the query heads is spelled
# BM1684X's local memory (64 lanes of 256 KiB) in 16-bit elements. A multi-head prefill attention
# whose scores fit in it runs faster unfused: layer groups keep its scores on chip, and FAttention
# costs more (bench/chip_top_passes.py, bf16: opus-mt decoder_block_0, 8 heads, +32% fused at seq
# 256 and +16% at 512, scores 1 and 4 MiB; Llama-2-7B block_0, 32 heads at 512, 16 MiB: -2.7%).
# Decode attentions, and prefill ones that repeat K/V to the query heads, gain at every published
# shape measured.
LOCAL_MEMORY_ELEMENTS = 64 * 256 * 1024 // 2


def run(block, none, context) -> dict:
    fused, skipped = [], []
    for softmax in [o.operation for o in block.operations if o.operation.name == "top.Softmax"]:
        try:
            # A dynamic net's attention is fused whatever its size: only FAttention takes a baked causal mask.
            fused.append(_fuse(softmax, none, always=context.dynamic))
        except NoMatch as reason:
            skipped.append(f"{name_of(softmax)}: {reason}")
    return {"changed": len(fused), "summary": f"fused {len(fused)} attention(s)", "fused": fused, "skipped": skipped}


def _fuse(softmax, none, always: bool = False) -> str:
    scores_shape = shape(softmax.results[0])
    if len(scores_shape) != 4 or int_attr(softmax, "axis") not in (3, -1):
        raise NoMatch(f"softmax of shape {scores_shape} over axis {int_attr(softmax, 'axis')}, not the last of 4")
    add = is_op(softmax.operands[0], "top.Add")
    if add is None or len(add.operands) != 2:
        raise NoMatch("the softmax input is not scores + mask")
    scores_value, mask = add.operands[0], add.operands[1]
    if is_op(scores_value, "top.MatMul") is None:
        scores_value, mask = mask, scores_value
    qk = is_op(scores_value, "top.MatMul")
    if qk is None:
        raise NoMatch("neither operand of the mask add is a MatMul")
    if any(bool_attr(qk, a) for a in ("hdim_is_batch", "left_transpose", "output_transpose")):
        raise NoMatch("the scores MatMul has transposed or head-batched operands")
    query, scale = _query(qk.operands[0])
    key, key_is_bshd = _key(qk)
    _, heads, steps, head_dim = _rank4(query, "query")

    readers = users(softmax.results[0])
    pv = readers[0] if len(readers) == 1 else None
    if pv is None or pv.name != "top.MatMul" or pv.operands[0] != softmax.results[0]:
        raise NoMatch("the probabilities are not read by one MatMul with V")
    value = _through(pv.operands[1], REPEAT_OPS)
    repeated = _passes_tile(pv.operands[1], value)
    if not key_is_bshd:
        key = _unrepeated_key(key, qk)
    _, second, third, _ = _rank4(key, "key")
    keys, kv_heads = (second, third) if key_is_bshd else (third, second)
    if shape(value) != [1, kv_heads, keys, head_dim] or heads % kv_heads:
        raise NoMatch(f"K ({kv_heads} heads, {keys} keys) and V {shape(value)} do not fit {heads} query heads")
    if shape(mask) != [1, 1, steps, keys]:
        raise NoMatch(f"mask {shape(mask)}: FAttention takes [1, 1, {steps}, {keys}] (one row per query position)")
    if steps > 1 and not repeated and not always and heads * steps * keys < LOCAL_MEMORY_ELEMENTS:
        raise NoMatch(f"multi-head prefill attention whose {heads} x {steps} x {keys} scores fit in local memory: "
                      "TPU-MLIR runs it faster unfused")
    out = _output(pv, steps, heads * head_dim)

    name = name_of(out)
    queries = _bshd(query, f"{name}_q", out)
    keys_in = key if key_is_bshd else _bshd(key, f"{name}_k", out)
    values_in = _bshd(value, f"{name}_v", out)
    attrs = {"scale": f"{scale!r} : f64", "batch": "1 : i64", "q_head": f"{heads} : i64",
             "kv_head": f"{kv_heads} : i64", "dim": f"{head_dim} : i64", "mq": f"{steps} : i64",
             "mk": f"{keys} : i64", "keep_dims": "false"}
    fattention = create("top.FAttention", out.results[0].type, [queries, keys_in, values_in, mask, none], attrs,
                        name, out)
    out.results[0].replace_all_uses_with(fattention.results[0])
    return f"{name}: {heads} heads / {kv_heads} kv, {steps} x {keys}, scale {scale:.6g}"


def _rank4(value, what: str) -> list[int]:
    dims = shape(value)
    if len(dims) != 4 or dims[0] != 1:
        raise NoMatch(f"{what} is {dims}, not [1, heads, length, head_dim]")
    return dims


def _query(value):
    """q·scale, maybe reshaped to [1, KV, group, D] (decode's grouped heads): (q [1,H,L,D], scale)."""
    scale, reshaped = 1.0, None
    for _ in range(2):
        made = producer(value)
        if made is not None and made.name == "top.MulConst" and scale == 1.0:
            scale, value = float_attr(made, "const_val"), made.operands[0]
        elif made is not None and made.name == "top.Reshape" and reshaped is None:
            if _joins_pairs(made):
                break  # an interleaved rotary's pairs joined into head_dim: the query as it is
            reshaped, value = made, made.operands[0]
    if reshaped is not None and shape(value)[2] != 1:
        raise NoMatch(f"the query is regrouped from {shape(value)}: only one-token queries regroup as they are")
    return value, scale


def _key(qk):
    """K behind the scores' Kᵀ: (K [1,KV,MK,D], False), or (K [1,MK,KV,D], True) when Kᵀ was permuted
    straight from that layout (TPU-MLIR merges the head and the transpose permutes into [0,2,3,1])."""
    right = qk.operands[1]
    if bool_attr(qk, "right_transpose"):
        return right, False
    permute = is_op(right, "top.Permute")
    order = ints(permute, "order") if permute is not None else None
    if order == [0, 1, 3, 2]:
        return permute.operands[0], False
    if order == [0, 2, 3, 1]:
        return permute.operands[0], True
    raise NoMatch(f"the scores MatMul's right operand is not Kᵀ (a Permute [0,1,3,2] or [0,2,3,1]; it is "
                  f"{'a ' + producer(right).name if producer(right) is not None else 'an argument'}"
                  f"{' ' + str(order) if order else ''})")


def _joins_pairs(made) -> bool:
    """A Reshape [1,H,S,a,b] -> [1,H,S,a·b]: an interleaved rotary's pairs joined into head_dim."""
    source, out = shape(made.operands[0]), shape(made.results[0])
    return made.name == "top.Reshape" and len(source) == 5 and len(out) == 4 and source[:3] == out[:3]


def _unrepeated_key(key, qk):
    """K [1,KV,MK,D] behind its repeat to the query heads. After an interleaved rotary TPU-MLIR folds the
    pairs' join into the repeat's Unsqueeze ([1,KV,MK,a,b] -> [1,KV,1,MK,a·b]): K is then that source with its
    pairs joined, a Reshape the network already makes (for past_k) or a new one."""
    while (made := producer(key)) is not None and made.name in REPEAT_OPS:
        source, out = shape(made.operands[0]), shape(made.results[0])
        if made.name == "top.Reshape" and len(source) == 5 and len(out) == 5 and out[2] == 1 and \
                source[:2] == out[:2] and source[2] == out[3]:
            joined = [1, source[1], source[2], out[4]]
            existing = next((r for r in users(made.operands[0]) if r.name == "top.Reshape"
                             and shape(r.results[0]) == joined), None)
            if existing is not None:
                return existing.results[0]
            return create("top.Reshape", tensor_type(made.operands[0], joined), [made.operands[0]],
                          {"shape": str(joined), "flatten_start_dim": "-1 : i64"}, f"{name_of(qk)}_k_joined",
                          made).results[0]
        key = made.operands[0]
    return key


def _through(value, kinds):
    while (made := producer(value)) is not None and made.name in kinds:
        value = made.operands[0]
    return value


def _passes_tile(value, source) -> bool:
    """Whether `value` is `source` repeated by a Tile (K/V heads repeated to the query heads)."""
    while value != source:
        made = producer(value)
        if made.name == "top.Tile":
            return True
        value = made.operands[0]
    return False


def _output(pv, steps: int, width: int):
    """The op whose result is the attention output as [1, L, H·D]: PV -> (Reshape) -> Permute -> Reshape."""
    tail = pv
    while len(readers := users(tail.results[0])) == 1 and readers[0].name in ("top.Reshape", "top.Permute"):
        tail = readers[0]
        if shape(tail.results[0]) == [1, steps, width]:
            return tail
    raise NoMatch(f"the output does not become [1, {steps}, {width}] through Reshape/Permute alone")


def _bshd(value, loc_name: str, before):
    """`value` [1,H,S,D] as [1,S,H,D]: the tensor it was permuted from, if it was, else the same
    permute of it that the network already makes (decode's new K, for the past_k output), else a
    new Permute."""
    made = producer(value)
    if _is_head_swap(made):
        return made.operands[0]
    if made is not None and made.name == "top.Concat" and int_attr(made, "axis") == 2:
        # the decode cache: [history ; new] along the sequence, concatenated in [1,S,H,D] instead
        parts = [_bshd(p, f"{loc_name}_{i}", before) for i, p in enumerate(made.operands)]
        _, h, s, d = shape(value)
        return create("top.Concat", tensor_type(value, [1, s, h, d]), parts,
                      {"axis": "1 : si32", "do_relu": "false", "only_merge": "false", "relu_limit": "-1.0 : f64",
                       "round_mode": '"HalfAwayFromZero"'}, loc_name, before).results[0]
    existing = _same_permute(value, made)
    if existing is not None:
        return existing.results[0]
    _, h, s, d = shape(value)
    return create("top.Permute", tensor_type(value, [1, s, h, d]), [value], {"order": "[0, 2, 1, 3]"},
                  loc_name, before).results[0]


def _same_permute(value, made):
    """A Permute [0,2,1,3] of `value` (made by `made`) already in the network, moved up to right after
    `made` so that it comes before the FAttention. A second permute of the same tensor would cost
    cycles, and TPU-MLIR merges the two, which loses the network output's name in its interpreter."""
    if made is None:  # a block argument: nothing to move the permute after
        return None
    reader = next((r for r in users(value) if _is_head_swap(r)), None)
    if reader is not None:
        reader.move_after(made)
    return reader


def _is_head_swap(operation) -> bool:
    """A Permute [0,2,1,3]: [1,S,H,D] <-> [1,H,S,D]."""
    return operation is not None and operation.name == "top.Permute" and ints(operation, "order") == [0, 2, 1, 3]
