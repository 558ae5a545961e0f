"""--dynamic and --history-kv (graphopt.contract.llm_tpu_with): dynamic prefill blocks that compute their own
causal mask, and block_kv_i, a chunk of new rows against the cache, driven as LLM-TPU's Qwen3 cpp_demo
drives them (`forward_first_with_kv`).

The program tests record what the runtime does (no toolchain); the compile tests run the ONNX target, whose
checks hold block_kv_i to its prefill block and a three-turn chat to transformers on the whole conversation.
"""

import json
import re

import numpy as np
import pytest

from graphopt import contract as c
from graphopt.checks import chat_check, chat_prompts
from graphopt.compiler import compile_model
from graphopt.device_program import Buffer, Copy, Launch, Tensor, Write
from graphopt.errors import GraphoptError
from graphopt.models import open_model
from graphopt.runtime import LlmTpuRuntime, OrtBackend, Shapes, runtime_for
from graphopt.targets.onnx_target import ONNX_TARGET
from tests.recorder import Recorder

SEQ, CHUNK, LAYERS = 64, 16, 2
HISTORY = c.llm_tpu_with((c.HISTORY_KV,))


def _runtime(contract=HISTORY, **kwargs) -> tuple[LlmTpuRuntime, Recorder]:
    recorder = Recorder()
    shapes = Shapes(seq_length=SEQ, num_layers=LAYERS, hidden=128, kv_heads=2, head_dim=32, max_input=CHUNK)
    return LlmTpuRuntime(recorder, shapes, contract=contract, **kwargs), recorder


def test_the_options_change_the_networks_as_llm_converts_do():
    dynamic = c.llm_tpu_with((c.DYNAMIC,))
    assert dynamic.spec(c.BLOCK).device_inputs == (c.INPUT_STATES, c.POSITION_IDS)  # the mask is baked
    assert dynamic.spec(c.BLOCK).inputs == (c.INPUT_STATES, c.POSITION_IDS, c.ATTENTION_MASK)  # the ONNX's
    assert not dynamic.has(c.BLOCK_KV) and dynamic.describe == "llm-tpu --dynamic"
    # History-KV makes the blocks dynamic too, and adds block_kv_i: no mask, the cache as inputs 2 and 3.
    assert HISTORY.options == {c.DYNAMIC, c.HISTORY_KV} and HISTORY.describe == "llm-tpu --dynamic --history-kv"
    assert HISTORY.spec("block_kv_3").device_inputs == (c.INPUT_STATES, c.POSITION_IDS, c.HISTORY_K, c.HISTORY_V)
    assert [s.name for s in HISTORY.networks if s.per_layer] == ["block_{layer}", "block_cache_{layer}",
                                                                  "block_kv_{layer}"]
    assert c.llm_tpu_with(()) is c.LLM_TPU
    # Read back from a manifest, and from a bmodel's net names and block_0's inputs.
    assert c.contract_of_manifest({"contract": "llm-tpu", "contract_options": ["history-kv"]}).options == HISTORY.options
    assert c.contract_of_nets(["embedding", "block_0", "block_kv_0", "lm_head"]).has(c.BLOCK_KV)
    assert c.contract_of_nets(["embedding", "block_0", "lm_head"], block_inputs=2).describe == "llm-tpu --dynamic"
    assert c.contract_of_nets(["embedding", "block_0", "lm_head"], block_inputs=3) is c.LLM_TPU


def test_a_baked_mask_is_causal_after_the_cache_at_the_lengths_a_launch_sets():
    mask = c.launch_mask((1, 1, 4, 10), rows=3, history=2)  # block_kv: 4 rows, 6 cache rows; 3 new after 2 cached
    visible = mask[0, 0] == 0
    assert visible[:3, :2].all() and not visible[:, 2:6].any()  # the first 2 cache rows, not the 4 stale ones
    assert (visible[:3, 6:] == np.tril(np.ones((3, 4), bool))).all() and not visible[3].any()  # causal; padding
    assert np.array_equal(c.baked_mask(4, 0), c.causal_mask(4, 4, 4))  # block_i's at its full length


