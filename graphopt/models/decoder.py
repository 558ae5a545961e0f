"""The decoder-only adapter: where a Hugging Face causal LM keeps its networks' modules.

Every network graphopt emits for a decoder-only model is built from these five parts.
Llama, Qwen2/3 and Mistral name them the same way; a user's own model declares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from graphopt.errors import GraphoptError


@dataclass
class DecoderParts:
    embed: nn.Module  # input_ids -> hidden states
    layers: nn.ModuleList  # the decoder blocks
    norm: nn.Module  # final norm before the head
    head: nn.Module  # hidden -> logits
    rotary: nn.Module | None  # (hidden, position_ids) -> (cos, sin); None when call_block computes its own
    embedding_multiplier: float = 1.0  # applied after `embed` (see EMBEDDING_SCALES)
    logit_multiplier: float = 1.0  # applied after `head` (see LOGIT_SCALES)
    # A user's model (models/custom.py): (block, input_states, position_ids, attention_mask) -> hidden.
    call_block: Callable | None = None


# Some models scale the embeddings or the logits in their forward, not in a module, so the
# embedding and head networks have to repeat it: config attribute -> the multiplier it means.
EMBEDDING_SCALES = {
    "embedding_multiplier": lambda value: value,  # Granite: inputs_embeds * embedding_multiplier
}
LOGIT_SCALES = {
    "logit_scale": lambda value: value,  # Cohere: logits * logit_scale
    "logits_scaling": lambda value: 1.0 / value,  # Granite: logits / logits_scaling
}
# Post-head transforms graphopt does not emit yet: refused rather than silently dropped.
UNSUPPORTED_HEAD_TRANSFORMS = ("final_logit_softcapping",)  # Gemma 2 and later: tanh soft-capping


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
    config = model.config
    for name in UNSUPPORTED_HEAD_TRANSFORMS:
        if getattr(config, name, None) is not None:
            raise GraphoptError(
                f"{type(model).__name__} applies {name}={getattr(config, name)} to its logits in its forward, which "
                "graphopt's head network does not reproduce yet; it stops here rather than emit a head with "
                "different logits."
            )
    return DecoderParts(**found, embedding_multiplier=_multiplier(config, EMBEDDING_SCALES),
                        logit_multiplier=_multiplier(config, LOGIT_SCALES))


def _multiplier(config, scales: dict) -> float:
    multiplier = 1.0
    for name, to_multiplier in scales.items():
        if getattr(config, name, None) is not None:
            multiplier *= to_multiplier(float(getattr(config, name)))
    return multiplier


def sliding_window(config) -> int | None:
    """The window of the layers that attend within one (Mistral v0.1, Qwen2 with use_sliding_window),
    or None when every layer sees the whole sequence."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    # Configs without layer_types (Qwen2/3 before transformers 4.53) keep the flag beside the size.
    return window if getattr(config, "use_sliding_window", True) else None
