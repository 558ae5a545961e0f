"""Built-in model configurations, as plain config.json-style dicts.

Tiny configs are sized for the BM1684X too: every quantised weight's output channels are a
multiple of 64 (TPU-MLIR's w4 per-group scales need it). They use initializer_range 0.2,
because at transformers' default 0.02 a tiny random decoder's greedy output is often one
repeated token, which a broken rewrite can reproduce as well.
"""

TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, as in Llama-3.1
    "head_dim": 32,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    # llama3 scaling with a small original context, so the scaled band of frequencies
    # is exercised at the positions a test reaches.
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# meta-llama/Llama-3.1-8B-Instruct config.json
LLAMA_3_1_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}

# Same size as TINY_LLAMA (BM1684X-friendly channels); what differs is each architecture's own.
_TINY_COMMON = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Qwen2.5: q/k/v projections with bias, tied embedding and lm_head (as in the 0.5B-3B sizes).
TINY_QWEN2_5 = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    **_TINY_COMMON,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}

# Qwen3: per-head RMSNorm on q and k before rope, no q/k/v bias, tied embeddings (0.6B-4B).
TINY_QWEN3 = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    **_TINY_COMMON,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}

# Mistral-7B-v0.3: Llama-like, plain rope (theta 1e6), no sliding window, untied.
TINY_MISTRAL = {
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    **_TINY_COMMON,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
}

# ---- real models, for `--model-path` (weights from the checkpoint) or `--random-weights` ----
# Each is the published config.json. A checkpoint directory's own config.json, when it has
# one, takes precedence over these.

# Qwen/Qwen2.5-7B-Instruct config.json: q/k/v bias, untied at this size, 28 heads over 4 KV heads.
QWEN2_5_7B = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}

# Qwen/Qwen3-8B config.json: per-head q/k RMSNorm, head_dim 128 set explicitly, untied.
QWEN3_8B = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "sliding_window": None,
    "use_sliding_window": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}

# mistralai/Mistral-7B-Instruct-v0.3 config.json: vocabulary 32768, rope theta 1e6, no sliding window.
MISTRAL_7B_V0_3 = {
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32768,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


# ---- encoder-decoder minis (issue 6): BM1684X-friendly sizes like the decoder-only ones ----
_TINY_SEQ2SEQ = {
    "vocab_size": 1024,
    "d_model": 128,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 256,
    "decoder_ffn_dim": 256,
    "max_position_embeddings": 512,
    "init_std": 0.2,
    "pad_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
    "is_encoder_decoder": True,
}

# Helsinki-NLP opus-mt in miniature: sinusoidal positions, scaled embeddings (sqrt(d_model)), swish,
# tied embeddings and head, final_logits_bias. Weights at std 0.1, not 0.2: with the sqrt(128)
# embedding scale, std 0.2 gives layer-0 attention scores of std 29 (a near one-hot softmax no
# trained model has), where bf16 arithmetic alone, in torch, moves the encoder output to cosine
# 0.9992; at 0.1 it is 0.99996, as for the other minis.
TINY_MARIAN = {
    "model_type": "marian",
    "architectures": ["MarianMTModel"],
    **_TINY_SEQ2SEQ,
    "init_std": 0.1,
    "scale_embedding": True,
    "activation_function": "swish",
    "static_position_embeddings": True,
}

# BART in miniature: learned positions (offset 2), layernorm_embedding, gelu, tied head, final_logits_bias.
TINY_BART = {
    "model_type": "bart",
    "architectures": ["BartForConditionalGeneration"],
    **_TINY_SEQ2SEQ,
    "decoder_start_token_id": 2,
    "bos_token_id": 0,
    "forced_eos_token_id": 2,
    "scale_embedding": False,
    "activation_function": "gelu",
}