def test_a_long_prompt_runs_in_chunks_through_block_then_block_kv():
    """cpp_demo forward_first_with_kv: 21 tokens with a 16-row chunk: the first chunk through block_i (no cache),
    the second through block_kv_i with the 16 cached rows copied into its history inputs; lengths set per
    launch, no mask written; each chunk's K/V copied into the cache after the rows before it."""
    runtime, recorder = _runtime()
    runtime.prefill(list(range(1, 22)))
    steps = recorder.programs[-1].steps
    launches = [s for s in steps if isinstance(s, Launch) and s.net.startswith("block")]
    assert [(s.net, s.dims) for s in launches] == [
        ("block_0", ((0, 1, 16), (1, 1, 16))), ("block_1", ((0, 1, 16), (1, 1, 16))),
        ("block_kv_0", ((0, 1, 5), (1, 1, 5), (2, 1, 16), (3, 1, 16))),
        ("block_kv_1", ((0, 1, 5), (1, 1, 5), (2, 1, 16), (3, 1, 16)))]
    assert not any(isinstance(s, Write) and "mask" in s.what for s in steps)
    # The whole prompt's hidden states go into a buffer of SEQ rows, chunk after chunk.
    buffer = Buffer("dev_buffer", Tensor("embedding", "out", 0), SEQ)
    assert [(s.dst_row, s.rows) for s in steps if isinstance(s, Copy) and s.dst == buffer] == [(0, 16), (16, 5)]
    cache_k = Tensor("block_cache_0", "in", 3)
    assert Copy(Tensor("block_kv_0", "in", 2), cache_k, rows=16) in steps  # the history, its first 16 rows
    assert [(s.dst_row, s.rows) for s in steps if isinstance(s, Copy) and s.dst == cache_k] == [(0, 16), (16, 5)]
    positions = [s.value for s in steps if isinstance(s, Write) and s.dst == Tensor("block_kv_0", "in", 1)]
    assert positions[0][:5].tolist() == [16, 17, 18, 19, 20]
    assert runtime.length == 21


def test_a_later_turn_continues_the_session_and_counts_it_as_the_cpp_demo_does():
    """The second turn's chunk reads the cache the first turn and its answer left (21 + 2 rows). After it the
    cpp_demo counts one row more than the cache holds (it adds the turn to a count that held the previous
    answer's uncached last token); exact_history counts the cache's rows, as a full prefill would."""
    for exact, expected in ((False, 23 + 4 + 1), (True, 23 + 4)):
        runtime, recorder = _runtime(exact_history=exact)
        runtime.prefill(list(range(1, 22)))
        runtime.decode(7)
        runtime.decode(7)
        runtime.prefill([3, 4, 5, 6])
        launch = next(s for s in recorder.programs[-1].steps if isinstance(s, Launch) and s.net == "block_kv_0")
        assert launch.dims == ((0, 1, 4), (1, 1, 4), (2, 1, 23), (3, 1, 23))
        assert runtime.length == expected
        runtime.clear()
        assert runtime.length == 0


def test_a_prompt_past_the_cache_is_refused_before_anything_runs():
    runtime, recorder = _runtime()
    runtime.prefill(list(range(40)))
    before = len(recorder.programs)
    with pytest.raises(GraphoptError, match="the session holds 40 tokens and the prompt has 30, but the cache "
                                            "holds 64"):
        runtime.prefill(list(range(30)))
    assert len(recorder.programs) == before


@pytest.fixture(scope="module")
def history_build(tmp_path_factory):
    return compile_model(open_model("tiny-llama"), ONNX_TARGET, SEQ, tmp_path_factory.mktemp("hkv") / "out",
                         show_progress=False, max_input_length=CHUNK, contract_options=(c.HISTORY_KV,))


