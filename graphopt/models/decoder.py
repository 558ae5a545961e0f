"""The decoder-only adapter: where a Hugging Face causal LM keeps its networks' modules.

Every network graphopt emits for a decoder-only model is built from these five parts, found by the
model's structure (`decoder_parts`); a user's own model declares them (models/custom.py).
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
    logit_softcap: float | None = None  # then cap * tanh(logits / cap) (config final_logit_softcapping: Gemma 2, 3)
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


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The parts by the model's structure, whatever its attributes are called: the embedding and the head
    as transformers names them (get_input/output_embeddings), the layer stack (the module list of
    num_hidden_layers modules nearest the top), and beside it the final norm (a norm registered after the
    layers: `norm`, `final_layernorm`, `final_layer_norm`, `ln_f`, ...) and the rotary embedding."""
    config = model.config
    owner, layers = _layer_stack(model, int(getattr(config, "num_hidden_layers", 0) or 0))
    beside = list(owner.children()) if owner is not None else []  # the layer list's siblings, in order
    after = beside[beside.index(layers) + 1:] if owner is not None else []
    found = {
        "embed": model.get_input_embeddings(),
        "layers": layers,
        "norm": next((m for m in reversed(after) if _is_norm(m)), None),
        "head": model.get_output_embeddings(),
        "rotary": next((m for m in beside if "Rotary" in type(m).__name__), None),
    }
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise GraphoptError(
            f"graphopt's decoder adapter does not recognise {type(model).__name__}: it found no "
            f"{', '.join(WHAT_IS_FOUND[k] for k in missing)}. It finds the layers as the module list of "
            f"num_hidden_layers ({getattr(config, 'num_hidden_layers', '?')}) modules, the final norm after it, a "
            "rotary embedding beside it, and the embedding and head transformers' get_input_embeddings / "
            "get_output_embeddings give. For a model built otherwise, declare its parts with a CustomDecoder "
            "(README, \"Your own model\").")
    softcap = getattr(config, "final_logit_softcapping", None)
    return DecoderParts(**found, embedding_multiplier=_multiplier(config, EMBEDDING_SCALES),
                        logit_multiplier=_multiplier(config, LOGIT_SCALES),
                        logit_softcap=float(softcap) if softcap is not None else None)


WHAT_IS_FOUND = {"embed": "input embedding", "layers": "layer list", "norm": "final norm after the layers",
                 "head": "output embedding (head)", "rotary": "rotary embedding beside the layers"}


def _layer_stack(model: nn.Module, count: int) -> tuple[nn.Module | None, nn.ModuleList | None]:
    """(its owner, the module list of `count` layers nearest the top of the module tree)."""
    for _, owner in sorted(model.named_modules(), key=lambda item: item[0].count(".") if item[0] else -1):
        for child in owner.children():
            if isinstance(child, nn.ModuleList) and len(child) == count and count:
                return owner, child
    return None, None


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's LayerNorm/RMSNorm, or a model's own (its class named ...Norm)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "Norm" in type(module).__name__


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
