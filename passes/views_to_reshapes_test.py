import torch

from graphopt.testing import count, prefill_inputs, run_passes, traced

aten = torch.ops.aten


def test_every_view_becomes_a_reshape():
    net = run_passes(traced("block_0"), "strip-trace-noise")
    views = count(net, aten.view.default, aten._unsafe_view.default)
    assert views > 0
    reshapes = count(net, aten.reshape.default)
    args = prefill_inputs(16)
    before = net.run(*args)
    run_passes(net, "views-to-reshapes")
    assert count(net, aten.view.default, aten._unsafe_view.default) == 0
    assert count(net, aten.reshape.default) == reshapes + views
    torch.testing.assert_close(net.run(*args), before, rtol=0, atol=0)
