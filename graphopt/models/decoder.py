"""The decoder-only adapter: where a Hugging Face causal LM keeps its networks' modules.

Every network graphopt emits for a decoder-only model is built from these five parts.
Llama, Qwen2/3 and Mistral name them the same way; a user's own model declares them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from graphopt.errors import GraphoptError


@dataclass
class DecoderParts:
    embed: nn.Module  # input_ids -> hidden states
    layers: nn.ModuleList  # the decoder blocks
    norm: nn.Module  # final norm before the head
    head: nn.Module  # hidden -> logits
    rotary: nn.Module  # (hidden, position_ids) -> (cos, sin)


def decoder_parts(model: nn.Module) -> DecoderParts:
    base = getattr(model, "base_model", model)
    found = {
        "embed": model.get_input_embeddings(),
        "layers": getattr(base, "layers", None),
        "norm": getattr(base, "norm", None),
        "head": model.get_output_embeddings(),
        "rotary": getattr(base, "rotary_emb", None),
    }
    missing = [k for k, v in found.items() if v is None]
    if missing or not isinstance(found["layers"], nn.ModuleList):
        raise GraphoptError(
            f"graphopt's decoder adapter does not recognise {type(model).__name__}: it found no "
            f"{', '.join(missing or ['layers list'])}. Supported decoder-only models keep `model.layers`, "
            "`model.norm`, `model.rotary_emb` and an input/output embedding (Llama, Qwen2, Qwen3, Mistral)."
        )
    return DecoderParts(**found)
