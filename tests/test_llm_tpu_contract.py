"""Today's LLM-TPU contract (`--contract llm-tpu`, graphopt.contract.LLM_TPU): the networks TPU-MLIR's
llm_convert emits and LLM-TPU's Qwen3 demo reads, and the runtime that drives them as that demo does.

The runtime tests record programs (no toolchain); the compile test runs the ONNX target and its
end-to-end check, which drives the networks with these programs in onnxruntime.
"""

import re

import numpy as np
import onnx
import pytest

from graphopt import contract as c
from graphopt.compiler import compile_model
from graphopt.device_program import At, Buffer, Copy, Fill, HostDevice, IoSpec, Launch, Program, Read, Same, Tensor, Write
from graphopt.errors import GraphoptError
from graphopt.models import open_model
from graphopt.runtime import LlmTpuRuntime, Shapes
from graphopt.targets.onnx_target import ONNX_TARGET
from tests.recorder import Recorder

SEQ, LAYERS = 64, 2


def _runtime(device) -> LlmTpuRuntime:
    return LlmTpuRuntime(device, Shapes(seq_length=SEQ, num_layers=LAYERS, hidden=128, kv_heads=2, head_dim=32))


def _t(net, io, index):
    return Tensor(net, io, index)


@pytest.mark.parametrize("dtype, bits, name", [("bf16", 0xC61C, "bfloat16"), ("f16", 0xF0E2, "float16")])
def test_the_mask_bits_follow_the_dtype_of_embedding_caches_output(dtype, bits, name):
    recorder = Recorder(dtype)
    runtime = _runtime(recorder)
    runtime.prefill([5, 6, 7])
    runtime.decode(7)
    prefill, decode = recorder.programs
    mask = next(w for w in prefill.steps if isinstance(w, Write) and w.dst == _t("block_0", "in", 2))
    assert mask.bits == name and mask.value.dtype == np.uint16
    grid = mask.value.reshape(SEQ, SEQ)
    assert grid[1, :2].tolist() == [0, 0] and set(grid[1, 2:].tolist()) == {bits}
    assert set(grid[3:].reshape(-1).tolist()) == {bits}  # padding rows: masked everywhere
    mask = next(w for w in decode.steps if isinstance(w, Write) and w.dst == _t("block_cache_0", "in", 2))
    row = mask.value.reshape(-1)  # slots history_length-1 .. SEQ-1 masked; the token's own slot (SEQ) not
    assert row[:3].tolist() == [0, 0, 0] and set(row[3:SEQ].tolist()) == {bits} and row[SEQ] == 0


def test_prefill_writes_the_prompt_over_zeros_and_copies_only_its_rows():
    recorder = Recorder()
    _runtime(recorder).prefill([5, 6, 7, 8, 9])
    steps = recorder.programs[0].steps
    buffer = Buffer("dev_buffer", _t("embedding", "out", 0))
    ids = steps[1]
    assert steps[0] == Fill(_t("embedding", "in", 0)) and ids.partial and ids.value.tolist() == [5, 6, 7, 8, 9]
    assert ids.value.dtype == np.int32
    assert steps[2:4] == [Launch("embedding"), Copy(buffer, _t("embedding", "out", 0))]
    # empty_net(block_0): every input and output of block_0 zeroed before the first copy.
    assert [s for s in steps if isinstance(s, Fill)][1:] == [Fill(_t("block_0", io, i)) for io, n in (("in", 3), ("out", 3))
                                                               for i in range(n)]
    assert Copy(_t("block_0", "in", 0), buffer, rows=5) in steps
    assert Copy(_t("block_1", "in", 0), _t("block_0", "out", 0), rows=5) in steps
    assert Copy(_t("block_cache_1", "in", 3), _t("block_1", "out", 1), rows=5) in steps  # n rows of K into the cache
    assert Copy(_t("lm_head", "in", 0), _t("block_1", "out", 0), src_row=4, rows=1) in steps
    # lm_head answers the token; the row it was fed is read for the checks' logits.
    assert steps[-3:] == [Read(_t("lm_head", "in", 0), "hidden"), Launch("lm_head"), Read(_t("lm_head", "out", 0), "next")]
    with pytest.raises(GraphoptError, match="the prompt has 65 tokens but the prefill networks take 64"):
        _runtime(Recorder()).prefill([1] * 65)


def test_blocks_that_compute_in_place_get_one_copy():
    recorder = Recorder(in_place=True)
    _runtime(recorder).prefill([5, 6])
    steps = recorder.programs[0].steps
    assert not any(isinstance(s, Copy) and s.dst == _t("block_1", "in", 0) for s in steps)
    assert Same(_t("block_1", "in", 0), _t("block_0", "out", 0)) in steps


