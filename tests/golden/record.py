"""Record golden outputs with transformers (the reference), on graphopt's seeded weights.

    python -m tests.golden.record            # rewrite every golden on purpose

A golden is what transformers' own `generate(do_sample=False)` produces: 32 greedy tokens
and the logits of each step. Tests compare every compiler stage against it, and compare
a live transformers run against it, so a new transformers release that changes the numbers
fails loudly instead of silently moving the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

from graphopt.compiler import hf_greedy
from graphopt.models import open_model

HERE = Path(__file__).parent
NEW_TOKENS = 32
PROMPT = [1, 17, 300, 42, 5, 900, 64, 7]
# One per architecture the passes must handle; each is its registry name. For the encoder-decoder
# models the prompt is the source sentence and the tokens are the greedy translation.
CASES = {name: {"prompt": PROMPT} for name in ("tiny-llama", "tiny-qwen2.5", "tiny-qwen3", "tiny-mistral",
                                               "tiny-marian", "tiny-bart")}
ENCODER_DECODER = {"tiny-marian", "tiny-bart"}


def golden_paths(name: str) -> tuple[Path, Path]:
    return HERE / f"{name}.json", HERE / f"{name}.logits.npz"


def load_golden(name: str) -> tuple[dict, np.ndarray]:
    meta, logits = golden_paths(name)
    return json.loads(meta.read_text()), np.load(logits)["logits"]


def record(name: str) -> dict:
    prompt = CASES[name]["prompt"]
    reference = hf_greedy(open_model(name).reference_model(), prompt, NEW_TOKENS)
    meta_path, logits_path = golden_paths(name)
    meta = {"model": name, "prompt": prompt, "new_tokens": NEW_TOKENS, "tokens": reference["tokens"],
            "recorded_with": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    np.savez_compressed(logits_path, logits=np.stack(reference["logits"]).astype(np.float32))
    return meta


if __name__ == "__main__":
    import sys

    for case in sys.argv[1:] or CASES:  # python -m tests.golden.record [NAME ...]
        print(case, record(case)["tokens"])
