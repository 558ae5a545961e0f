import pytest
import torch

from graphopt.passes._attention import SDPA
from graphopt.testing import count, decode_mask, pipeline_before, prefill_inputs, run_passes, traced

aten = torch.ops.aten
PIPELINE = pipeline_before("attention-lower")


def test_prefill_attention_becomes_matmul_softmax():
    net = run_passes(traced("block_0"), *PIPELINE)
    args = prefill_inputs(16, length=9)
    before = net.run(*args)
    run_passes(net, "attention-lower")
    assert count(net, SDPA) == 0
    assert count(net, aten.softmax.int) == 1 and count(net, aten.matmul.default) == 2
    # The scale multiplies the query [heads, steps, D] before q·kᵀ, not the [heads, steps, keys] scores.
    scores = next(net.calls(aten.matmul.default))
    assert scores.args[0].target == aten.mul.Tensor and scores.args[0].args[1] == pytest.approx(32 ** -0.5)
    assert count(net, aten.expand.default) == 2  # prefill: K and V repeated to the 4 query heads
    torch.testing.assert_close(net.run(*args), before, rtol=1e-4, atol=1e-4)


def test_decode_attention_with_gqa_history():
    net = run_passes(traced("block_cache_0"), *PIPELINE)
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(1, 1, 128, generator=g), torch.tensor([[6]]), decode_mask(16, 6),
            torch.randn(1, 16, 2, 32, generator=g), torch.randn(1, 16, 2, 32, generator=g))
    before = net.run(*args)
    run_passes(net, "attention-lower")
    assert count(net, SDPA) == 0 and count(net, aten.expand.default) == 0  # K and V stay in 2 kv-heads
    # The 2 query heads of each K/V head are the rows of one product with it: [1, 2 kv, 2, 32].
    grouped = next(net.calls(aten.matmul.default)).args[0]
    assert grouped.target == aten.reshape.default and list(grouped.args[1]) == [1, 2, 2, 32]
    torch.testing.assert_close(net.run(*args), before, rtol=1e-4, atol=1e-4)
