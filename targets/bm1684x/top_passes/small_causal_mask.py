"""small-causal-mask: a dynamic net's baked causal mask becomes TPU-MLIR's small mask, which holds at any length.

A dynamic prefill net (`--dynamic` block_i, `--history-kv` block_kv_i) takes no mask: the runtime
sets its lengths per launch and nothing else. Its ONNX holds the mask of its largest shape as a
constant instead (deploy.py puts graphopt.contract.baked_mask there: query i sees key j <= i +
keys - steps, every cache row and a causal chunk). That constant is right at the compiled lengths
only. TPU-MLIR's FAttention takes a [S, S] upper-triangular "small mask" instead (mask_size S = four
times the NPU count, 256 on BM1684X), which its kernel applies at whatever lengths the net runs,
aligned to the last key: what llm_convert gives its dynamic blocks (LlmConverter.create_small_attn_mask).

Matched: a top.FAttention whose mask operand is a weight of exactly that pattern (masked: below
MASKED). A dynamic net with any other mask cannot run at other lengths, so it is an error here.
"""

from __future__ import annotations

import numpy as np
from mlir.ir import Attribute, F32Type, RankedTensorType

from _mlir import NoMatch, create, int_attr, name_of, producer

NAME = "small-causal-mask"
MASK_SIZE = 256  # BM1684X: 64 NPUs x 4 (LlmConverter.MASK_SIZE)
MASKED = -1000.0  # a baked mask holds −10000 where masked (graphopt.contract.MASK_VALUE)
WEIGHT = "graphopt_small_causal_mask"


def run(block, none, context) -> dict:
    if not context.dynamic:
        return {"changed": 0, "summary": "not a dynamic net", "skipped": []}
    attentions = [o.operation for o in block.operations if o.operation.name == "top.FAttention"]
    if not attentions:
        raise RuntimeError(f"{NAME}: a dynamic net must compute its attention as top.FAttention (only it takes a "
                           "baked causal mask), and this one has none: fuse-flash-attention left it unfused.")
    small, changed = None, []
    for attention in attentions:
        try:
            steps, keys = _check_baked(attention, context.weights)
        except NoMatch as reason:
            raise RuntimeError(f"{NAME}: {name_of(attention)}: {reason}; a dynamic net takes no mask, so its "
                               "attention must be causal over its rows after all of its cache rows.") from None
        if small is None:
            context.weights.add(WEIGHT, np.triu(np.full((MASK_SIZE, MASK_SIZE), -1.0e9, np.float32), k=1))
            small = create("top.Weight", RankedTensorType.get([MASK_SIZE, MASK_SIZE], F32Type.get()), [], {}, WEIGHT,
                           block.operations[1]).results[0]  # after top.None, before any reader
        attention.operands[3] = small
        attention.attributes["mask_size"] = Attribute.parse(f"{MASK_SIZE} : si32")
        changed.append(f"{name_of(attention)}: {steps} rows x {keys} keys")
    return {"changed": len(changed), "summary": f"{len(changed)} baked causal mask(s) made the {MASK_SIZE}x{MASK_SIZE} "
            "small mask", "masks": changed, "skipped": []}


def _check_baked(attention, weights) -> tuple[int, int]:
    steps, keys = int_attr(attention, "mq"), int_attr(attention, "mk")
    weight = producer(attention.operands[3])
    if weight is None or weight.name != "top.Weight":
        raise NoMatch("its mask is not a constant")
    mask = np.asarray(weights[name_of(weight)]).reshape(-1, keys)
    if mask.shape[0] != steps:
        raise NoMatch(f"its mask has {mask.shape[0]} rows, not {steps}")
    rows, cols = np.indices((steps, keys))
    hidden = cols > rows + (keys - steps)
    if not (np.array_equal(mask < MASKED, hidden) and not mask[~hidden].any()):
        raise NoMatch("its mask is not causal after the cache")
    return steps, keys
