"""merge-cache-concat: a decode block's [history ; new row] concat becomes a merge in place (no copy); so
does block_kv_i's [history ; new rows].

A decode block concatenates its K/V cache input `history_k` [1,SEQ,KV,D] with the new token's K
[1,1,KV,D] along the sequence, and attention reads the SEQ+1 rows. As an ordinary Concat, TPU-MLIR
copies the whole cache every token (40,530 cycles per concat at Llama-3.1-8B's shape). With
`only_merge`, which TPU-MLIR's own LLM converter sets on this very concat, the compiler instead
places the new row right after the cache in memory, so the concat costs nothing: the decode net's
inputs and outputs have memory of their own (`--addr_mode io_alone`), and the new row is the net's
own past_k/past_v output, which the runtime copies into its cache anyway. llm_convert sets it on
block_kv_i's concat too, which is dynamic (the runtime sets the cache's rows per launch): measured
in the simulator, tiny-llama's block_kv_i with the merge gives the same bits as without it, at
every launch length of a three-turn chat.

Matched: a top.Concat along axis 1 of two operands, the first a net input [1,S,KV,D] (the cache),
the second [1,n,KV,D] and also a net output (the new rows). Anything else is left as it is, with why.
"""

from __future__ import annotations

from mlir.ir import BoolAttr

from _mlir import NoMatch, int_attr, name_of, producer, shape, users

NAME = "merge-cache-concat"


def run(block, none, context) -> dict:
    merged, skipped = [], []
    for concat in [o.operation for o in block.operations if o.operation.name == "top.Concat"]:
        made = producer(concat.operands[0]) if len(concat.operands) else None
        if made is None or made.name != "top.Input":
            continue  # not a concat onto a net input: no cache (RoPE's halves, say)
        try:
            merged.append(_merge(concat))
        except NoMatch as reason:
            skipped.append(f"{name_of(concat)}: {reason}")
    return {"changed": len(merged), "summary": f"merged {len(merged)} cache concat(s) in place", "merged": merged,
            "skipped": skipped}


def _merge(concat) -> str:
    if len(concat.operands) != 2 or int_attr(concat, "axis") != 1:
        raise NoMatch("not two operands joined along axis 1")
    cache, new = concat.operands
    cache_shape, new_shape = shape(cache), shape(new)
    if len(cache_shape) != 4 or new_shape[0] != 1 or new_shape[2:] != cache_shape[2:]:
        raise NoMatch(f"operands {cache_shape} and {new_shape} are not a cache and new rows")
    if not any(reader.name == "func.return" for reader in users(new)):
        raise NoMatch("the new row is not a net output, so nothing would hold it after the net")
    concat.attributes["only_merge"] = BoolAttr.get(True)
    return f"{name_of(concat)}: {cache_shape[1]} cached rows + {new_shape[1]}"
