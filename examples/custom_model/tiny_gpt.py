"""A user's own decoder, written without transformers, compiled by graphopt through a declared adapter.

    graphopt run examples/custom_model/tiny_gpt.py
    graphopt golden check examples/custom_model/tiny_gpt.py --dir examples/custom_model/golden

Its own config class, its own attention (grouped-query, RoPE computed from the position ids, one
F.scaled_dot_product_attention with an additive mask), its own RMSNorm, and an lm_head that
shares the embedding's weight. `ADAPTER` at the bottom is all graphopt needs: where the
embedding, the blocks, the final norm and the head are, and how a block takes the contract's
inputs (hidden states, position ids, the additive causal mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.models.custom import CustomDecoder


@dataclass
class TinyGPTConfig:
    vocab: int = 1024
    width: int = 128
    depth: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 256
    context: int = 512
    rope_base: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.scale, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        return self.scale * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rope(x, positions, base):
    """Rotate pairs (i, i + d/2) of x [b, h, t, d] by position-dependent angles."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * freqs  # [b, 1, t, half]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.cfg, self.head_dim = cfg, cfg.width // cfg.heads
        self.qkv = nn.Linear(cfg.width, (cfg.heads + 2 * cfg.kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(cfg.heads * self.head_dim, cfg.width, bias=False)

    def forward(self, x, positions, mask):
        b, t, _ = x.shape
        d, h, kv = self.head_dim, self.cfg.heads, self.cfg.kv_heads
        q, k, v = self.qkv(x).split([h * d, kv * d, kv * d], dim=-1)
        q = rope(q.view(b, t, h, d).transpose(1, 2), positions, self.cfg.rope_base)
        k = rope(k.view(b, t, kv, d).transpose(1, 2), positions, self.cfg.rope_base)
        v = v.view(b, t, kv, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(b, t, h * d))


class Block(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.width), Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.width)
        self.up, self.down = nn.Linear(cfg.width, cfg.mlp), nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x, positions, mask):
        x = x + self.attn(self.attn_norm(x), positions, mask)
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class TinyGPT(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied

    def forward(self, input_ids):
        t = input_ids.shape[1]
        positions = torch.arange(t).unsqueeze(0)
        mask = torch.full((t, t), -10000.0).triu(1)[None, None]  # additive causal mask
        x = self.tok_emb(input_ids)
        for block in self.blocks:
            x = block(x, positions, mask)
        return self.lm_head(self.norm(x))


CONFIG = TinyGPTConfig()

ADAPTER = CustomDecoder(
    name="tiny-gpt",
    build=lambda: TinyGPT(CONFIG),
    embed="tok_emb", layers="blocks", norm="norm", head="lm_head",
    call_block=lambda block, input_states, position_ids, attention_mask: block(input_states, position_ids,
                                                                               attention_mask),
    vocab_size=CONFIG.vocab, hidden_size=CONFIG.width, max_positions=CONFIG.context,
    init_std=0.5,  # large enough that its 32 greedy tokens hold 17 different ones (0.2: 9)
    extra_config={"num_attention_heads": CONFIG.heads, "num_key_value_heads": CONFIG.kv_heads,
                  "intermediate_size": CONFIG.mlp},
)
