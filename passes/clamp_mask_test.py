"""clamp-mask: the mask inputs are clamped at −10000 (nothing else changes), and that is what keeps a bf16
block finite under the fp16 mask bits LLM-TPU's Llama3_1 demo writes (issue 17, defect 1)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from graphopt.device_program import Launch, Program, Read, Tensor, Write
from graphopt.models import open_model
from graphopt.contract import MASK_VALUE
from graphopt.runtime import ATTENTION_MASK
from graphopt.targets import get_target
from graphopt.export import export_networks
from graphopt.testing import count, pipeline_before, prefill_inputs, run_passes, traced

aten = torch.ops.aten
UP_TO_FIXED_MASK = pipeline_before("encoder-padding-mask")


def test_every_reader_of_the_mask_reads_it_clamped_and_outputs_do_not_change():
    net = run_passes(traced("block_0", 16), *UP_TO_FIXED_MASK)
    args = prefill_inputs(16, length=5)
    before = net.run(*args)
    note = run_passes(net, "clamp-mask")
    mask = net.input("attention_mask")
    (clamp,) = mask.users
    assert clamp.target == aten.clamp_min.default and clamp.args[1] == MASK_VALUE
    assert count(net, aten.clamp_min.default) == 1
    torch.testing.assert_close(net.run(*args), before, rtol=0, atol=0)
    # A mask far below −10000 (fp16 0xF0E2 read as bf16: −5.6e29) now means what −10000 means.
    deeper = (args[0], args[1], torch.where(args[2] < 0, torch.tensor(-5.6e29), args[2]))
    torch.testing.assert_close(net.run(*deeper), before, rtol=0, atol=0)


def test_decode_blocks_clamp_the_widened_mask():
    net = run_passes(traced("block_cache_0", 16), *UP_TO_FIXED_MASK, "kv-layout", "concat-cache", "clamp-mask")
    (clamp,) = net.input("attention_mask").users
    assert clamp.target == aten.clamp_min.default and tuple(clamp.meta["val"].shape) == (1, 1, 1, 17)


SEQ, PROMPT = 32, 5


def _compiled_block(tools, folder, pipeline):
    """block_0 of tiny-llama through `pipeline`, compiled W4BF16 as the contract compiles it (its flags
    and top passes: the NaN comes from TPU-MLIR's FAttention, which fuse-flash-attention writes)."""
    from graphopt.targets.bm1684x import contract, deploy
    from graphopt.targets.bm1684x.top_passes import passes_for

    target = dataclasses.replace(get_target("bm1684x"), fx_pipeline=pipeline)
    result = export_networks(open_model("tiny-llama"), ["block_0"], SEQ, folder, target=target)["block_0"]
    spec = contract.DeploySpec("block_0", "block_0", tuple(s.shape for s in result.inputs), "W4BF16",
                               contract.block_flags("w4bf16", contract.DEFAULT_GROUP_SIZE),
                               passes_for("block", mode="W4BF16"))
    return deploy.deploy_network(tools, spec, result.files[0], result.sha256).bmodel


def _prefill(sim, bmodel, demo_bits: bool) -> np.ndarray:
    """block_0's hidden states for a 5-token prompt padded to SEQ. demo_bits: the mask written as the
    Llama3_1 demo writes it (fp16 bits, whatever the input's dtype); else as bf16 values."""
    states, positions, mask = (t.numpy() for t in prefill_inputs(SEQ, length=PROMPT))
    program = Program([Write(Tensor("block_0", "in", 0), states, raw=False),
                       Write(Tensor("block_0", "in", 1), positions.astype(np.int32)),
                       Write(Tensor("block_0", "in", 2), mask.astype(ATTENTION_MASK.dtype)) if demo_bits else
                       Write(Tensor("block_0", "in", 2), mask, raw=False),
                       Launch("block_0"), Read(Tensor("block_0", "out", 0), "hidden")])
    return sim.execute(bmodel, program)["hidden"].reshape(1, SEQ, -1)


def test_a_bf16_block_under_the_demo_mask_bits_is_finite_only_clamped(tools, tmp_path, monkeypatch):
    from graphopt.targets.bm1684x.simulator import Simulator

    monkeypatch.setenv("GRAPHOPT_NET_CACHE", str(tmp_path / "net-cache"))
    pipeline = get_target("bm1684x").fx_pipeline
    assert "clamp-mask" in pipeline
    unclamped = _compiled_block(tools, tmp_path / "unclamped", tuple(p for p in pipeline if p != "clamp-mask"))
    clamped = _compiled_block(tools, tmp_path / "clamped", pipeline)
    with Simulator(tools, tmp_path / "simulator.log") as sim:
        # Unclamped, the bits (−5.6e29 in bf16) turn the fully masked padding rows into NaN, which the next
        # block reads as K/V; the same mask written as bf16 values does not.
        assert np.isnan(_prefill(sim, unclamped, demo_bits=True)[:, PROMPT:]).any()
        assert np.isfinite(_prefill(sim, unclamped, demo_bits=False)).all()
        # Clamped, the demo's bits mean exactly what the bf16 value means.
        demo, values = _prefill(sim, clamped, demo_bits=True), _prefill(sim, clamped, demo_bits=False)
        assert np.isfinite(demo).all() and np.array_equal(demo, values)
