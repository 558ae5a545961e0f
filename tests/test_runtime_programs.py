"""The chip-style runtime is LLM-TPU's Llama3_1 chat demo step for step (its bits, its copies), and the
static memory check finds where those copies mean something else on a bmodel's layout (issue 17).

No toolchain needed: programs are recorded, run on the host, and checked against layouts measured
from real bmodels (tiny-llama, SEQ 64, w4f16, as libbmrt placed them with shared memory).
"""

import numpy as np

from graphopt.device_program import Buffer, Copy, HostDevice, IoSpec, Launch, Program, Read, Same, Tensor, Write
from graphopt.runtime import ATTENTION_MASK, ChipStyleRuntime, Shapes
from graphopt.targets.bm1684x import memory_check
from tests.recorder import Recorder

SEQ, LAYERS = 64, 2


def _runtime(device) -> ChipStyleRuntime:
    return ChipStyleRuntime(device, Shapes(seq_length=SEQ, num_layers=LAYERS, hidden=128, kv_heads=2, head_dim=32))


def _t(net, io, index):
    return Tensor(net, io, index)


def test_the_demo_writes_fp16_mask_bits_and_int32_ids_whatever_the_nets_dtype():
    assert int(ATTENTION_MASK.view(np.uint16)) == 0xF0E2  # chat.cpp: static const uint16_t ATTENTION_MASK = 0xF0E2
    recorder = Recorder(io_alone=True)
    runtime = _runtime(recorder)
    runtime.prefill([5, 6, 7, 8, 9])
    runtime.decode(7)
    prefill, decode = recorder.programs
    writes = {(w.dst.net, w.dst.index): w for w in prefill.steps if isinstance(w, Write)}
    ids, positions, mask = writes[("embedding", 0)], writes[("block_0", 1)], writes[("block_0", 2)]
    assert all(w.raw for w in (ids, positions, mask))
    assert ids.value.dtype == np.int32 and ids.value.tolist() == [5, 6, 7, 8, 9] + [0] * (SEQ - 5)
    assert positions.value.dtype == np.int32 and positions.value.tolist() == [0, 1, 2, 3, 4] + [0] * (SEQ - 5)
    bits = mask.value.view(np.uint16).reshape(SEQ, SEQ)
    assert bits[2, :3].tolist() == [0, 0, 0] and set(bits[2, 3:].tolist()) == {0xF0E2}
    assert set(bits[5:].reshape(-1).tolist()) == {0xF0E2}  # padding rows: masked everywhere
    writes = {(w.dst.net, w.dst.index): w for w in decode.steps if isinstance(w, Write)}
    assert writes[("embedding_cache", 0)].value.tolist() == [7]
    assert writes[("block_cache_0", 1)].value.tolist() == [5]  # token_length - 1
    bits = writes[("block_cache_0", 2)].value.view(np.uint16).reshape(-1)
    assert bits[:5].tolist() == [0] * 5 and set(bits[5:SEQ].tolist()) == {0xF0E2} and bits[SEQ] == 0


def test_a_second_turn_pads_with_the_tokens_of_the_first_as_the_demo_does():
    recorder = Recorder(io_alone=True)  # answers token 7 every time
    runtime = _runtime(recorder)
    runtime.generate([5, 6, 7, 8, 9], 3)
    runtime.prefill([1, 2])
    ids = recorder.programs[-1].steps[0]
    assert ids.dst == _t("embedding", "in", 0) and ids.value[:9].tolist() == [1, 2, 7, 8, 9, 7, 7, 7, 0]