def test_history_kv_networks_hold_to_their_prefill_and_a_chat_to_a_full_prefill(history_build):
    manifest = history_build.manifest
    assert manifest["contract_options"] == ["dynamic", "history-kv"]
    nets = {n["name"]: n for n in manifest["networks"]}
    assert list(nets) == ["embedding", "block_0", "block_cache_0", "block_kv_0", "block_1", "block_cache_1",
                          "block_kv_1", "lm_head"]
    # The ONNX network keeps the mask as an input (the runtime on the host supplies what the chip bakes).
    assert [(i["name"], i["shape"]) for i in nets["block_kv_0"]["inputs"]] == [
        ("input_states", [1, CHUNK, 128]), ("position_ids", [1, CHUNK]), ("attention_mask", [1, 1, CHUNK, SEQ + CHUNK]),
        ("history_k", [1, SEQ, 2, 32]), ("history_v", [1, SEQ, 2, 32])]
    history = [k for n in history_build.networks for k in n.checks if k.stage.startswith("history chunk vs prefill")]
    assert len(history) == LAYERS and all(k.ok for k in history), history
    chat = history_build.end_to_end["chat"]
    assert [t["prompt_length"] for t in chat["turns"]] == [21, 30, 38]  # the first turn two chunks long
    assert chat["ok"] and all(t["tokens_identical"] for t in chat["turns"]), chat
    assert history_build.ok


def test_the_chat_check_fails_when_a_chunk_misses_cached_rows(history_build):
    """No check that cannot fail: a runtime that copies one cache row too few into block_kv_i's history."""

    class Forgetful(LlmTpuRuntime):
        def _prefill_with_history(self, tokens):
            self.length = max(0, self.length - 1) if self.length else 0
            return super()._prefill_with_history(tokens)

    backend = OrtBackend(history_build.out_dir, history_build.manifest)
    right = runtime_for(backend, history_build.manifest, backend.head_logits())
    wrong = Forgetful(right.device, right.shapes, right.head_logits, right.contract)
    source = open_model("tiny-llama")
    prompts = chat_prompts(source.config.vocab_size, CHUNK, SEQ)
    assert chat_check(right, source.greedy, prompts)["ok"]
    bad = chat_check(wrong, source.greedy, prompts)
    assert not bad["ok"] and bad["turns"][0]["ok"]  # the first turn (a fresh session) is right; later ones not


@pytest.mark.parametrize("args, message", [
    (["--contract", "llama3_1", "--history-kv"], "--history-kv is an option of --contract llm-tpu"),
    (["--history-kv", "--max-input-length", "16"], "--max-input-length cannot be given with --history-kv"),
    (["--dynamic", "--contract", "llama3_1"], "--dynamic is an option of --contract llm-tpu")])
def test_the_options_are_refused_where_they_cannot_apply(tmp_path, capsys, args, message):
    from graphopt.cli import main

    out = tmp_path / "o"
    assert main(["run", "tiny-llama", "--seq-length", str(SEQ), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_an_encoder_decoder_model_takes_no_history_option(tmp_path):
    with pytest.raises(GraphoptError, match=re.escape("--history-kv is an option of --contract llm-tpu")):
        compile_model(open_model("tiny-marian"), ONNX_TARGET, 32, tmp_path / "m", show_progress=False,
                      contract_options=(c.HISTORY_KV,))


def test_generate_chats_in_turns_on_history_kv_networks_only(history_build, capsys):
    """`graphopt generate DIR --input-ids A --input-ids B`: B continues the session A left, as the demo's chat does."""
    from graphopt.cli import main

    folder = str(history_build.out_dir)
    assert main(["generate", folder, "--input-ids", "1,2,3,4,5", "--input-ids", "6,7", "--max-new-tokens", "3",
                 "--ignore-eos", "--json"]) == 0
    turns = json.loads(capsys.readouterr().out)["turns"]
    runtime = runtime_for(OrtBackend(history_build.out_dir, history_build.manifest), history_build.manifest)
    assert turns == [runtime.generate([1, 2, 3, 4, 5], 3).tokens, runtime.generate([6, 7], 3).tokens]
    assert turns[1] != runtime_for(OrtBackend(history_build.out_dir, history_build.manifest),
                                   history_build.manifest).generate([6, 7], 3).tokens  # not a fresh session
