import importlib

import torch

from graphopt.testing import pipeline_before, prefill_inputs, run_passes, tiny_llama, traced

PIPELINE = (*pipeline_before("kv-layout"), "kv-layout")


def test_past_k_v_are_transformers_own_k_v_in_bshd():
    net = run_passes(traced("block_0"), *PIPELINE)
    assert net.output_names == ["hidden_states", "past_k", "past_v"]
    assert [o.shape for o in net.outputs[1:]] == [(1, 16, 2, 32), (1, 16, 2, 32)]
    x, positions, mask = prefill_inputs(16)
    _, past_k, past_v = net.run(x, positions, mask)

    # The reference: transformers' own projections and rotary, on the same weights.
    model = tiny_llama().reference_model()
    layer = model.model.layers[0]
    modeling = importlib.import_module(type(layer).__module__)
    with torch.no_grad():
        h = layer.input_layernorm(x)
        k = layer.self_attn.k_proj(h).view(1, 16, 2, 32).transpose(1, 2)
        v = layer.self_attn.v_proj(h).view(1, 16, 2, 32)
        cos, sin = model.model.rotary_emb(x, positions)
        _, k = modeling.apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(past_k, k.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(past_v, v, rtol=1e-5, atol=1e-5)
