import torch

from graphopt.testing import decode_mask, pipeline_before, prefill_inputs, run_passes, traced

PIPELINE = (*pipeline_before("concat-cache"), "concat-cache")
SEQ = 16


def test_decode_network_contract():
    net = run_passes(traced("block_cache_0", SEQ), *PIPELINE)
    assert [(s.name, s.shape) for s in net.inputs] == [
        ("input_states", (1, 1, 128)), ("position_ids", (1, 1)), ("attention_mask", (1, 1, 1, SEQ + 1)),
        ("history_k", (1, SEQ, 2, 32)), ("history_v", (1, SEQ, 2, 32))]
    assert [(s.name, s.shape) for s in net.outputs] == [
        ("hidden_states", (1, 1, 128)), ("past_k", (1, 1, 2, 32)), ("past_v", (1, 1, 2, 32))]


def test_decoding_one_token_matches_that_row_of_prefill():
    prefill = run_passes(traced("block_0", SEQ), *PIPELINE)
    decode = run_passes(traced("block_cache_0", SEQ), *PIPELINE)
    x, positions, mask = prefill_inputs(SEQ)
    hidden, past_k, past_v = prefill.run(x, positions, mask)
    for row in (0, 5, SEQ - 1):
        # The runtime's cache holds garbage from the new token's row on; the mask must hide it.
        history_k, history_v = past_k.clone(), past_v.clone()
        history_k[:, row:] = 1e3 * torch.randn_like(history_k[:, row:])
        history_v[:, row:] = 1e3 * torch.randn_like(history_v[:, row:])
        out = decode.run(x[:, row:row + 1], torch.tensor([[row]]), decode_mask(SEQ, row), history_k, history_v)
        torch.testing.assert_close(out[0], hidden[:, row:row + 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1], past_k[:, row:row + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[2], past_v[:, row:row + 1], rtol=1e-5, atol=1e-5)
