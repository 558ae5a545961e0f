"""fold-attention-scale on real traced blocks: the numbers hold, the scale moved into the weights,
and attention-lower then emits no multiply; a query that is not linear in its projection is left alone."""

import math

import pytest
import torch

from graphopt.checks import check_inputs
from graphopt.pass_manager import PassManager
from graphopt.passes._attention import attention_nodes, sdpa_arg
from graphopt.plugins import PassPlugins, load_passes
from graphopt.testing import pipeline_before, run_passes, traced

aten = torch.ops.aten
HERE = "examples/passes/fold_attention_scale.py"
BEFORE = (*pipeline_before("kv-layout"), "kv-layout")

load_passes(PassPlugins((HERE,), entry_points=False))  # registers fold-attention-scale, as --pass-file does


def _scale_multiplies(net, scale):
    return [n for n in net.calls(aten.mul.Tensor) if any(isinstance(a, float) and math.isclose(a, scale) for a in n.args)]


@pytest.mark.parametrize("name, extra", [("block_0", ()), ("block_cache_0", ("concat-cache",))])
def test_the_scale_moves_into_q_proj_and_numbers_hold(name, extra):
    net = run_passes(traced(name), *BEFORE, *extra)
    args = check_inputs(net, vocab=1024)
    before = net.run(*args)
    (weight,) = [n for n in net.graph.nodes if n.op == "get_attr" and "q_proj" in n.target]
    original = _tensor(net, weight)
    run_passes(net, "fold-attention-scale")
    (attention,) = attention_nodes(net)
    assert sdpa_arg(attention, "scale") == 1.0
    (scaled,) = [n for n in net.graph.nodes if n.op == "get_attr" and "q_proj" in n.target]
    torch.testing.assert_close(_tensor(net, scaled), original * 32 ** -0.5)
    torch.testing.assert_close(net.run(*args), before, rtol=1e-4, atol=1e-4)
    run_passes(net, "attention-lower")
    assert not _scale_multiplies(net, 32 ** -0.5) and not _scale_multiplies(net, 1.0)
    torch.testing.assert_close(net.run(*args), before, rtol=1e-4, atol=1e-4)


def test_a_query_normalised_per_head_is_left_alone():
    """Qwen3 RMS-normalises q per head (q · rsqrt(mean(q²))), which would undo a scale folded into q_proj."""
    net = run_passes(traced("block_0", model="tiny-qwen3"), *BEFORE)
    scale = sdpa_arg(attention_nodes(net)[0], "scale")
    (record,) = PassManager(["fold-attention-scale"]).run(net)
    assert record.note.startswith("folded the scale of 0 attention(s)") and "multiplies 2 factors" in record.note
    assert sdpa_arg(attention_nodes(net)[0], "scale") == scale


def _tensor(net, node):
    owner, _, attr = node.target.rpartition(".")
    return getattr(net.gm.get_submodule(owner) if owner else net.gm, attr)
