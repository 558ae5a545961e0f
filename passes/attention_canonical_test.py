import pytest
import torch

from graphopt.errors import PassMatchError
from graphopt.ir import shape_of
from graphopt.passes._attention import attention_nodes, sdpa_arg
from graphopt.testing import count, prefill_inputs, run_passes, traced

aten = torch.ops.aten


def test_attention_reads_kv_heads_and_repeat_is_gone():
    net = run_passes(traced("block_0"), "strip-trace-noise", "views-to-reshapes")
    assert count(net, aten.expand.default) == 2  # repeat_kv on K and on V
    args = prefill_inputs(16)
    before = net.run(*args)
    run_passes(net, "attention-canonical")
    (attention,) = attention_nodes(net)
    assert shape_of(sdpa_arg(attention, "key"))[1] == 2  # tiny-llama: 4 query heads, 2 kv heads
    assert shape_of(sdpa_arg(attention, "value"))[1] == 2
    assert sdpa_arg(attention, "enable_gqa") is True
    assert count(net, aten.expand.default) == 0
    torch.testing.assert_close(net.run(*args), before, rtol=1e-5, atol=1e-5)


def test_a_network_without_attention_is_refused_by_name():
    net = traced("lm_head")
    net.kind = "block"  # pretend: the pass must say what it did not find
    with pytest.raises(PassMatchError, match="attention-canonical.*lm_head.*no attention"):
        run_passes(net, "attention-canonical")
