"""The networks of a decoder-only model (graphopt.contract.LLM_TPU or LLAMA3_1_DEMO), as thin wrappers
whose positional inputs are exactly the network's, in the contract's order.

Nothing in transformers is patched: a block is the model's own decoder layer, called the way the
model's own forward calls it. The traced graph's inputs take the contract's names (trace.py).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from graphopt import contract as c
from graphopt.models.source import ModelSource
from graphopt.networks.plan import NetworkPlan


class Embedding(nn.Module):
    def __init__(self, embed: nn.Module, multiplier: float = 1.0):
        super().__init__()
        self.embed, self.multiplier = embed, multiplier

    def forward(self, input_ids):
        embeds = self.embed(input_ids)
        return embeds if self.multiplier == 1.0 else embeds * self.multiplier


class DecoderBlock(nn.Module):
    """One decoder layer with its rotary embedding, called as the model's forward calls it."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, layer_type: str | None = None):
        super().__init__()
        self.layer, self.rotary = layer, rotary
        self._takes_position_embeddings = "position_embeddings" in inspect.signature(layer.forward).parameters
        # Models whose layers attend in two ways (Gemma 3: sliding and full, config.layer_types) keep a rotary
        # table for each and ask for the layer's: the rotary then takes the layer's type.
        takes_type = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        self._rotary_args = (layer_type,) if takes_type else ()

    def forward(self, input_states, position_ids, attention_mask):
        extra = {}
        if self._takes_position_embeddings:
            extra["position_embeddings"] = self.rotary(input_states, position_ids, *self._rotary_args)
        out = self.layer(input_states, attention_mask=attention_mask, position_ids=position_ids, **extra)
        # Decoder layers return the hidden states from transformers 4.54 on; up to 4.53 they
        # return a tuple that starts with them (CI runs the goldens on 4.51 too).
        return out[0] if isinstance(out, tuple) else out


class LmHead(nn.Module):
    """The head over one row of hidden states: the final norm unless the last block has it, the
    logits, and for a token-out contract their TopK(1), the token id."""

    def __init__(self, norm: nn.Module | None, head: nn.Module, logit_multiplier: float = 1.0,
                 token_out: bool = False, softcap: float | None = None):
        super().__init__()
        self.norm, self.head, self.logit_multiplier, self.token_out = norm, head, logit_multiplier, token_out
        self.softcap = softcap

    def forward(self, hidden_states):
        logits = self.head(hidden_states if self.norm is None else self.norm(hidden_states))
        logits = logits if self.logit_multiplier == 1.0 else logits * self.logit_multiplier
        if self.softcap is not None:  # the model's forward soft-caps its logits (Gemma 2, 3)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.topk(logits, 1).indices if self.token_out else logits


class GreedyHead(nn.Module):
    def forward(self, m_logits):
        return torch.topk(m_logits, 1).indices


class SampleHead(nn.Module):
    """transformers' sampling as one net, in generate's order: the repetition penalty on the tokens in
    input_ids, then temperature, top_k and top_p (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper), over the SAMPLE_CANDIDATES most likely tokens. Outputs their
    probabilities (0 where top_k or top_p removes one) and ids, most likely first; the runtime draws one.

    top_k is an input, so the TopK is of all the candidates and those from rank top_k on are removed
    (llm_convert gives TopK a dynamic K instead; the runtime reads the first top_k either way). So top_k
    keeps exactly top_k tokens, where transformers' keeps every token tied with the top_k-th too: the demo
    reads top_k candidates, and a distribution over more would not be the one it draws from."""

    REMOVED = 1000.0  # exp(-1000) is 0 in float32

    def __init__(self, candidates: int = c.SAMPLE_CANDIDATES):
        super().__init__()
        self.candidates = candidates
        # Ranks as floats: compared with top_k, which is cast, since TPU-MLIR compares float tensors.
        self.register_buffer("rank", torch.arange(candidates, dtype=torch.float32).view(1, candidates))

    def forward(self, m_logits, input_ids, penalty, temperature, top_k, top_p):
        seen = torch.gather(m_logits, 1, input_ids)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        logits = m_logits.scatter(1, input_ids, seen)  # a token seen twice is penalised once
        logits, token = torch.topk(logits, self.candidates)
        logits = logits / temperature
        # A removed candidate's logit is lowered by REMOVED: at least that far below the best one (sorted,
        # and always kept), its probability is 0. (Arithmetic rather than a Where on a broadcast value, which
        # TPU-MLIR 1.30.2 lowers to two Tiles of one name and then refuses.)
        logits = logits - self.REMOVED * (self.rank >= top_k.to(torch.float32)).to(torch.float32)
        probs = logits.softmax(dim=1)
        ahead = probs.cumsum(dim=1) - probs  # the probability of the candidates before each one
        logits = logits - self.REMOVED * (ahead >= top_p).to(torch.float32)
        return logits.softmax(dim=1), token


