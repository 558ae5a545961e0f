"""cross-kv-inputs on a real BART decoder layer: cross K/V become inputs, numbers unchanged,
and with it the cache passes give a decode form that matches the prefill row by row."""

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from graphopt.errors import PassMatchError
from graphopt.testing import causal_mask, decode_mask, pipeline_before
from graphopt.passes._attention import attention_nodes, cross_attention_nodes
from graphopt.networks.seq2seq import Seq2SeqDecoderBlock as DecoderBlock
from graphopt.testing import run_passes
from graphopt.trace import trace_network

TGT, SRC, HIDDEN, HEADS = 8, 12, 128, 4
HEAD_DIM = HIDDEN // HEADS
PREFIX = pipeline_before("cross-kv-inputs")
PIPELINE = (*PREFIX, "cross-kv-inputs", "fixed-mask", "kv-layout")


@pytest.fixture(scope="module")
def layer():
    config = BartConfig(vocab_size=1024, d_model=HIDDEN, encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
                          decoder_attention_heads=HEADS, encoder_ffn_dim=256, decoder_ffn_dim=256, pad_token_id=0,
                          decoder_start_token_id=0, init_std=0.2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return BartForConditionalGeneration(config).eval().model.decoder.layers[0]


def _trace(layer, steps, name):
    g = torch.Generator().manual_seed(1)
    inputs = {"input_states": torch.randn(1, steps, HIDDEN, generator=g), "attention_mask": causal_mask(steps, steps, steps),
              "encoder_hidden_states": torch.randn(1, SRC, HIDDEN, generator=g),
              "encoder_attention_mask": torch.zeros(1, 1, steps, SRC)}
    kind = "decoder_block" if steps > 1 else "decoder_block_cache"
    return trace_network(DecoderBlock(layer), inputs, name=name, kind=kind, output_names=["hidden_states"],
                         seq_length=TGT), inputs


def _cross_kv(layer, encoder_states):
    """What the cross_kv network computes: the projections, in [1, SRC, heads, head_dim]."""
    attn = layer.encoder_attn
    return tuple(proj(encoder_states).view(1, SRC, HEADS, HEAD_DIM) for proj in (attn.k_proj, attn.v_proj))


def _source_padding(length, steps):
    """[1, 1, steps, SRC], the shape transformers 4.x checks for; 5.x would broadcast [1, 1, 1, SRC] too."""
    mask = torch.zeros(1, 1, steps, SRC)
    mask[..., length:] = -10000.0
    return mask


def test_cross_kv_become_inputs_and_numbers_hold(layer):
    net, inputs = _trace(layer, TGT, "decoder_block_0")
    run_passes(net, *PREFIX)
    padding = _source_padding(9, TGT)  # the last 3 source positions are padding
    states, mask, encoder_states = inputs["input_states"], inputs["attention_mask"], inputs["encoder_hidden_states"]
    (before,) = net.run(states, mask, encoder_states, padding)
    run_passes(net, "cross-kv-inputs", "fixed-mask", "kv-layout")
    assert [(s.name, s.shape) for s in net.inputs] == [
        ("input_states", (1, TGT, HIDDEN)), ("attention_mask", (1, 1, TGT, TGT)), ("encoder_attention_mask", (1, 1, TGT, SRC)),
        ("cross_k", (1, SRC, HEADS, HEAD_DIM)), ("cross_v", (1, SRC, HEADS, HEAD_DIM))]
    assert [s.name for s in net.outputs] == ["hidden_states", "past_k", "past_v"]  # the self-attention's K/V only
    assert len(attention_nodes(net)) == 1 and len(cross_attention_nodes(net)) == 1
    assert not any("encoder_attn_k_proj" in str(n.target) for n in net.graph.nodes)  # projections gone
    with torch.no_grad():
        after = net.run(states, mask, padding, *_cross_kv(layer, encoder_states))
    torch.testing.assert_close(after[0], before, rtol=1e-5, atol=1e-5)


def test_decoding_one_token_matches_that_row_of_prefill(layer):
    prefill, inputs = _trace(layer, TGT, "decoder_block_0")
    decode, _ = _trace(layer, 1, "decoder_block_cache_0")
    run_passes(prefill, *PIPELINE)
    run_passes(decode, *PIPELINE, "concat-cache", "attention-lower")
    assert [s.name for s in decode.inputs] == ["input_states", "attention_mask", "encoder_attention_mask", "cross_k",
                                               "cross_v", "history_k", "history_v"]
    states, encoder_states = inputs["input_states"], inputs["encoder_hidden_states"]
    padding = _source_padding(9, TGT)
    with torch.no_grad():
        cross = _cross_kv(layer, encoder_states)
    hidden, past_k, past_v = prefill.run(states, inputs["attention_mask"], padding, *cross)
    for row in (0, 3, TGT - 1):
        history_k, history_v = past_k.clone(), past_v.clone()
        history_k[:, row:] = 1e3 * torch.randn_like(history_k[:, row:])  # not written yet: must be masked
        history_v[:, row:] = 1e3 * torch.randn_like(history_v[:, row:])
        out = decode.run(states[:, row:row + 1], decode_mask(TGT, row), padding[:, :, :1], *cross, history_k, history_v)
        torch.testing.assert_close(out[0], hidden[:, row:row + 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1], past_k[:, row:row + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[2], past_v[:, row:row + 1], rtol=1e-5, atol=1e-5)


def test_a_network_without_encoder_states_is_refused_by_name(layer):
    net, _ = _trace(layer, TGT, "decoder_block_0")
    run_passes(net, *PREFIX, "cross-kv-inputs")  # drops the encoder_hidden_states input
    with pytest.raises(PassMatchError, match="cross-kv-inputs.*decoder_block_0.*no 'encoder_hidden_states' input"):
        run_passes(net, "cross-kv-inputs")
