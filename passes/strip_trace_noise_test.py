import torch

from graphopt.testing import count, prefill_inputs, run_passes, traced

aten = torch.ops.aten


def test_removes_export_asserts_and_keeps_numbers():
    net = traced("block_0")
    assert count(net, aten._assert_tensor_metadata.default) > 0
    args = prefill_inputs(16)
    before = net.run(*args)
    run_passes(net, "strip-trace-noise")
    assert count(net, aten._assert_tensor_metadata.default) == 0
    torch.testing.assert_close(net.run(*args), before, rtol=0, atol=0)
