"""encoder-padding-mask on a real Marian encoder: the bool mask transformers builds becomes the additive
padding mask of the `attention_mask` input, numbers unchanged on a padded source, and a mask that
depends on more than the padding is refused."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import MarianConfig, MarianMTModel

from graphopt.errors import PassMatchError
from graphopt.contract import MASK_VALUE
from graphopt.passes._attention import SDPA, attention_nodes
from graphopt.networks.seq2seq import Encoder
from graphopt.testing import count, pipeline_before, run_passes
from graphopt.trace import trace_network

SRC, HIDDEN, TOKENS = 12, 64, 9  # the last 3 source positions are padding
PREFIX = pipeline_before("cross-kv-inputs")  # an encoder's passes before its mask pass
aten = torch.ops.aten


def _source():
    ids = torch.randint(3, 100, (1, SRC), generator=torch.Generator().manual_seed(1))
    valid = torch.zeros(1, SRC, dtype=torch.int64)
    valid[0, :TOKENS] = 1
    return ids, valid


def _trace(module):
    ids, valid = _source()
    return trace_network(module, {"input_ids": ids, "attention_mask": torch.ones_like(valid)}, name="encoder",
                         kind="encoder", output_names=["encoder_hidden_states"], seq_length=SRC)


@pytest.fixture(scope="module")
def encoder():
    config = MarianConfig(vocab_size=100, d_model=HIDDEN, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, pad_token_id=0,
                          decoder_start_token_id=0, max_position_embeddings=SRC, attn_implementation="sdpa")
    torch.manual_seed(0)
    return MarianMTModel(config).eval().model.encoder


def test_the_mask_becomes_additive_padding_and_numbers_hold(encoder):
    net = _trace(Encoder(encoder))
    run_passes(net, *PREFIX)
    bool_masks = {sdpa.args[3].meta["val"].dtype for sdpa in attention_nodes(net)}
    assert bool_masks == {torch.bool}  # what transformers 5 hands SDPA; the pass must not depend on it
    run_passes(net, "encoder-padding-mask")
    (mask,) = {sdpa.kwargs["attn_mask"] for sdpa in attention_nodes(net)}  # one mask for both layers
    assert mask.meta["val"].dtype == torch.float32 and tuple(mask.meta["val"].shape) == (1, 1, 1, SRC)
    ids, valid = _source()
    expected = encoder(input_ids=ids, attention_mask=valid).last_hidden_state
    (got,) = net.run(ids, valid)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # padded rows included
    run_passes(net, "attention-lower")
    assert count(net, SDPA) == 0
    assert count(net, aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.isnan.default) == 0
    (lowered,) = net.run(ids, valid)
    torch.testing.assert_close(lowered, expected, rtol=1e-5, atol=1e-5)
    # The mask's values are the runtime's: 0 over tokens, -10000 over padding.
    mask_values = torch.fx.GraphModule(net.gm, _subgraph_to(net, mask))(ids, valid)
    assert mask_values[..., :TOKENS].eq(0).all() and mask_values[..., TOKENS:].eq(MASK_VALUE).all()


def _subgraph_to(net, node):
    """A copy of the graph that returns `node` (to read an intermediate value)."""
    copy = torch.fx.Graph()
    mapping = {}
    for n in net.graph.nodes:
        if n.op == "output":
            break
        mapping[n] = copy.node_copy(n, lambda a: mapping[a])
    copy.output(mapping[node])
    return copy


class TokenMaskingEncoder(nn.Module):
    """One attention whose mask also hides a token id: not padding alone."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, HIDDEN)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids).view(1, SRC, 4, HIDDEN // 4).transpose(1, 2)
        keep = (attention_mask.bool() & (input_ids != 7))[:, None, None, :]
        return F.scaled_dot_product_attention(x, x, x, attn_mask=keep).transpose(1, 2).reshape(1, SRC, HIDDEN)


def test_a_mask_computed_from_the_tokens_is_refused():
    net = run_passes(_trace(TokenMaskingEncoder().eval()), *PREFIX)
    with pytest.raises(PassMatchError, match="not computed from the 'attention_mask' input alone"):
        run_passes(net, "encoder-padding-mask")
