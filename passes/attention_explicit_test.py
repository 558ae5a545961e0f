import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.passes._attention import SDPA, attention_nodes, sdpa_arg
from graphopt.passes.attention_explicit import read_attention
from graphopt.testing import count, run_passes
from graphopt.trace import trace_network

aten = torch.ops.aten
T, HEADS, D = 8, 4, 16


class Written(nn.Module):
    """Attention as people write it: `mask` says how the mask is applied, `upcast` whether the scores go to
    fp32 for the softmax, `scale_q` whether the scale multiplies the queries instead of the scores."""

    def __init__(self, mask: str, upcast: bool = False, scale_q: bool = False, softcap: float | None = None):
        super().__init__()
        self.qkv, self.out = nn.Linear(64, 3 * 64, bias=False), nn.Linear(64, 64, bias=False)
        self.mask, self.upcast, self.scale_q, self.softcap = mask, upcast, scale_q, softcap

    def forward(self, input_states, position_ids, attention_mask):
        b, t, _ = input_states.shape
        q, k, v = (x.view(b, t, HEADS, D).transpose(1, 2) for x in self.qkv(input_states).split(64, -1))
        if self.scale_q:
            scores = (q * D ** -0.5) @ k.transpose(-2, -1)
        else:
            scores = torch.matmul(q, k.permute(0, 1, 3, 2)) / math.sqrt(D)
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        visible = torch.arange(t)[None, :] <= position_ids[0][:, None]  # built from positions
        if self.mask == "add":
            scores = scores + attention_mask
        elif self.mask == "masked_fill":
            scores = scores.masked_fill(~visible, float("-inf"))
        elif self.mask == "where":
            scores = torch.where(visible, scores, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float() if self.upcast else scores, dim=-1).to(q.dtype)
        return self.out((probs @ v).transpose(1, 2).reshape(b, t, 64))


def _traced(module: nn.Module):
    torch.manual_seed(0)
    inputs = {"input_states": torch.randn(1, T, 64), "position_ids": torch.arange(T)[None],
              "attention_mask": torch.triu(torch.full((1, 1, T, T), -10000.0), 1)}
    net = trace_network(module.eval(), inputs, name="block_0", kind="block", output_names=["hidden_states"],
                        seq_length=T)
    return run_passes(net, "strip-trace-noise", "views-to-reshapes"), tuple(inputs.values())


@pytest.mark.parametrize("mask, upcast, scale_q", [
    ("add", False, False), ("masked_fill", True, False), ("where", False, True), ("none", True, True)])
def test_written_out_attention_becomes_one_call_that_computes_the_same(mask, upcast, scale_q):
    net, inputs = _traced(Written(mask, upcast, scale_q))
    before = net.run(*inputs)
    run_passes(net, "attention-explicit")
    (attention,) = attention_nodes(net)
    assert count(net, aten.softmax.int) == 0 and count(net, aten.matmul.default) == 0
    assert sdpa_arg(attention, "scale") == pytest.approx(1.0 if scale_q else D ** -0.5)
    if mask == "masked_fill":  # masked where NOT visible: the call reads `visible` itself, no double negation
        assert sdpa_arg(attention, "attn_mask").target == aten.le.Tensor
    torch.testing.assert_close(net.run(*inputs), before, rtol=1e-5, atol=1e-5)


def test_soft_capped_scores_are_left_alone_and_say_why():
    net, _ = _traced(Written("add", softcap=50.0))
    run_passes(net, "attention-explicit")
    assert count(net, SDPA) == 0
    (softmax,) = net.calls(aten.softmax.int)
    assert "soft-capped" in read_attention(softmax)


def test_a_softmax_that_is_not_attention_is_left_alone():
    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(64, 8, bias=False)

        def forward(self, input_states, position_ids, attention_mask):
            return input_states * F.softmax(self.gate(input_states), dim=-1).sum(-1, keepdim=True)

    net, _ = _traced(Router())
    run_passes(net, "attention-explicit")
    (softmax,) = net.calls(aten.softmax.int)
    assert "is not multiplied by values" in read_attention(softmax)
