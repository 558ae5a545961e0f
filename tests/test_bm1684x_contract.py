"""The bm1684x target's tables and arithmetic, without the toolchain: model_deploy flags per net,
which configs W4 can quantize, the fake quantization the simulator is checked against."""

import numpy as np
import pytest

from graphopt.errors import GraphoptError
from graphopt.models import open_model
from graphopt.targets.bm1684x.contract import bmodel_name, check_quantizable, deploy_specs
from graphopt.targets.bm1684x.fake_quant import fake_quantize


def _manifest(layers=2, seq=64, hidden=128):
    def net(name, inputs):
        return {"name": name, "inputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in inputs]}

    nets = [net("embedding", [("input_ids", [1, seq])])]
    for i in range(layers):
        nets.append(net(f"block_{i}", [("input_states", [1, seq, hidden]), ("position_ids", [1, seq]),
                                       ("attention_mask", [1, 1, seq, seq])]))
        nets.append(net(f"block_cache_{i}", [("input_states", [1, 1, hidden]), ("position_ids", [1, 1]),
                                             ("attention_mask", [1, 1, 1, seq + 1]),
                                             ("history_k", [1, seq, 2, 32]), ("history_v", [1, seq, 2, 32])]))
    nets += [net("lm_head", [("hidden_states", [1, hidden])]), net("greedy_head", [("m_logits", [1, 1024])]),
             net("penalty_sample_head", [("m_logits", [1, 1024])])]
    return {"networks": nets}


def test_deploy_specs_follow_the_contract():
    specs = {s.name: s for s in deploy_specs(_manifest(), "w4bf16", 64)}
    assert list(specs) == ["embedding", "embedding_cache", "block_0", "block_cache_0", "block_1", "block_cache_1",
                           "lm_head", "greedy_head", "penalty_sample_head"]
    block = specs["block_0"].deploy_args("b.mlir", "b.bmodel")
    assert block[:4] == ["--mlir", "b.mlir", "--quantize", "W4BF16"]
    for flag in ("--quant_input", "--quant_output", "--high_precision"):
        assert flag in block
    assert block[block.index("--q_group_size") + 1] == "64" and block[block.index("--chip") + 1] == "bm1684x"
    cache = specs["block_cache_0"].deploy_args("c.mlir", "c.bmodel")
    assert cache[cache.index("--addr_mode") + 1] == "io_alone" and "--addr_mode" not in block
    # embedding_cache is the embedding's ONNX compiled for one token.
    assert specs["embedding_cache"].onnx_network == "embedding" and specs["embedding_cache"].input_shapes == ((1, 1),)
    assert "[[1,1]]" in specs["embedding_cache"].transform_args("e.onnx", "e.mlir")
    assert specs["embedding"].quantize == specs["lm_head"].quantize == "BF16"
    assert "--quant_output" not in specs["lm_head"].flags  # logits stay f32 for the heads
    assert specs["greedy_head"].quantize == specs["penalty_sample_head"].quantize == "F32"
    assert specs["block_0"].weight_bits == 4 and specs["lm_head"].weight_bits is None


@pytest.mark.parametrize("quantize, blocks, half", [("w8f16", "W8F16", "F16"), ("bf16", "BF16", "BF16"),
                                                    ("f16", "F16", "F16")])
def test_every_quantize_mode_maps_to_model_deploy_modes(quantize, blocks, half):
    specs = {s.name: s for s in deploy_specs(_manifest(layers=1), quantize, 64)}
    assert specs["block_0"].quantize == blocks and specs["embedding"].quantize == half
    assert ("--q_group_size" in specs["block_0"].flags) == blocks.startswith("W")


def test_bmodel_name():
    assert bmodel_name("llama3.1-8b", "w4bf16", 512) == "llama3.1-8b_w4bf16_seq512_bm1684x_1dev.bmodel"


def test_w4_refuses_channels_the_chip_cannot_quantize():
    config = open_model("tiny-llama").config
    check_quantizable(config, "w4bf16", 64)  # tiny-llama is sized for W4
    odd = type(config)(**{**config.to_dict(), "intermediate_size": 200})
    with pytest.raises(GraphoptError, match="multiple of 64.*intermediate_size = 200"):
        check_quantizable(odd, "w4bf16", 64)
    check_quantizable(odd, "bf16", 64)  # float modes don't care
    with pytest.raises(GraphoptError, match="not a BM1684X mode"):
        check_quantizable(config, "int3", 64)
    with pytest.raises(GraphoptError, match="power of two"):
        check_quantizable(config, "w4bf16", 48)


def test_fake_quantize_uses_at_most_2_to_the_bits_levels_per_group():
    weight = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    for bits in (4, 8):
        q = fake_quantize(weight, bits, 64)
        groups, qgroups = weight.reshape(8, 2, 64), q.reshape(8, 2, 64)
        assert max(len(np.unique(g)) for g in qgroups.reshape(16, 64)) <= 2 ** bits
        step = (groups.max(-1) - groups.min(-1)) / (2 ** bits - 1)
        assert np.all(np.abs(qgroups - groups).max(-1) <= step / 2 + 1e-6)
    assert np.abs(fake_quantize(weight, 8, 64) - weight).max() < np.abs(fake_quantize(weight, 4, 64) - weight).max()


def test_greedy_may_only_differ_at_a_near_tie():
    from graphopt.targets.bm1684x.verify import compare_greedy

    ref = [np.array([0.0, 5.0, 4.0]), np.array([3.0, 0.0, 2.95])]
    near = [np.array([0.0, 5.02, 4.0]), np.array([2.96, 0.0, 2.99])]  # flips a 0.05 margin with 0.04 error
    assert compare_greedy([1, 0], ref, [1, 2], near)["ok"]
    # A token that differs where the logits barely do and the reference's choice was clear: a bug.
    clear = ref[:1] + [np.array([3.0, 0.0, 1.0])]
    result = compare_greedy([1, 0], clear, [1, 2], [np.array([0.0, 5.0, 4.0]), np.array([2.9, 0.0, 1.1])])
    assert not result["ok"] and result["first_difference"] == 1 and result["margin_at_difference"] == 2.0
    same = compare_greedy([1, 0], ref, [1, 0], ref)
    assert same["ok"] and same["tokens_identical"] and same["max_abs_logit_err"] == 0


def test_toolchain_install_says_what_to_do_without_python_3_10(tmp_path, monkeypatch):
    from graphopt.targets.bm1684x.toolchain import find_python310

    with pytest.raises(GraphoptError, match="--python .* is not a working Python 3.10"):
        find_python310(str(tmp_path / "no-python"))
    monkeypatch.delenv("GRAPHOPT_PYTHON310", raising=False)
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GraphoptError, match="no Python 3.10 was found.*--python /path/to/python3.10"):
        find_python310()


