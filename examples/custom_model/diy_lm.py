"""A hand-written causal LM as people write one while learning (the seeds' "DIY" model), compiled by graphopt
through an adapter only: nothing in the model is written for graphopt.

    graphopt run examples/custom_model/diy_lm.py
    graphopt golden check examples/custom_model/diy_lm.py --dir examples/custom_model/golden

Its own config dataclass (RMSNorm eps in it), one fused qkv Linear, rotary embeddings that rotate
interleaved pairs (0,1), (2,3), ... computed inside the attention from the positions, attention written
out (`q @ kᵀ / √d`, a causal mask built from `arange(t) <= position` and, when lengths are given,
`key < seq_lengths`, `masked_fill(-inf)`, softmax, `@ v`), grouped-query heads repeated with
repeat_interleave, and a head tied to the embedding. `forward` takes `attention_mask` (1 = token) or
`seq_lengths`, as such models do.

graphopt's passes read it by what it computes: attention-explicit makes the written-out attention one
call, fixed-mask checks that the mask built from positions is the causal mask the runtime feeds and
takes it from the `attention_mask` input instead, attention-canonical drops the head repeat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.models.custom import CustomDecoder


@dataclass
class DIYConfig:
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate_pairs(x, positions, theta):
    """Rotate each interleaved pair (x[2i], x[2i+1]) of x [b, h, t, d] by position * theta^(-2i/d)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = positions[:, None, :, None].float() * freqs  # [b, 1, t, d/2]
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, config: DIYConfig):
        super().__init__()
        self.config, self.head_dim = config, config.hidden_size // config.num_heads
        kv = config.num_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, config.hidden_size + 2 * kv, bias=False)
        self.o = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, positions, seq_lengths=None):
        b, t, _ = x.shape
        c, d = self.config, self.head_dim
        q, k, v = self.qkv(x).split([c.num_heads * d, c.num_kv_heads * d, c.num_kv_heads * d], dim=-1)
        q = rotate_pairs(q.view(b, t, c.num_heads, d).transpose(1, 2), positions, c.rope_theta)
        k = rotate_pairs(k.view(b, t, c.num_kv_heads, d).transpose(1, 2), positions, c.rope_theta)
        v = v.view(b, t, c.num_kv_heads, d).transpose(1, 2)
        repeat = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        keys = torch.arange(t)
        visible = keys[None, None, :] <= positions[:, :, None]  # [b, t, t]: key j up to the query's position
        if seq_lengths is not None:
            visible = visible & (keys[None, None, :] < seq_lengths[:, None, None])
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        probs = F.softmax(scores, dim=-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, t, c.hidden_size))


class Block(nn.Module):
    def __init__(self, config: DIYConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.feedforward_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, positions, seq_lengths=None):
        x = x + self.attention(self.attention_norm(x), positions, seq_lengths)
        h = self.feedforward_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class DIYModel(nn.Module):
    def __init__(self, config: DIYConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, seq_lengths=None):
        positions = torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, seq_lengths)
        return self.norm(x)


class DIYForCausalLM(nn.Module):
    def __init__(self, config: DIYConfig):
        super().__init__()
        self.model = DIYModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied

    def forward(self, input_ids, attention_mask=None, seq_lengths=None):
        if attention_mask is not None:
            seq_lengths = attention_mask.sum(dim=1)
        return self.lm_head(self.model(input_ids, seq_lengths))


CONFIG = DIYConfig()

# All graphopt needs: where the parts are, and how a block takes the contract's inputs. The block builds its
# own causal mask from the positions (the runtime's padding rows are its own to mask), so the contract's
# attention_mask is not passed in; graphopt checks that mask is the causal one and wires it to the input.
ADAPTER = CustomDecoder(
    name="diy-lm",
    build=lambda: DIYForCausalLM(CONFIG),
    embed="model.embed_tokens", layers="model.layers", norm="model.norm", head="lm_head",
    call_block=lambda block, input_states, position_ids, attention_mask: block(input_states, position_ids),
    vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.hidden_size, max_positions=CONFIG.max_positions,
    init_std=0.2,
    extra_config={"num_attention_heads": CONFIG.num_heads, "num_key_value_heads": CONFIG.num_kv_heads,
                  "intermediate_size": CONFIG.intermediate_size},
)
