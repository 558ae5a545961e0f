"""A Llama whose chosen layers build their own mask, a sliding window of two keys: blocks graphopt's passes
cannot rewrite.

Remote-code checkpoints do this (an attention that makes its mask from `arange` instead of taking the one
the model passes in). fixed-mask reads such a mask by what it computes: a causal one becomes the runtime's
input, but a window is not what the runtime's fixed causal mask means, so such a block cannot be compiled
faithfully, and graphopt must refuse it by pass, network and reason.
Registered with transformers' Auto classes on import, as a user's own architecture would be,
so `save_pretrained` directories of it load by name in graphopt's export worker processes too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb


class SelfMaskingLlamaConfig(LlamaConfig):
    model_type = "self-masking-llama"

    def __init__(self, self_masking_layers=(1,), **kwargs):
        self.self_masking_layers = list(self_masking_layers)
        super().__init__(**kwargs)


class SelfMaskingAttention(LlamaAttention):
    """Llama attention (same weights) that ignores the mask it is given and builds its own: each query sees
    itself and the key before it."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        batch, steps, _ = hidden_states.shape

        def heads(x):
            return x.view(batch, steps, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        index = torch.arange(steps, device=hidden_states.device)
        window = (index[None, :] <= index[:, None]) & (index[:, None] - index[None, :] < 2)
        own_mask = torch.where(window, 0.0, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=own_mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1)), None


class SelfMaskingLlamaForCausalLM(LlamaForCausalLM):
    config_class = SelfMaskingLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        for index in config.self_masking_layers:
            self.model.layers[index].self_attn = SelfMaskingAttention(config, index)


AutoConfig.register(SelfMaskingLlamaConfig.model_type, SelfMaskingLlamaConfig)
AutoModelForCausalLM.register(SelfMaskingLlamaConfig, SelfMaskingLlamaForCausalLM)