def test_decode_writes_the_new_kv_row_straight_into_the_cache():
    recorder = Recorder()
    runtime = _runtime(recorder)
    runtime.prefill([5, 6, 7, 8, 9])
    runtime.decode(7)
    steps = recorder.programs[1].steps
    launches = [s for s in steps if isinstance(s, Launch)]
    assert launches[1] == Launch("block_cache_0", bind=((0, _t("embedding_cache", "out", 0)),),
                                 bind_out=((1, At(_t("block_cache_0", "in", 3), 5)), (2, At(_t("block_cache_0", "in", 4), 5))))
    # block_cache_1 reads the previous output in place, and block_cache_0's position and mask.
    assert launches[2].bind == ((0, _t("block_cache_0", "out", 0)), (1, _t("block_cache_0", "in", 1)),
                                (2, _t("block_cache_0", "in", 2)))
    assert not any(isinstance(s, Copy) and s.dst.net.startswith("block_cache") for s in steps)  # no cache copies
    assert Copy(_t("lm_head", "in", 0), _t("block_cache_1", "out", 0)) in steps


def test_a_decode_step_runs_the_smallest_stage_that_holds_the_history():
    """Decode stages at 64, 48, 32, 16 cache rows (--chunk-length 16): the cpp_demo's select_decode_stage."""
    recorder = Recorder(stages=(64, 48, 32, 16))
    runtime = _runtime(recorder)
    assert [runtime.decode_stage(n) for n in (1, 16, 17, 32, 33, 48, 49, 64)] == [3, 3, 2, 2, 1, 1, 0, 0]
    runtime.prefill(list(range(20)))
    runtime.decode(7)  # 21 tokens with the new one: the 32-row stage
    steps = recorder.programs[1].steps
    launch = next(s for s in steps if isinstance(s, Launch) and s.net == "block_cache_1")
    assert launch.stage == 2 and launch.bind[1:] == ((1, Tensor("block_cache_0", "in", 1, 2)),
                                                      (2, Tensor("block_cache_0", "in", 2, 2)))
    assert launch.bind_out[0] == (1, At(_t("block_cache_1", "in", 3), 20))  # into stage 0's cache, at row 20
    assert Same(Tensor("block_cache_1", "in", 3, 2), _t("block_cache_1", "in", 3)) in steps
    mask = next(w for w in steps if isinstance(w, Write) and w.dst == Tensor("block_cache_0", "in", 2, 2))
    bits = mask.value.reshape(-1)
    assert bits.size == 33 and bits[20] != 0 and bits[19] == 0 and bits[32] == 0


def test_host_memory_does_what_fill_partial_writes_and_bound_outputs_mean():
    class Net:
        def run(self, net, inputs):
            return {"y": inputs["x"][:, :1] + 1}

    f32 = np.dtype("float32")
    io = {"n": {"in": [("x", IoSpec((1, 4), f32))], "out": [("y", IoSpec((1, 1), f32))]},
          "cache": {"in": [("c", IoSpec((1, 4), f32))], "out": []}}
    device = HostDevice(Net(), io)
    cache = _t("cache", "in", 0)
    device.execute(Program([Write(_t("n", "in", 0), np.array([1, 2, 3, 4], np.float32)), Fill(_t("n", "in", 0)),
                            Write(_t("n", "in", 0), np.array([0xC61C], np.uint16), partial=True, bits="bfloat16"),
                            Launch("n", bind_out=((0, At(cache, 2)),))]))
    assert device.memory[_t("n", "in", 0)].tolist() == [-9984.0, 0, 0, 0]
    assert device.memory[cache].tolist() == [0, 0, -9983.0, 0]


@pytest.fixture(scope="module")
def llm_tpu_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm-tpu") / "tiny-llama"
    return compile_model(open_model("tiny-llama"), ONNX_TARGET, SEQ, out, show_progress=False, contract="llm-tpu")


def _ops(build, name):
    return [n.op_type for n in onnx.load(str(build.out_dir / f"{name}.onnx")).graph.node]


def test_the_final_norm_ends_the_last_block_and_lm_head_answers_the_token(llm_tpu_build):
    manifest = llm_tpu_build.manifest
    assert manifest["contract"] == "llm-tpu"
    assert [n["name"] for n in manifest["networks"]] == ["embedding", "block_0", "block_cache_0", "block_1",
                                                         "block_cache_1", "lm_head"]
    head = next(n for n in manifest["networks"] if n["name"] == "lm_head")
    assert [(o["name"], o["shape"]) for o in head["outputs"]] == [("token", [1, 1])]
    head_ops = _ops(llm_tpu_build, "lm_head")
    assert "TopK" in head_ops and "ReduceMean" not in head_ops  # no RMSNorm left in lm_head
    # RMSNorm is one ReduceMean: two per layer, and the final one in the last layer's networks only.
    for name, norms in (("block_0", 2), ("block_cache_0", 2), ("block_1", 3), ("block_cache_1", 3)):
        assert _ops(llm_tpu_build, name).count("ReduceMean") == norms, name
    # Driven as the Qwen3 demo drives them, the networks give transformers' tokens and logits.
    assert llm_tpu_build.ok and llm_tpu_build.end_to_end["tokens_identical"]
    assert llm_tpu_build.end_to_end["max_abs_logit_err"] < 1e-4


