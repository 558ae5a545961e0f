"""Record golden outputs with transformers (the reference), on graphopt's seeded weights.

    python -m tests.golden.record            # rewrite every golden on purpose
    graphopt golden record tiny-llama        # the same for one model (graphopt.golden)

A golden is what transformers' own `generate(do_sample=False)` produces: 32 greedy tokens
and the logits of each step. Tests compare every compiler stage against it, and compare
a live transformers run against it, so a new transformers release that changes the numbers
fails loudly instead of silently moving the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import graphopt.golden

HERE = Path(__file__).parent
NEW_TOKENS = graphopt.golden.DEFAULT_NEW_TOKENS
PROMPT = graphopt.golden.DEFAULT_PROMPT
# One per architecture the passes must handle; each is its registry name. For the encoder-decoder
# models the prompt is the source sentence and the tokens are the greedy translation.
CASES = {name: {"prompt": PROMPT} for name in ("tiny-llama", "tiny-qwen2.5", "tiny-qwen3", "tiny-mistral",
                                               "tiny-marian", "tiny-bart")}
ENCODER_DECODER = {"tiny-marian", "tiny-bart"}


def load_golden(name: str) -> tuple[dict, np.ndarray]:
    """The stored golden (graphopt.golden.Golden) as its JSON fields and its logits."""
    golden = graphopt.golden.Golden.load(HERE, name)
    return {"model": golden.model, "prompt": golden.prompt, "new_tokens": len(golden.tokens),
            "tokens": golden.tokens, "recorded_with": golden.recorded_with}, golden.logits


def record(name: str) -> dict:
    golden = graphopt.golden.record(name, HERE, prompt=CASES[name]["prompt"], new_tokens=NEW_TOKENS)
    return {"tokens": golden.tokens}


if __name__ == "__main__":
    import sys

    for case in sys.argv[1:] or CASES:  # python -m tests.golden.record [NAME ...]
        print(case, record(case)["tokens"])
