"""The networks of a decoder-only model, as thin wrappers whose inputs are exactly the network's.

Each wrapper's forward parameters carry the contract's input names (they become the traced
graph's placeholders and so the ONNX input names). Nothing in transformers is patched: a
block is the model's own decoder layer, called the way the model's own forward calls it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from graphopt.ir import NetworkGraph
from graphopt.models.source import ModelSource
from graphopt.trace import trace_network

MASK_VALUE = -10000.0  # the runtime's additive mask value (0xF0E2 in fp16)
# Nets of the runtime contract that are another network compiled at other shapes: the
# embedding's seq axis is dynamic, and the runtime embeds each decoded token with [1,1].
NETWORK_ALIASES = {"embedding_cache": "embedding"}


class Embedding(nn.Module):
    def __init__(self, embed: nn.Module, multiplier: float = 1.0):
        super().__init__()
        self.embed, self.multiplier = embed, multiplier

    def forward(self, input_ids):
        embeds = self.embed(input_ids)
        return embeds if self.multiplier == 1.0 else embeds * self.multiplier


class DecoderBlock(nn.Module):
    """One decoder layer with its rotary embedding, called as the model's forward calls it."""

    def __init__(self, layer: nn.Module, rotary: nn.Module):
        super().__init__()
        self.layer, self.rotary = layer, rotary
        self._takes_position_embeddings = "position_embeddings" in inspect.signature(layer.forward).parameters

    def forward(self, input_states, position_ids, attention_mask):
        extra = {}
        if self._takes_position_embeddings:
            extra["position_embeddings"] = self.rotary(input_states, position_ids)
        out = self.layer(input_states, attention_mask=attention_mask, position_ids=position_ids, **extra)
        # Decoder layers return the hidden states from transformers 4.54 on; up to 4.53 they
        # return a tuple that starts with them (CI runs the goldens on 4.51 too).
        return out[0] if isinstance(out, tuple) else out


class LmHead(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Module, logit_multiplier: float = 1.0):
        super().__init__()
        self.norm, self.head, self.logit_multiplier = norm, head, logit_multiplier

    def forward(self, hidden_states):
        logits = self.head(self.norm(hidden_states))
        return logits if self.logit_multiplier == 1.0 else logits * self.logit_multiplier


class GreedyHead(nn.Module):
    def forward(self, m_logits):
        return torch.topk(m_logits, 1).indices


class PenaltySampleHead(nn.Module):
    """Repetition penalty, top-k, temperature and top-p, as the chip runtime's sampler expects.

    Outputs the top-k tokens and their probabilities; the runtime draws one on the host.
    """

    def __init__(self, top_k: int = 50, min_tokens_to_keep: int = 5):
        super().__init__()
        self.top_k = top_k
        # The first `min_tokens_to_keep` candidates are always kept: their top-p bound is raised
        # above any cumulative probability. A float bound rather than a bool mask OR-ed in,
        # because TPU-MLIR's ONNX import cannot read bool initializers.
        floor = torch.zeros((1, top_k))
        floor[0, :min_tokens_to_keep] = 2.0
        self.register_buffer("keep_floor", floor)

    def forward(self, m_logits, input_ids, top_p, temperature, penalty):
        seen = torch.gather(m_logits, 1, input_ids)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        logits = m_logits.scatter(1, input_ids, seen)
        logits, token = torch.topk(logits, self.top_k)
        logits = logits / temperature
        cumulative = logits.softmax(dim=1).cumsum(dim=1)
        keep = cumulative < torch.maximum(top_p, self.keep_floor)
        logits = torch.where(keep, logits, torch.full_like(logits, -1000.0))
        return logits.softmax(dim=1), token


@dataclass
class NetworkPlan:
    """What to trace for one network: built lazily so only one network's weights are live."""

    name: str
    kind: str
    make: Callable[[], tuple[nn.Module, dict[str, torch.Tensor]]]
    weights_of: Callable[[], tuple[nn.Module, ...]]  # skeleton modules to materialise while tracing
    output_names: list[str]


