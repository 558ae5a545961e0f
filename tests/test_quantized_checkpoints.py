"""Pre-quantized checkpoints (GPTQ, AWQ, compressed-tensors): read as they were written, cross-checked against
the libraries that define them, refused up front when they cannot be kept, and kept bit for bit by the bm1684x
target (the compile tests need the README's toolchain, like tests/test_bm1684x.py)."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from graphopt.errors import GraphoptError
from graphopt.models import open_model
from graphopt.models.configs import TINY_LLAMA, TINY_QWEN2_5
from tests.quantized_checkpoints import LINEARS, write_checkpoint
from tests.test_bm1684x import SEQ, graphopt, net_cache  # noqa: F401  (the fixture, shared)

# (method, bits, group, symmetric): each format in the variants its users meet.
FORMATS = {"gptq-int4-asym-g32": ("gptq", 4, 32, False), "gptq-int8-sym-g64": ("gptq", 8, 64, True),
           "awq-int4-g64": ("awq", 4, 64, False), "ct-int4-sym-g32": ("compressed-tensors", 4, 32, True),
           "ct-int4-asym-g64": ("compressed-tensors", 4, 64, False),
           "ct-int8-channel": ("compressed-tensors", 8, 0, True)}


def _linears(source):
    return {p: source.weights.quantized_linear([f"{p}.weight"]) for p in source.weights.quantized_prefixes()}


@pytest.mark.parametrize("key", list(FORMATS))
def test_each_format_is_read_back_as_the_codes_scales_and_zero_points_written(tmp_path, key):
    method, bits, group, symmetric = FORMATS[key]
    written = write_checkpoint(tmp_path, TINY_LLAMA, method, bits, group, symmetric)
    source = open_model(str(tmp_path))
    read = _linears(source)
    assert set(read) == set(written) and len(read) == 2 * len(LINEARS)
    for prefix, q in written.items():
        linear = read[prefix]
        assert linear.bits == bits and linear.group_size == (group or q.codes.shape[1])
        assert np.array_equal(linear.codes, q.codes) and np.array_equal(linear.zeros, q.zeros)
        assert linear.scales.dtype == q.scales.dtype and torch.equal(linear.scales, q.scales)
    # The model's weight is the dequantized codes, what the reference and the ONNX compute with.
    prefix = f"model.layers.1.mlp.{LINEARS[-1]}"
    weight = torch.empty(read[prefix].codes.shape)
    source.weights.fill([f"{prefix}.weight"], weight)
    q = written[prefix]
    expected = (torch.from_numpy(q.codes.astype(np.float32) - np.repeat(q.zeros, read[prefix].group_size, 1))
                * torch.repeat_interleave(q.scales.float(), read[prefix].group_size, 1))
    assert torch.equal(weight, expected)


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_own_decompression_gives_the_weights_graphopt_computes_with(tmp_path, symmetric):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    write_checkpoint(tmp_path, TINY_LLAMA, "compressed-tensors", 4, 32, symmetric)
    source = open_model(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=config["config_groups"]["group_0"]["weights"])
    prefix = "model.layers.0.self_attn.q_proj"
    state = {k.rpartition(".")[2]: source.weights.read(k) for k in source.weights.files if k.startswith(prefix + ".")}
    theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    ours = source.weights.quantized_linear([f"{prefix}.weight"]).dequantized()
    # The library computes (code - zero) * scale in the scales' bfloat16; graphopt keeps the exact product in fp32.
    assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours.to(torch.bfloat16))


@pytest.mark.parametrize("key", ["gptq-int4-asym-g32", "gptq-int8-sym-g64", "awq-int4-g64"])
def test_tpu_mlirs_own_unpacking_gives_the_codes_graphopt_keeps(tmp_path, key, tools):
    """llm_convert's LlmConverter.unpack_weights (the TPU-MLIR wheel's reading of GPTQ and AWQ), run in the
    toolchain's Python on the checkpoint's tensors, against graphopt's A16MatMul codes and zero points."""
    method, bits, group, symmetric = FORMATS[key]
    write_checkpoint(tmp_path, TINY_LLAMA, method, bits, group, symmetric)
    source = open_model(str(tmp_path))
    prefix = "model.layers.0.mlp.down_proj"
    np.savez(tmp_path / "packed.npz", qweight=source.weights.read(f"{prefix}.qweight").numpy(),
             qzeros=source.weights.read(f"{prefix}.qzeros").numpy())
    script = ("import sys, types, numpy as np\n"
              "from tpu_mlir.python.llm.LlmConverter import LlmConverter\n"
              "d = np.load(sys.argv[1])\n"
              "_, packed, zeros = LlmConverter.unpack_weights(types.SimpleNamespace(use_mlp=False), d['qweight'], "
              f"d['qzeros'], {bits}, '{method}', '{prefix}')\n"
              "np.savez(sys.argv[2], packed=packed, zeros=zeros)\n")
    done = subprocess.run([str(tools.python), "-c", script, str(tmp_path / "packed.npz"), str(tmp_path / "theirs.npz")],
                          env=tools.environ(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    theirs = np.load(tmp_path / "theirs.npz")
    ours = source.weights.quantized_linear([f"{prefix}.weight"])
    assert np.array_equal(theirs["packed"].T, ours.packed())  # llm_convert transposes to [N, K/2] as it writes
    assert np.array_equal(theirs["zeros"].T, ours.zeros)


# ---- refused before any work, in one paragraph, nothing written ------------------------------------------------

BAD_CONFIGS = {
    "awq without group_size (tpu-mlir issue 250)": ("awq", {"group_size": None}, "has no group_size"),
    "3-bit gptq": ("gptq", {"bits": 3}, "gives bits 3"),
    "awq gemv packing": ("awq", {"version": "gemv"}, "only gemm packing"),
    "gptq quantizing lm_head": ("gptq", {"lm_head": True}, "--lm-head w4 or w8"),
    "an unknown method": ("gptq", {"quant_method": "hqq"}, "quant_method 'hqq'"),
    "compressed-tensors with activations": ("compressed-tensors", {"config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}, "input_activations": {"num_bits": 8}}}},
        "input activations"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_config_graphopt_cannot_keep_is_refused_before_any_work(tmp_path, case):
    method, override, expected = BAD_CONFIGS[case]
    write_checkpoint(tmp_path / "model", TINY_LLAMA, method, 4, 32, quant_config=override)
    out = tmp_path / "out"
    run = graphopt("run", str(tmp_path / "model"), "--target", "bm1684x", "--out", str(out), check=False)
    assert run.returncode != 0 and expected in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not out.exists()


def test_act_order_groups_out_of_order_are_refused_naming_the_tensor(tmp_path):
    write_checkpoint(tmp_path / "model", TINY_LLAMA, "gptq", 4, 32, quant_config={"desc_act": True})
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model" / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.g_idx"
    tensors[name] = tensors[name][torch.randperm(len(tensors[name]), generator=torch.Generator().manual_seed(0))]
    save_file(tensors, str(tmp_path / "model" / "model.safetensors"))
    run = graphopt("run", str(tmp_path / "model"), "--target", "bm1684x", "--out", str(tmp_path / "out"), check=False)
    assert run.returncode != 0 and f"{name} assigns input channels to quantization groups out of order" in run.stderr
    assert "desc_act=False" in run.stderr and not (tmp_path / "out").exists()


def test_a_mode_of_other_bits_than_the_codes_is_refused(tmp_path):
    write_checkpoint(tmp_path / "model", TINY_LLAMA, "gptq", 4, 32)
    run = graphopt("run", str(tmp_path / "model"), "--target", "bm1684x", "--quantize", "w8bf16", "--out",
                   str(tmp_path / "out"), check=False)
    assert run.returncode != 0 and "Give --quantize w4bf16" in run.stderr and not (tmp_path / "out").exists()


def test_the_default_mode_follows_the_checkpoint_bits_and_scales(tmp_path):
    from graphopt.targets.bm1684x.contract import default_quantize

    write_checkpoint(tmp_path / "gptq", TINY_LLAMA, "gptq", 8, 32)  # float16 scales
    write_checkpoint(tmp_path / "ct", TINY_LLAMA, "compressed-tensors", 4, 32)  # bfloat16 scales
    assert default_quantize(open_model(str(tmp_path / "gptq"))) == "w8f16"
    assert default_quantize(open_model(str(tmp_path / "ct"))) == "w4bf16"
    assert default_quantize(open_model("tiny-llama")) == "w4bf16"


def test_the_golden_of_a_quantized_model_is_its_dequantized_model(tmp_path):
    """The reference (what goldens record and every check compares with) is transformers running the
    checkpoint's dequantized weights, saved as a float checkpoint and loaded by transformers itself."""
    from transformers import AutoModelForCausalLM

    write_checkpoint(tmp_path / "model", TINY_LLAMA, "awq", 4, 64)
    source = open_model(str(tmp_path / "model"))
    reference = source.reference_model()
    reference.config.quantization_config = None
    del reference.config.quantization_config
    reference.save_pretrained(tmp_path / "float")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float", torch_dtype=torch.float32).eval()
    prompt = [1, 5, 9, 200, 17, 3, 44, 8]
    ours = source.greedy(prompt, 8)
    with torch.no_grad():
        theirs = loaded.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert ours["tokens"] == theirs[0, len(prompt):].tolist()


# ---- kept bit for bit on the chip ------------------------------------------------------------------------------

def _requantized_codes_differ(written) -> bool:
    """TPU-MLIR's W4 re-quantizes by min/max per group: the checkpoint's codes (clipped groups) are not those."""
    q = next(iter(written.values()))
    g = 32
    w = (q.codes.astype(np.float64) - np.repeat(q.zeros, g, 1)) * np.repeat(q.scales.double().numpy(), g, 1)
    groups = w.reshape(w.shape[0], -1, g)
    low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    scale = (high - low) / 15
    requantized = np.clip(np.round(groups / scale) + np.round(-low / scale), 0, 15).reshape(q.codes.shape)
    return not np.array_equal(requantized, q.codes)


@pytest.mark.parametrize("key,config,lm_head", [("gptq-int4-asym-g32", TINY_LLAMA, "w8"),
                                                ("awq-int4-g64", TINY_QWEN2_5, "bf16"),
                                                ("ct-int4-sym-g32", TINY_LLAMA, "w4")])
def test_the_bmodel_keeps_the_checkpoints_codes_and_matches_its_dequantized_model(tmp_path, net_cache, key, config,
                                                                                   lm_head):  # noqa: F811
    method, bits, group, symmetric = FORMATS[key]
    written = write_checkpoint(tmp_path / "model", config, method, bits, group, symmetric)
    if key.startswith("gptq"):
        assert _requantized_codes_differ(written)  # so keeping them is something a test can see
    folder = tmp_path / "out"
    run = graphopt("run", str(tmp_path / "model"), "--target", "bm1684x", "--seq-length", SEQ, "--lm-head", lm_head,
                   "--out", str(folder), env=net_cache)
    assert "checks: all passed" in run.stdout, run.stdout
    report = json.loads((folder / "bm1684x.json").read_text())
    kept = report["checkpoint"]
    assert kept["kept"] == kept["linears"] == 2 * len(LINEARS)
    assert kept["read_back"]["nets"] == 4 and not kept["read_back"]["missing"]  # codes, scales, zeros in the file
    scales = "bfloat16" if method == "compressed-tensors" else "float16"
    assert report["quantize"] == ("w4bf16" if scales == "bfloat16" else "w4f16") and "kept exactly" in kept["summary"]
    nets = {n["net"]: n for n in report["nets"]}
    assert all(n["worst"] >= 0.999 for n in nets.values())  # against the dequantized checkpoint
    assert all(nets[f"block{s}_{i}"]["kept_codes"] == len(LINEARS) for s in ("", "_cache") for i in (0, 1))
    assert nets["lm_head"]["quantize"].startswith(lm_head.upper() if lm_head != "bf16" else "F16" if scales ==
                                                  "float16" else "BF16")
    for run_ in report["generation"]["runs"]:  # greedy tokens through the emulated runtime
        assert run_["ok"] and (run_["tokens_identical"] or lm_head != "bf16")
