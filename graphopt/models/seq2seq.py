"""The encoder-decoder adapter: where a Hugging Face seq2seq LM (Marian, BART) keeps its networks' modules.

Marian and BART (and mBART, Pegasus, ...) share one layout: `model.encoder`, and a
`model.decoder` with `embed_tokens`, `embed_positions` (an embedding table, BART's offset by
2), `layers` whose `encoder_attn` is the cross-attention, an optional `layernorm_embedding`
and final `layer_norm`; a `lm_head` plus a `final_logits_bias` buffer on the top model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from graphopt.errors import GraphoptError


@dataclass
class Seq2SeqParts:
    encoder: nn.Module  # (input_ids, attention_mask) -> encoder hidden states
    embed_tokens: nn.Module  # the decoder's token embedding
    embed_positions: nn.Module  # an nn.Embedding whose weight is the position table
    position_offset: int  # BART stores positions from row 2 on
    embed_scale: float  # applied to token embeddings by the decoder's forward (Marian), else 1
    embed_norm: nn.Module | None  # BART's layernorm_embedding
    layers: nn.ModuleList  # decoder layers; layer.encoder_attn is the cross-attention
    final_norm: nn.Module | None  # mBART's decoder.layer_norm
    head: nn.Module
    heads: int  # decoder attention heads (cross K/V are [1, SRC, heads, D])


def seq2seq_parts(model: nn.Module) -> Seq2SeqParts:
    base = getattr(model, "model", None)
    decoder = getattr(base, "decoder", None)
    encoder = getattr(base, "encoder", None)
    found = {"model.encoder": encoder, "model.decoder": decoder,
             "decoder.embed_tokens": getattr(decoder, "embed_tokens", None),
             "decoder.embed_positions": getattr(decoder, "embed_positions", None),
             "decoder.layers": getattr(decoder, "layers", None), "lm_head": model.get_output_embeddings()}
    missing = [k for k, v in found.items() if v is None]
    layers = found["decoder.layers"]
    if not missing and not all(hasattr(layer, "encoder_attn") for layer in layers):
        missing = ["an `encoder_attn` cross-attention in each decoder layer"]
    if missing or not isinstance(found["decoder.embed_positions"], nn.Embedding):
        raise GraphoptError(
            f"graphopt's encoder-decoder adapter does not recognise {type(model).__name__}: it found no "
            f"{', '.join(missing or ['position table (decoder.embed_positions as an embedding)'])}. Supported "
            "encoder-decoder models follow Marian/BART: model.encoder, model.decoder with embed_tokens, "
            "embed_positions and layers with encoder_attn, and lm_head."
        )
    positions = found["decoder.embed_positions"]
    # Marian multiplies the token embeddings by `decoder.embed_scale` in the decoder's forward;
    # BART's embedding module scales itself and the decoder has no such attribute.
    scale = getattr(decoder, "embed_scale", None)
    return Seq2SeqParts(
        encoder=encoder, embed_tokens=decoder.embed_tokens, embed_positions=positions,
        position_offset=int(getattr(positions, "offset", 0)), embed_scale=float(scale or 1.0),
        embed_norm=getattr(decoder, "layernorm_embedding", None), layers=layers,
        final_norm=getattr(decoder, "layer_norm", None), head=found["lm_head"],
        heads=int(model.config.decoder_attention_heads))