def causal_mask(steps: int, keys: int, length: int) -> torch.Tensor:
    """The runtime's additive mask: query i (a prompt position < length) sees keys j <= i."""
    mask = torch.full((1, 1, steps, keys), MASK_VALUE)
    for i in range(min(steps, length)):
        mask[0, 0, i, : i + 1] = 0.0
    return mask


def decode_mask(seq_length: int, row: int) -> torch.Tensor:
    """The runtime's decode mask [1,1,1,SEQ+1] for a new token at `row`: history rows < row
    are valid, rows from `row` on are not written yet, and the last column is the token itself."""
    mask = torch.zeros(1, 1, 1, seq_length + 1)
    mask[..., row:seq_length] = MASK_VALUE
    return mask


def plan_networks(source: ModelSource, seq_length: int, layers: list[int] | None = None) -> list[NetworkPlan]:
    if source.is_encoder_decoder:
        from graphopt.seq2seq_networks import plan_seq2seq_networks

        return plan_seq2seq_networks(source, seq_length, layers)
    cfg = source.config
    parts = source.parts
    hidden, vocab = int(cfg.hidden_size), int(cfg.vocab_size)
    layers = list(range(len(parts.layers))) if layers is None else layers

    def block_inputs(steps: int) -> dict[str, torch.Tensor]:
        return {
            "input_states": torch.randn(1, steps, hidden, generator=torch.Generator().manual_seed(0)),
            "position_ids": torch.arange(steps, dtype=torch.int64).view(1, steps),
            "attention_mask": causal_mask(steps, steps, steps),
        }

    plans = [NetworkPlan(
        "embedding", "embedding",
        lambda: (Embedding(parts.embed, parts.embedding_multiplier), {"input_ids": torch.zeros(1, seq_length, dtype=torch.int64)}),
        lambda: (parts.embed,), ["input_embed"])]
    for i in layers:
        layer = parts.layers[i]
        # The decode network is the same layer traced for one new token; concat-cache then adds the history.
        for name, kind, steps in ((f"block_{i}", "block", seq_length), (f"block_cache_{i}", "block_cache", 1)):
            plans.append(NetworkPlan(
                name, kind,
                lambda layer=layer, steps=steps: (_block(source, layer), block_inputs(steps)),
                lambda layer=layer: (layer,), ["hidden_states"]))
    plans += [
        NetworkPlan("lm_head", "lm_head",
                    lambda: (LmHead(parts.norm, parts.head, parts.logit_multiplier), {"hidden_states": torch.zeros(1, hidden)}),
                    lambda: (parts.norm, parts.head), ["m_logits"]),
        NetworkPlan("greedy_head", "greedy_head",
                    lambda: (GreedyHead(), {"m_logits": torch.zeros(1, vocab)}), lambda: (), ["token"]),
        NetworkPlan("penalty_sample_head", "penalty_sample_head",
                    lambda: (PenaltySampleHead(), {
                        "m_logits": torch.zeros(1, vocab), "input_ids": torch.zeros(1, seq_length, dtype=torch.int64),
                        "top_p": torch.ones(1), "temperature": torch.ones(1), "penalty": torch.ones(1)}),
                    lambda: (), ["probs", "token"]),
    ]
    return plans


def _block(source: ModelSource, layer: nn.Module) -> nn.Module:
    if source.parts.call_block is not None:  # a user's model says how its block takes the inputs
        from graphopt.models.custom import CustomBlock

        return CustomBlock(layer, source.parts.call_block)
    return DecoderBlock(layer, source.rotary)


def trace_plan(source: ModelSource, plan: NetworkPlan, seq_length: int) -> NetworkGraph:
    with source.materialized(*plan.weights_of()):
        module, inputs = plan.make()
        return trace_network(module, inputs, name=plan.name, kind=plan.kind,
                             output_names=plan.output_names, seq_length=seq_length)
