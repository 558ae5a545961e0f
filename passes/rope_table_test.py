import pytest
import torch
import torch.nn as nn

from graphopt.errors import PassMatchError
from graphopt.testing import count, pipeline_before, prefill_inputs, run_passes, traced
from graphopt.trace import trace_network

aten = torch.ops.aten
PREP = pipeline_before("rope-table")


@pytest.mark.parametrize("name,seq", [("block_0", 16), ("block_cache_0", 16)])
def test_cos_sin_become_tables_with_the_same_numbers(name, seq):
    net = run_passes(traced(name, seq), *PREP)
    assert count(net, aten.cos.default) == 1 and count(net, aten.sin.default) == 1
    steps = net.inputs[0].shape[1]
    g = torch.Generator().manual_seed(1)
    # Any positions below SEQ, in any order: the tables must not assume arange.
    positions = torch.randint(0, seq, (1, steps), generator=g)
    args = (torch.randn(1, steps, 128, generator=g), positions, torch.zeros(net.inputs[2].shape))
    before = net.run(*args)
    run_passes(net, "rope-table")
    assert count(net, aten.cos.default) == 0 and count(net, aten.sin.default) == 0
    tables = [t for n, t in net.gm.named_buffers() if n.startswith("rope_table")]
    assert [tuple(t.shape) for t in tables] == [(seq, 32), (seq, 32)]  # SEQ rows × head_dim, cos and sin
    assert all(t.dtype == torch.float32 for t in tables)
    torch.testing.assert_close(net.run(*args), before, rtol=1e-5, atol=1e-5)


class MixesPositions(nn.Module):
    """A 'rope' whose angle depends on other positions too (a running sum): not tabulatable."""

    def forward(self, input_states, position_ids, attention_mask):
        angle = torch.cumsum(position_ids, dim=1).unsqueeze(-1).float()
        return input_states * torch.cos(angle)


def test_refuses_a_value_that_is_not_per_position():
    inputs = {"input_states": torch.randn(1, 8, 4), "position_ids": torch.arange(8).view(1, 8),
              "attention_mask": torch.zeros(1, 1, 8, 8)}
    net = trace_network(MixesPositions(), inputs, name="block_x", kind="block", output_names=["y"], seq_length=8)
    with pytest.raises(PassMatchError, match="rope-table.*block_x.*not a function of each position"):
        run_passes(net, "rope-table")


def test_refuses_a_block_without_positions():
    net = traced("lm_head")
    net.kind = "block"
    with pytest.raises(PassMatchError, match="no 'position_ids' input"):
        run_passes(net, "rope-table")