class PenaltySampleHead(SampleHead):
    """The Llama3_1 demo's sampler: SampleHead with its inputs in that demo's order and no top_k input
    (every candidate may be drawn)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("all_candidates", torch.tensor([self.candidates]))

    def forward(self, m_logits, input_ids, top_p, temperature, penalty):
        return super().forward(m_logits, input_ids, penalty, temperature, self.all_candidates, top_p)


def plan_decoder_networks(source: ModelSource, seq_length: int, layers: list[int] | None = None,
                          contract: c.Contract = c.LLM_TPU, max_input_length: int | None = None) -> list[NetworkPlan]:
    """`max_input_length`: the prefill's rows (embedding, block_i), where they are fewer than SEQ, the
    decode cache's rows (LLM-TPU's MAX_INPUT_LENGTH; TPU-MLIR's --max_input_length)."""
    cfg, parts = source.config, source.parts
    rows = max_input_length or seq_length
    hidden, vocab = int(cfg.hidden_size), int(cfg.vocab_size)
    last = len(parts.layers) - 1
    layers = list(range(len(parts.layers))) if layers is None else layers
    # Where the contract moves the final norm into the last layer's networks, lm_head starts at the logits.
    norm_in_block = contract.final_norm_in_last_block

    def block_inputs(steps: int) -> tuple[torch.Tensor, ...]:  # input_states, position_ids, attention_mask
        return (torch.randn(1, steps, hidden, generator=torch.Generator().manual_seed(0)),
                torch.arange(steps, dtype=torch.int64).view(1, steps),
                torch.from_numpy(c.causal_mask(steps, steps, steps)))

    def plan(kind: str, make, weights_of, layer: int | None = None) -> NetworkPlan:
        return NetworkPlan.of(contract.spec(kind), make, weights_of, layer)

    plans = [plan(c.EMBEDDING, lambda: (Embedding(parts.embed, parts.embedding_multiplier),
                                        (torch.zeros(1, rows, dtype=torch.int64),)), lambda: (parts.embed,))]
    for i in layers:
        layer = parts.layers[i]
        # The decode network is the same layer traced for one new token, block_kv_i for a chunk of them;
        # concat-cache then adds the history.
        kinds = [(c.BLOCK, rows), (c.BLOCK_CACHE, 1)] + ([(c.BLOCK_KV, rows)] if contract.has(c.BLOCK_KV) else [])
        for kind, steps in kinds:
            norm = parts.norm if norm_in_block and i == last else None
            plans.append(plan(kind, lambda layer=layer, steps=steps, norm=norm, i=i: (
                _block(source, layer, i, norm), block_inputs(steps)), lambda layer=layer, norm=norm: (
                    (layer,) if norm is None else (layer, norm)), i))
    head_norm = None if norm_in_block else parts.norm
    plans.append(plan(c.LM_HEAD, lambda: (LmHead(head_norm, parts.head, parts.logit_multiplier,
                                                 contract.head_outputs_token, parts.logit_softcap),
                                          (torch.zeros(1, hidden),)),
                      lambda: (parts.head,) if head_norm is None else (parts.norm, parts.head)))
    if contract.has(c.GREEDY_HEAD):
        plans.append(plan(c.GREEDY_HEAD, lambda: (GreedyHead(), (torch.zeros(1, vocab),)), lambda: ()))
    def head_inputs(*scalars) -> tuple[torch.Tensor, ...]:  # m_logits, input_ids, then [1]-shaped inputs
        # (tensors of their own: an input passed twice would be traced as one)
        return (torch.zeros(1, vocab), torch.zeros(1, seq_length, dtype=torch.int64), *(torch.tensor([v]) for v in scalars))

    if contract.has(c.SAMPLE_HEAD):  # penalty, temperature, top_k, top_p
        plans.append(plan(c.SAMPLE_HEAD, lambda: (SampleHead(), head_inputs(1.0, 1.0, c.SAMPLE_CANDIDATES, 1.0)),
                          lambda: ()))
    if contract.has(c.PENALTY_SAMPLE_HEAD):  # top_p, temperature, penalty
        plans.append(plan(c.PENALTY_SAMPLE_HEAD, lambda: (PenaltySampleHead(), head_inputs(1.0, 1.0, 1.0)), lambda: ()))
    return plans


def _block(source: ModelSource, layer: nn.Module, index: int, final_norm: nn.Module | None = None) -> nn.Module:
    if source.parts.call_block is not None:  # a user's model says how its block takes the inputs
        from graphopt.models.custom import CustomBlock

        block = CustomBlock(layer, source.parts.call_block)
    else:
        layer_types = getattr(source.config, "layer_types", None)
        block = DecoderBlock(layer, source.rotary, layer_types[index] if layer_types else None)
    return block if final_norm is None else _Normed(block, final_norm)


class _Normed(nn.Module):
    """A block followed by the model's final norm: the last layer's, where the contract puts it there."""

    def __init__(self, block: nn.Module, norm: nn.Module):
        super().__init__()
        self.block, self.norm = block, norm

    def forward(self, input_states, position_ids, attention_mask):
        return self.norm(self.block(input_states, position_ids, attention_mask))