def test_a_killed_tool_is_reported_as_probably_out_of_memory(tmp_path):
    from graphopt.targets.bm1684x.deploy import DeployError

    log = tmp_path / "compile.log"
    log.write_text("$ model_transform ...\nConstantFolding finished\n")
    killed = str(DeployError("lm_head", "model_transform", log, -9))
    assert killed.startswith("model_transform was killed by signal 9 (most likely out of memory")
    assert "--jobs" in killed and "ConstantFolding finished" in killed


def test_model_transform_does_not_simplify_again():
    """graphopt's ONNX is already folded and simplified; TPU-MLIR's second pass cost 8B 11 GB."""
    spec = deploy_specs(_manifest(), "bf16", 64)[0]
    args = spec.transform_args("x.onnx", "x.mlir")
    assert args[args.index("--do_onnx_sim") + 1] == ""  # argparse type=bool: only "" is False


def _seq2seq_manifest(layers=2, seq=64, hidden=128):
    def net(name, inputs):
        return {"name": name, "inputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in inputs]}

    kv = [1, seq, 4, 32]
    nets = [net("encoder", [("input_ids", [1, seq]), ("attention_mask", [1, seq])]),
            net("cross_kv", [("encoder_hidden_states", [1, seq, hidden])]),
            net("embedding", [("input_ids", [1, seq]), ("position_ids", [1, seq])])]
    for i in range(layers):
        cross = [("cross_k", kv), ("cross_v", kv)]
        nets.append(net(f"decoder_block_{i}", [("input_states", [1, seq, hidden]), ("attention_mask", [1, 1, seq, seq]),
                                               ("encoder_attention_mask", [1, 1, seq, seq]), *cross]))
        nets.append(net(f"decoder_block_cache_{i}", [
            ("input_states", [1, 1, hidden]), ("attention_mask", [1, 1, 1, seq + 1]),
            ("encoder_attention_mask", [1, 1, 1, seq]), *cross, ("history_k", kv), ("history_v", kv)]))
    nets += [net("lm_head", [("hidden_states", [1, hidden])]), net("greedy_head", [("m_logits", [1, 1024])])]
    return {"networks": nets}


def test_encoder_decoder_specs_are_the_documented_networks():
    specs = {s.name: s for s in deploy_specs(_seq2seq_manifest(), "w4bf16", 64)}
    assert list(specs) == ["encoder", "cross_kv", "embedding", "embedding_cache", "decoder_block_0",
                           "decoder_block_cache_0", "decoder_block_1", "decoder_block_cache_1", "lm_head", "greedy_head"]
    # The encoder and cross_kv hold Linear weights: quantized like the blocks, 16-bit in and out.
    assert specs["encoder"].quantize == specs["cross_kv"].quantize == specs["decoder_block_0"].quantize == "W4BF16"
    for name in ("encoder", "cross_kv", "decoder_block_0", "decoder_block_cache_0"):
        assert {"--quant_input", "--quant_output"} <= set(specs[name].flags)
        assert "--high_precision" not in specs[name].flags  # it would leave a final LayerNorm's output fp32
    assert specs["decoder_block_cache_0"].flags[-2:] == ("--addr_mode", "io_alone")
    assert specs["embedding_cache"].input_shapes == ((1, 1), (1, 1))  # token and position


def _infos(manifest, dtype_of=lambda net, io, name: None):
    """The nets model_tool would show for a bmodel compiled from `manifest` (its dtype names: int32 ids,
    bf16 activations, fp32 logits), each dtype open to change by `dtype_of`."""
    from graphopt.targets.bm1684x.inspect_bmodel import NetInfo, Tensor

    inputs = {n["name"]: [(i["name"], tuple(i["shape"])) for i in n["inputs"]] for n in manifest["networks"]}
    inputs["embedding_cache"] = [("input_ids", (1, 1)), ("position_ids", (1, 1))]
    seq, kv = 64, (4, 32)
    outputs = {"encoder": [("encoder_hidden_states", (1, seq, 128))],
               "cross_kv": [(f"cross_{t}_{i}", (1, seq, *kv)) for i in range(2) for t in "kv"],
               "embedding": [("input_embed", (1, seq, 128))], "embedding_cache": [("input_embed", (1, 1, 128))],
               "lm_head": [("m_logits", (1, 1024))], "greedy_head": [("token", (1, 1))]}
    for i in range(2):
        for name, steps in ((f"decoder_block_{i}", seq), (f"decoder_block_cache_{i}", 1)):
            outputs[name] = [("hidden_states", (1, steps, 128)), ("past_k", (1, steps, *kv)), ("past_v", (1, steps, *kv))]
    ints = {"input_ids", "position_ids", "token", "attention_mask"}

    def dtype(net, io, name):
        default = ("int32" if name in ints and (net in ("encoder", "embedding", "embedding_cache") or io == "out")
                   else "float32" if name == "m_logits" else "bfloat16")
        return dtype_of(net, io, name) or default

    return [NetInfo(net, [Tensor(n, s, dtype(net, "in", n)) for n, s in inputs[net]],
                    [Tensor(n, s, dtype(net, "out", n)) for n, s in outputs[net]]) for net in outputs]


def test_an_encoder_decoder_bmodel_is_held_to_its_own_contract():
    from graphopt.contract import ENCODER_DECODER
    from graphopt.targets.bm1684x.inspect_bmodel import contract_of, contract_problems

    infos = _infos(_seq2seq_manifest())
    assert contract_of(infos) is ENCODER_DECODER and contract_problems(infos) == []
    # What --high_precision did to a post-LN block: its hidden states came out fp32.
    fp32_states = _infos(_seq2seq_manifest(), lambda net, io, name: "float32" if io == "out" and
                         name == "hidden_states" else None)
    assert contract_problems(fp32_states)[0] == ("decoder_block_0 output 0 (hidden_states): dtype float32, expected "
                                                 "bfloat16 or float16")
    missing = [n for n in infos if n.name != "cross_kv"]
    assert contract_problems(missing) == ["net 'cross_kv' is missing"]


def test_the_time_estimate_sums_what_a_token_passes_through():
    from graphopt.targets.bm1684x.build import time_estimate

    cycles = {"embedding": 1_000, "embedding_cache": 10, "block_0": 2_000_000, "block_cache_0": 300_000,
              "block_1": 2_000_000, "block_cache_1": 300_000, "lm_head": 500_000, "greedy_head": None,
              "penalty_sample_head": 7_000}
    estimate = time_estimate([{"net": k, "total_cycle": v} for k, v in cycles.items()])
    assert estimate == {"prefill_ms": 4.501, "decode_ms_per_token": 1.10001}  # 1 GHz; the sampler is not on the path
    seq2seq = time_estimate([{"net": k, "total_cycle": v} for k, v in
                             {"encoder": 900_000, "cross_kv": 100_000, "decoder_block_cache_0": 50_000}.items()])
    assert seq2seq == {"prefill_ms": 0.0, "decode_ms_per_token": 0.05, "encode_ms": 1.0}


def test_decode_stages_are_llm_converts_and_take_the_first_stages_io_addresses():
    from graphopt.targets.bm1684x.contract import check_chunk_length, decode_stage_rows, stage_specs

    assert decode_stage_rows(64, None) == [64] and decode_stage_rows(64, 16) == [64, 48, 32, 16]
    assert decode_stage_rows(100, 30) == [100, 90, 60, 30]
    spec = {s.name: s for s in deploy_specs(_manifest(), "w4bf16", 64, decode_stages=True)}["block_cache_0"]
    assert spec.flags[-2:] == ("--save_io_alone_config", "io_alone_config.json")
    inputs = ["input_states", "position_ids", "attention_mask", "history_k", "history_v"]
    stages = stage_specs(spec, inputs, [64, 32], "/cache/key/io_alone_config.json")
    assert [(s.name, s.stage) for s in stages] == [("block_cache_0", 1)]
    assert stages[0].input_shapes == ((1, 1, 128), (1, 1), (1, 1, 1, 33), (1, 32, 2, 32), (1, 32, 2, 32))
    assert stages[0].flags[-2:] == ("--use_io_alone_config", "/cache/key/io_alone_config.json")
    assert "--save_io_alone_config" not in stages[0].flags and stages[0].label == "block_cache_0 (stage 1, 32 cache rows)"
    with pytest.raises(GraphoptError, match="--chunk-length 40 must be between 1 and half of --seq-length 64"):
        check_chunk_length(40, 64, "llm-tpu")
    with pytest.raises(GraphoptError, match="only today's LLM-TPU demos select"):
        check_chunk_length(16, 64, "llama3_1")