def test_the_demo_copies_between_nets_as_chat_cpp_does():
    recorder = Recorder(io_alone=True)
    runtime = _runtime(recorder)
    runtime.prefill([5, 6, 7, 8, 9])
    runtime.decode(7)
    prefill, decode = (p.steps for p in recorder.programs)
    cache_k0, cache_v0 = _t("block_cache_0", "in", 3), _t("block_cache_0", "in", 4)  # io_alone: the cache is the input
    assert prefill[:2] == [prefill[0], Launch("embedding")]
    assert Copy(_t("block_0", "in", 0), _t("embedding", "out", 0)) == prefill[2]
    assert Copy(cache_k0, _t("block_0", "out", 1)) in prefill and Copy(cache_v0, _t("block_0", "out", 2)) in prefill
    # block_1 reads positions and mask from its own inputs, which the demo takes to be block_0's memory.
    assert Same(_t("block_1", "in", 1), _t("block_0", "in", 1)) in prefill
    assert Copy(_t("block_1", "in", 0), _t("block_0", "out", 0)) in prefill
    assert Copy(_t("lm_head", "in", 0), _t("block_1", "out", 0), src_row=4, rows=1) in prefill
    # lm_head, then greedy_head on lm_head's output in place; the logits are read (for the checks) before it runs.
    assert prefill[-4:] == [Launch("lm_head"), Read(_t("lm_head", "out", 0), "logits"),
                            Launch("greedy_head", ((0, _t("lm_head", "out", 0)),)), Read(_t("greedy_head", "out", 0), "next")]
    # Decode: layer 1 copies position and mask from block_cache_0's inputs; new K/V rows go to row len-1.
    assert Copy(_t("block_cache_1", "in", 1), _t("block_cache_0", "in", 1)) in decode
    assert Copy(cache_k0, _t("block_cache_0", "out", 1), dst_row=5) in decode
    assert Copy(_t("lm_head", "in", 0), _t("block_cache_1", "out", 0)) in decode
    # Without io_alone the demo allocates the caches and copies them into every decode step.
    recorder = Recorder(io_alone=False)
    runtime = _runtime(recorder)
    runtime.prefill([5])
    runtime.decode(7)
    decode = recorder.programs[1].steps
    past_key = Buffer("past_k_1", _t("block_cache_1", "in", 3))
    assert Copy(_t("block_cache_1", "in", 3), past_key) in decode and Copy(past_key, _t("block_cache_1", "out", 1),
                                                                             dst_row=1) in decode


def test_host_memory_keeps_what_the_demo_assumes_shared():
    """On the host every tensor is its own array: `Same` is what makes block_1 read block_0's positions."""
    seen = {}

    class Echo:
        def run(self, net, inputs):
            seen[net] = inputs
            return {"y": np.zeros(2, np.float32)}

    io = {"a": {"in": [("x", IoSpec((1, 2), np.dtype("float32")))], "out": [("y", IoSpec((1, 2), np.dtype("float32")))]},
          "b": {"in": [("x", IoSpec((1, 2), np.dtype("float32")))], "out": [("y", IoSpec((1, 2), np.dtype("float32")))]}}
    device = HostDevice(Echo(), io)
    device.execute(Program([Write(_t("a", "in", 0), np.array([1.5, -2], np.float16)), Same(_t("b", "in", 0), _t("a", "in", 0)),
                            Launch("a"), Launch("b")]))
    assert seen["b"]["x"].tolist() == [[1.5, -2.0]] and seen["b"]["x"].dtype == np.float32


def _entry(name, dtype, shape, addr, size):
    return {"name": name, "dtype": dtype, "shape": shape, "addr": addr, "size": size}


