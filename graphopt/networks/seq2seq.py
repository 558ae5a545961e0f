"""The networks of an encoder-decoder model (Marian, BART), as thin wrappers over the model's modules.

Their names, inputs and outputs are graphopt.contract.ENCODER_DECODER's (docs/encoder-decoder-networks.md
says how a client drives them): the encoder; cross_kv, every decoder layer's cross-attention K/V once
per source; the embedding (tokens scaled, plus the position table); decoder_block_i and
decoder_block_cache_i; lm_head (final norm, head, final_logits_bias); greedy_head. The decoder
blocks are traced with `encoder_hidden_states`, as the layer takes it; the cross-kv-inputs pass
turns their cross-attention K/V into the contract's cross_k/cross_v inputs, and the rest is the
decoder-only pipeline. SRC is the same as SEQ.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt import contract as c
from graphopt.models.source import ModelSource
from graphopt.networks.decoder import GreedyHead
from graphopt.networks.plan import NetworkPlan


class Encoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class CrossKv(nn.Module):
    """Each decoder layer's cross-attention K and V projections of the encoder output."""

    def __init__(self, layers: nn.ModuleList, heads: int):
        super().__init__()
        self.layers, self.heads = layers, heads

    def forward(self, encoder_hidden_states):
        batch, length, hidden = encoder_hidden_states.shape
        out = []
        for layer in self.layers:
            for proj in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj):
                out.append(proj(encoder_hidden_states).view(batch, length, self.heads, hidden // self.heads))
        return tuple(out)


class DecoderEmbedding(nn.Module):
    """Scaled token embeddings plus the position table gathered by position_ids (the table is the
    position module's weight, so no release's position-module signature matters)."""

    def __init__(self, tokens: nn.Module, positions: nn.Module, offset: int, scale: float, norm: nn.Module | None):
        super().__init__()
        self.tokens, self.positions, self.norm = tokens, positions, norm
        self.offset, self.scale = offset, scale

    def forward(self, input_ids, position_ids):
        embeds = self.tokens(input_ids)
        if self.scale != 1.0:
            embeds = embeds * self.scale
        embeds = embeds + F.embedding(position_ids + self.offset, self.positions.weight)
        return embeds if self.norm is None else self.norm(embeds)


class Seq2SeqDecoderBlock(nn.Module):
    """One decoder layer (self- and cross-attention) called as the model's decoder calls it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, input_states, attention_mask, encoder_hidden_states, encoder_attention_mask):
        out = self.layer(input_states, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                         encoder_attention_mask=encoder_attention_mask, use_cache=False)
        # Layers return a tuple up to transformers 4.53 (see networks.decoder.DecoderBlock).
        return out[0] if isinstance(out, tuple) else out


class Seq2SeqLmHead(nn.Module):
    """The final norm (where the model has one), the head and the final logits bias (Marian, BART)."""

    def __init__(self, norm: nn.Module | None, head: nn.Module, logits_bias: torch.Tensor | None):
        super().__init__()
        self.norm, self.head = norm, head
        self.register_buffer("logits_bias", logits_bias)

    def forward(self, hidden_states):
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        logits = self.head(hidden_states)
        return logits if self.logits_bias is None else logits + self.logits_bias.view(1, -1)


def plan_seq2seq_networks(source: ModelSource, seq_length: int, layers: list[int] | None = None) -> list[NetworkPlan]:
    cfg, parts, contract = source.config, source.seq2seq_parts, c.ENCODER_DECODER
    hidden, vocab, total = int(cfg.d_model), int(cfg.vocab_size), len(parts.layers)
    layers = list(range(total)) if layers is None else layers
    g = torch.Generator().manual_seed(0)
    encoder_states = torch.randn(1, seq_length, hidden, generator=g)

    def block_inputs(steps: int) -> tuple[torch.Tensor, ...]:
        # input_states, attention_mask, encoder_hidden_states (cross-kv-inputs makes them cross_k/cross_v),
        # encoder_attention_mask
        return (torch.randn(1, steps, hidden, generator=torch.Generator().manual_seed(0)),
                torch.from_numpy(c.causal_mask(steps, steps, steps)), encoder_states,
                torch.zeros(1, 1, steps, seq_length))

    def plan(kind: str, make, weights_of, layer: int | None = None, inputs: list[str] | None = None) -> NetworkPlan:
        planned = NetworkPlan.of(contract.spec(kind), make, weights_of, layer, total)
        if inputs is not None:
            planned.input_names = inputs
        return planned

    ids = torch.zeros(1, seq_length, dtype=torch.int64)
    # Decoder blocks are traced with the encoder's states, as the layer takes them; cross-kv-inputs
    # trades those for the contract's cross_k/cross_v inputs.
    traced_block_inputs = [c.INPUT_STATES, c.ATTENTION_MASK, c.ENCODER_HIDDEN_STATES, c.ENCODER_ATTENTION_MASK]
    plans = [
        plan(c.ENCODER, lambda: (Encoder(parts.encoder), (ids, torch.ones_like(ids))), lambda: (parts.encoder,)),
        plan(c.CROSS_KV, lambda: (CrossKv(parts.layers, parts.heads), (encoder_states,)),
             lambda: tuple(layer.encoder_attn for layer in parts.layers)),
        plan(c.EMBEDDING, lambda: (DecoderEmbedding(parts.embed_tokens, parts.embed_positions, parts.position_offset,
                                                    parts.embed_scale, parts.embed_norm),
                                   (ids, torch.arange(seq_length).view(1, -1))),
             lambda: tuple(m for m in (parts.embed_tokens, parts.embed_positions, parts.embed_norm) if m)),
    ]
    for i in layers:
        layer = parts.layers[i]
        for kind, steps in ((c.DECODER_BLOCK, seq_length), (c.DECODER_BLOCK_CACHE, 1)):
            plans.append(plan(kind, lambda layer=layer, steps=steps: (Seq2SeqDecoderBlock(layer), block_inputs(steps)),
                              lambda layer=layer: (layer,), i, traced_block_inputs))
    plans += [
        plan(c.LM_HEAD, lambda: (Seq2SeqLmHead(parts.final_norm, parts.head, source.load_tensor("final_logits_bias")),
                                 (torch.zeros(1, hidden),)),
             lambda: tuple(m for m in (parts.final_norm, parts.head) if m)),
        plan(c.GREEDY_HEAD, lambda: (GreedyHead(), (torch.zeros(1, vocab),)), lambda: ()),
    ]
    return plans
