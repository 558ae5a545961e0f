import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.errors import PassMatchError
from graphopt.passes._attention import attention_nodes, sdpa_arg
from graphopt.passes.fixed_mask import MASK_BUILDING_OPS
from graphopt.testing import causal_mask, count, prefill_inputs, run_passes, run_until, traced
from graphopt.trace import trace_network

S = 8


def _heads(x):
    return x.view(1, S, 2, 4).transpose(1, 2)


class CausalFlag(nn.Module):
    """Attention that asks the kernel for causality instead of taking a mask."""

    def forward(self, input_states, position_ids, attention_mask):
        q = _heads(input_states)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


class BuildsMask(nn.Module):
    """Attention whose mask is built inside the network from arange and a comparison."""

    def forward(self, input_states, position_ids, attention_mask):
        q = _heads(input_states)
        steps = torch.arange(S, device=input_states.device)
        mask = torch.where(steps[None, :] <= steps[:, None], 0.0, -10000.0)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def _toy(module):
    inputs = {"input_states": torch.randn(1, S, 8), "position_ids": torch.arange(S).view(1, S),
              "attention_mask": causal_mask(S, S, S)}
    net = trace_network(module, inputs, name="block_toy", kind="block", output_names=["y"], seq_length=S)
    return run_passes(net, "strip-trace-noise", "views-to-reshapes", "attention-canonical"), inputs


def test_is_causal_becomes_the_mask_input():
    net, inputs = _toy(CausalFlag())
    args = tuple(inputs.values())
    before = net.run(*args)
    run_passes(net, "fixed-mask")
    (attention,) = attention_nodes(net)
    assert sdpa_arg(attention, "attn_mask") is net.input("attention_mask")
    assert not sdpa_arg(attention, "is_causal")
    torch.testing.assert_close(net.run(*args), before, rtol=1e-5, atol=1e-5)


def test_a_causal_mask_built_inside_from_constants_becomes_the_input():
    """Read by what it computes: on every prompt length it lets row i see keys 0..i, as the input does."""
    net, inputs = _toy(BuildsMask())
    args = tuple(inputs.values())
    before = net.run(*args)
    run_passes(net, "fixed-mask")
    (attention,) = attention_nodes(net)
    assert sdpa_arg(attention, "attn_mask") is net.input("attention_mask")
    torch.testing.assert_close(net.run(*args), before, rtol=1e-5, atol=1e-5)


def test_llama_block_keeps_numbers_and_has_no_mask_building_ops():
    net = run_passes(traced("block_0"), "strip-trace-noise", "views-to-reshapes", "attention-canonical")
    args = prefill_inputs(16, length=11)  # padded prompt: rows past 11 fully masked
    before = net.run(*args)
    run_passes(net, "rope-table", "fixed-mask")
    assert count(net, *MASK_BUILDING_OPS) == 0  # the mask comes from the input; nothing builds one
    torch.testing.assert_close(net.run(*args), before, rtol=1e-5, atol=1e-5)


class WhereActivation(nn.Module):
    """A comparison and a `where` computed from the hidden states (xIELU-like): an activation, not a mask."""

    def forward(self, input_states, position_ids, attention_mask):
        x = torch.where(input_states > 0, input_states * input_states, 0.5 * input_states)
        q = _heads(x)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=attention_mask)


class PositionGate(nn.Module):
    """A mask built from positions and applied outside attention: the runtime's mask can't stand in for it."""

    def forward(self, input_states, position_ids, attention_mask):
        q = _heads(input_states)
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=attention_mask)
        keep = (position_ids < 4).to(out.dtype).view(1, 1, S, 1)
        return out * keep


def test_comparisons_on_hidden_states_are_an_activation_not_a_mask():
    net, inputs = _toy(WhereActivation())
    args = tuple(inputs.values())
    before = net.run(*args)
    run_passes(net, "fixed-mask")
    assert sdpa_arg(attention_nodes(net)[0], "attn_mask") is net.input("attention_mask")
    assert any(n.target == torch.ops.aten.where.self for n in net.graph.nodes)
    torch.testing.assert_close(net.run(*args), before, rtol=0, atol=0)


def test_a_mask_built_from_positions_outside_attention_is_refused():
    net, _ = _toy(PositionGate())
    with pytest.raises(PassMatchError, match="fixed-mask.*block_toy.*build a mask from positions remain.*lt"):
        run_passes(net, "fixed-mask")


def _positions_masked(ahead: int):
    """A block that builds its own mask from positions: key j visible up to position + `ahead`."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(64, 192, bias=False)

        def forward(self, input_states, position_ids, attention_mask):
            b, t, _ = input_states.shape
            q, k, v = (x.view(b, t, 4, 16).transpose(1, 2) for x in self.qkv(input_states).split(64, -1))
            visible = torch.arange(t)[None, None, :] <= position_ids[:, :, None] + ahead
            scores = (q @ k.transpose(-2, -1) / 4.0).masked_fill(~visible[:, None], float("-inf"))
            return (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, 64)

    inputs = {"input_states": torch.randn(1, 8, 64), "position_ids": torch.arange(8)[None],
              "attention_mask": torch.zeros(1, 1, 8, 8)}
    net = trace_network(Block().eval(), inputs, name="block_0", kind="block", output_names=["hidden_states"],
                        seq_length=8)
    return run_until(net, "fixed-mask"), tuple(inputs.values())


def test_a_causal_mask_built_from_positions_becomes_the_input():
    net, inputs = _positions_masked(0)
    run_passes(net, "fixed-mask")
    (attention,) = attention_nodes(net)
    assert sdpa_arg(attention, "attn_mask") is net.input("attention_mask")
    assert count(net, torch.ops.aten.arange.default, torch.ops.aten.le.Tensor) == 0  # the mask's ops are gone


def test_a_mask_built_from_positions_that_is_not_causal_is_refused_with_where_it_differs():
    net, _ = _positions_masked(1)  # every query also sees the next key
    with pytest.raises(PassMatchError, match="for a 1-token prompt it lets row 0 see key 1"):
        run_passes(net, "fixed-mask")