def test_a_contract_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(GraphoptError, match="--contract llm-tpu is for decoder-only models; tiny-marian is an "
                                            "encoder-decoder model"):
        compile_model(open_model("tiny-marian"), ONNX_TARGET, SEQ, tmp_path / "m", show_progress=False,
                      contract="llm-tpu")
    with pytest.raises(GraphoptError, match="--contract qwen is not a runtime contract graphopt knows; choose one of "
                                            "llm-tpu, llama3_1"):
        compile_model(open_model("tiny-llama"), ONNX_TARGET, SEQ, tmp_path / "l", show_progress=False, contract="qwen")
    assert not (tmp_path / "m").exists() and not (tmp_path / "l").exists()


def test_the_contract_of_a_set_of_nets_is_read_from_their_names():
    assert c.contract_of_nets(["embedding", "block_0", "lm_head"]) is c.LLM_TPU
    assert c.contract_of_nets(["embedding", "block_0", "lm_head", "greedy_head"]) is c.LLAMA3_1_DEMO
    assert c.contract_of_nets(["encoder", "cross_kv"]) is c.ENCODER_DECODER


def test_config_folder_holds_what_the_demo_reads_from_the_model_directory(tmp_path):
    """pipeline.py -c config: the tokenizer, its chat template and the generation config, no weights or code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    checkpoint = tmp_path / "tiny-llama-checkpoint"
    model = open_model("tiny-llama").reference_model()
    model.save_pretrained(checkpoint)
    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="w2", chat_template="{{ messages }}")
    fast.save_pretrained(checkpoint)
    (checkpoint / "modeling_mine.py").write_text("# code: not for the runtime\n")
    build = compile_model(open_model(str(checkpoint)), ONNX_TARGET, 32, tmp_path / "out", show_progress=False)
    folder = build.out_dir / "config"
    assert build.config_folder.missing == [] and build.config_folder.source == str(checkpoint.resolve())
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        build.config_folder.files)
    assert not list(folder.glob("*.safetensors")) and not (folder / "modeling_mine.py").exists()
    again = PreTrainedTokenizerFast.from_pretrained(folder)  # what the demo's pipeline.py does with it
    assert again("w5 w7")["input_ids"] == [5, 7] and again.chat_template == "{{ messages }}"
    # A registry model with random weights has no directory: its config, and the report says what is missing.
    registry = compile_model(open_model("tiny-llama"), ONNX_TARGET, 32, tmp_path / "reg", show_progress=False,
                             check=False)
    assert registry.config_folder.files == ["config.json", "generation_config.json"]
    assert registry.config_folder.missing[0].startswith("a tokenizer (tokenizer.json or tokenizer.model)")


def test_a_prefill_shorter_than_the_cache(tmp_path):
    """--max-input-length 16 of SEQ 64: embedding and block_i take 16 rows, the decode cache holds 64; decode
    blocks are held to the prefill at its rows, and generation runs past the prefill's length."""
    build = compile_model(open_model("tiny-llama"), ONNX_TARGET, SEQ, tmp_path / "out", show_progress=False,
                          max_input_length=16)
    nets = {n["name"]: n for n in build.manifest["networks"]}
    assert [i["shape"] for i in nets["block_0"]["inputs"]] == [[1, 16, 128], [1, 16], [1, 1, 16, 16]]
    assert nets["block_cache_0"]["inputs"][3]["shape"] == [1, SEQ, 2, 32]
    decode = [c for n in build.networks for c in n.checks if c.stage.startswith("decode vs prefill")]
    assert decode and all(c.ok for c in decode) and decode[0].stage == "decode vs prefill (rows 0, 1, 8, 15)"
    assert build.ok and build.end_to_end["tokens_identical"]


@pytest.mark.parametrize("options, message", [
    ({"max_input_length": 65}, "--max-input-length 65 must be between 1 and --seq-length 64"),
    ({"max_input_length": 16, "contract": "llama3_1"}, "--max-input-length is for --contract llm-tpu: the LLM-TPU "
                                                       "Llama3_1 chat demo (legacy)'s runtime reads SEQ")])
def test_a_prefill_length_is_refused_where_it_cannot_apply(tmp_path, options, message):
    with pytest.raises(GraphoptError, match=re.escape(message)):
        compile_model(open_model("tiny-llama"), ONNX_TARGET, SEQ, tmp_path / "o", show_progress=False, **options)
    assert not (tmp_path / "o").exists()
