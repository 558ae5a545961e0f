import torch

from graphopt.testing import count, prefill_inputs, run_passes, traced
from graphopt.trace import trace_network

aten = torch.ops.aten


def test_removes_export_asserts_and_keeps_numbers():
    net = traced("block_0")
    assert count(net, aten._assert_tensor_metadata.default) > 0
    args = prefill_inputs(16)
    before = net.run(*args)
    run_passes(net, "strip-trace-noise")
    assert count(net, aten._assert_tensor_metadata.default) == 0
    torch.testing.assert_close(net.run(*args), before, rtol=0, atol=0)


class NoOpSliceOfMask(torch.nn.Module):
    """transformers 4.x slices the mask to the key length, `mask[:, :, :, : k.shape[-2]]`: export emits an alias."""

    def forward(self, input_states, position_ids, attention_mask):
        return input_states + attention_mask[:, :, :, : input_states.shape[-1]]


def test_removes_aliases_so_the_mask_is_the_input_itself():
    inputs = {"input_states": torch.randn(1, 1, 4, 4), "position_ids": torch.arange(4).view(1, 4),
              "attention_mask": torch.randn(1, 1, 4, 4)}
    net = trace_network(NoOpSliceOfMask(), inputs, name="toy", kind="block", output_names=["y"], seq_length=4)
    assert count(net, aten.alias.default) == 1
    before = net.run(*inputs.values())
    run_passes(net, "strip-trace-noise")
    assert count(net, aten.alias.default) == 0
    (add,) = net.calls(aten.add.Tensor)
    assert add.args[1] is net.input("attention_mask")
    torch.testing.assert_close(net.run(*inputs.values()), before, rtol=0, atol=0)
