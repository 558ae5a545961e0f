"""sink-head-transpose on a decode block: the numbers hold, RoPE's output is the past_k output itself (no
permute left on it), and a prefill block is left alone."""

import torch

from graphopt.pass_manager import PassManager
from graphopt.testing import count, decode_mask, pipeline_before, run_passes, traced

aten = torch.ops.aten
SEQ = 16


def _decode_inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(1, 1, 128, generator=g), torch.tensor([[5]]), decode_mask(SEQ, 5),
            torch.randn(1, SEQ, 2, 32, generator=g), torch.randn(1, SEQ, 2, 32, generator=g))


def test_the_new_k_is_ropes_own_output_and_numbers_hold():
    net = run_passes(traced("block_cache_0", SEQ), *pipeline_before("sink-head-transpose"))
    args = _decode_inputs()
    before = net.run(*args)
    permutes = count(net, aten.permute.default)
    (record,) = PassManager(["sink-head-transpose"]).run(net)
    assert record.changed == 4  # q's and k's RoPE moved; past_k's and past_v's permutes cancelled
    torch.testing.assert_close(net.run(*args), before, rtol=0, atol=0)
    past_k, past_v = net.output_values()[1:]
    assert past_k.target == aten.add.Tensor and tuple(past_k.meta["val"].shape) == (1, 1, 2, 32)  # RoPE's sum
    assert past_v.target == aten.reshape.default  # the projection, as it is
    assert count(net, aten.permute.default) == permutes - 2


def test_a_prefill_block_is_left_alone():
    net = run_passes(traced("block_0", SEQ), *pipeline_before("sink-head-transpose"))
    code = net.gm.code
    run_passes(net, "sink-head-transpose")
    assert net.gm.code == code  # T > 1: the transpose moves a real axis