def measured_layout(embedding_io_alone: bool) -> dict:
    """tiny-llama w4f16 at SEQ 64 as libbmrt placed it (graphopt's bmodel before io_alone embeddings, and after)."""
    def block(cache: int):
        return {"addr_mode": 0, "stages": 1,
                "in": [_entry("input_states", "f16", [1, 64, 128], 0x105103000, 16384),
                       _entry("position_ids", "i32", [1, 64], 0x105102000, 256),
                       _entry("attention_mask", "f16", [1, 1, 64, 64], 0x105100000, 8192)],
                "out": [_entry("hidden_states", "f16", [1, 64, 128], 0x105115000, 16384),
                        _entry("past_k", "f16", [1, 64, 2, 32], 0x105125000, 8192),
                        _entry("past_v", "f16", [1, 64, 2, 32], 0x105113000, 8192)]}

    def block_cache(base: int):
        return {"addr_mode": 1, "stages": 1,
                "in": [_entry("input_states", "f16", [1, 1, 128], base, 256),
                       _entry("position_ids", "i32", [1, 1], base + 0x1000, 4),
                       _entry("attention_mask", "f16", [1, 1, 1, 65], base + 0x2000, 130),
                       _entry("history_k", "f16", [1, 64, 2, 32], base + 0x3000, 8192),
                       _entry("history_v", "f16", [1, 64, 2, 32], base + 0x5000, 8192)],
                "out": [_entry("hidden_states", "f16", [1, 1, 128], base + 0x8000, 256),
                        _entry("past_k", "f16", [1, 1, 2, 32], base + 0x9000, 128),
                        _entry("past_v", "f16", [1, 1, 2, 32], base + 0x7000, 128)]}

    embedding = (0x105167000, 0x105168000) if embedding_io_alone else (0x105100000, 0x105101000)
    lm_head = (0x10521e000, 0x10521f000) if embedding_io_alone else (0x105100000, 0x105101000)
    return {
        "embedding": {"addr_mode": int(embedding_io_alone), "stages": 1,
                      "in": [_entry("input_ids", "i32", [1, 64], embedding[0], 256)],
                      "out": [_entry("input_embed", "f16", [1, 64, 128], embedding[1], 16384)]},
        "embedding_cache": {"addr_mode": int(embedding_io_alone), "stages": 1,
                            "in": [_entry("input_ids", "i32", [1, 1], embedding[0] + 0x10000, 4)],
                            "out": [_entry("input_embed", "f16", [1, 1, 128], embedding[1] + 0x10000, 256)]},
        "block_0": block(0), "block_cache_0": block_cache(0x105194000),
        "block_1": block(1), "block_cache_1": block_cache(0x1051ca000),
        "lm_head": {"addr_mode": int(embedding_io_alone), "stages": 1,
                    "in": [_entry("hidden_states", "f16", [1, 128], lm_head[0], 256)],
                    "out": [_entry("m_logits", "f32", [1, 1024], lm_head[1], 4096)]},
        "greedy_head": {"addr_mode": 0, "stages": 1, "in": [_entry("m_logits", "f32", [1, 1024], 0x105100000, 4096)],
                        "out": [_entry("token", "i32", [1, 1], 0x105103000, 4)]},
    }


def test_the_first_turn_copy_that_overlapped_its_source_is_found():
    hazards = memory_check.check(measured_layout(embedding_io_alone=False))
    assert len(hazards) == 1, hazards
    assert hazards[0].startswith("the runtime copies embedding output 0 (input_embed, 16384 bytes at 0x105101000) "
                                 "into block_0 input 0 (input_states, 16384 bytes at 0x105103000)")
    assert "overlaps the source" in hazards[0]
    assert memory_check.check(measured_layout(embedding_io_alone=True)) == []


def test_inputs_the_demo_writes_once_must_live_where_every_block_reads_them():
    layout = measured_layout(embedding_io_alone=True)
    # If block_1's positions were elsewhere, block_1 would read what block_0 never wrote there.
    layout["block_1"]["in"][1] = _entry("position_ids", "i32", [1, 64], 0x105140000, 256)
    (hazard,) = memory_check.check(layout)
    assert hazard.startswith("block_1 input 1 (position_ids, at 0x105140000): the runtime means it to hold the "
                             "positions (written into block_0 input 1)") and "nothing the runtime wrote" in hazard
    # If a block's output overwrote the mask, the next block would read the output as its mask.
    layout = measured_layout(embedding_io_alone=True)
    layout["block_0"]["out"][2]["addr"] = layout["block_1"]["out"][2]["addr"] = 0x105100000
    found = memory_check.check(layout)
    assert any(h.startswith("block_1 input 2 (attention_mask, at 0x105100000): the runtime means it to hold the "
                            "prefill mask") and "block_0 output 2 (past_v)" in h for h in found), found
