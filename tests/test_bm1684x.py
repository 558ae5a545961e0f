"""The bm1684x target for real: TPU-MLIR compiles tiny-llama, the bmodel runs in its simulator.

These need the toolchain that the README's install command sets up (`graphopt toolchain
install bm1684x`); without it they fail and say so. Networks are compiled into a fresh cache
per test session, so nothing is taken from an earlier run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphopt.errors import GraphoptError
from graphopt.targets.bm1684x import contract, deploy, toolchain
from graphopt.targets.bm1684x.inspect_bmodel import read_info
from tests.golden.record import load_golden

SEQ = "64"


def graphopt(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "graphopt", *args], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="session")
def net_cache(tmp_path_factory, tools):
    return {"GRAPHOPT_NET_CACHE": str(tmp_path_factory.mktemp("net-cache"))}


# (quantize, contract): today's LLM-TPU contract (the default) in two modes, and the legacy Llama3_1
# demo's in an f16 mode, the only kind that demo's models were compiled in.
BUILDS = {"w4bf16": ("w4bf16", "llm-tpu"), "bf16": ("bf16", "llm-tpu"), "w4f16-llama3_1": ("w4f16", "llama3_1")}
NETS = {"llm-tpu": ["embedding", "embedding_cache", "block_0", "block_cache_0", "block_1", "block_cache_1", "lm_head"],
        "llama3_1": ["embedding", "embedding_cache", "block_0", "block_cache_0", "block_1", "block_cache_1", "lm_head",
                     "greedy_head", "penalty_sample_head"]}


@pytest.fixture(scope="session")
def builds(tmp_path_factory, net_cache):
    """tiny-llama compiled to the bmodels of BUILDS, with every check the run does."""
    root = tmp_path_factory.mktemp("bm1684x")
    out = {}
    for key, (quantize, runtime) in BUILDS.items():
        folder = root / key
        contract_flag = [] if runtime == "llm-tpu" else ["--contract", runtime]
        run = graphopt("run", "tiny-llama", "--target", "bm1684x", "--quantize", quantize, "--seq-length", SEQ,
                       *contract_flag, "--out", str(folder), env=net_cache)
        out[key] = (folder, run)
    return out


@pytest.mark.parametrize("key", list(BUILDS))
def test_compiles_to_one_bmodel_that_passes_the_simulator_checks(builds, key):
    folder, run = builds[key]
    quantize, runtime = BUILDS[key]
    assert "checks: all passed" in run.stdout, run.stdout
    bmodel = folder / f"tiny-llama_{quantize}_seq{SEQ}_bm1684x_1dev.bmodel"
    assert bmodel.is_file()
    report = json.loads((folder / "bm1684x.json").read_text())
    assert report["ok"] and report["bmodel"] == bmodel.name and not report["contract_problems"]
    nets = {n["net"]: n for n in report["nets"]}
    assert list(nets) == NETS[runtime]
    for name, net in nets.items():
        # The session's cache starts empty, so everything is compiled for real; the bf16 build
        # (second) shares the float nets (embedding, lm_head) with the w4bf16 one, not the blocks.
        assert not net["cached"] or (key == "bf16" and not name.startswith("block")), name
        assert net["worst"] >= contract.MIN_COSINE, net
    blocks = [n for name, n in nets.items() if name.startswith("block")]
    assert all(n["total_cycle"] > 0 for n in blocks)
    # each block's attention went to TPU-MLIR as one FAttention (top pass fuse-flash-attention)
    assert all(n["top_passes"]["fuse-flash-attention"]["changed"] == 1 for n in blocks), blocks
    assert "top pass fuse-flash-attention: changed 4 of 4 nets" in run.stdout, run.stdout
    if quantize.startswith("w4"):
        # W4 loses against fp32 (the model's own quantization loss) but not against the same
        # weights rounded to 4 bits: the compiler adds no error of its own.
        assert all(n["precision"] == "W4" and n["worst_fp32"] < n["worst"] for n in blocks)
    # Simulated greedy tokens against onnxruntime's (and, for bf16, fp32's): the same, except that 16-bit
    # arithmetic may resolve a near-tie of the reference logits the other way. Measured with the attention
    # fused into FAttention: bf16 identical to token 12, where the top-2 margin is 0.140 against a logit
    # error of 0.168 (per-net cosines went up with the fusion, e.g. block_0 0.99975 -> 0.99981).
    # Both prompts: 8 tokens, and 48 (3/4 SEQ), whose rows reach far into every copy between nets.
    runs = report["generation"]["runs"]
    assert report["generation"]["ok"] and [r["prompt_length"] for r in runs] == [8, 48]
    # Measured: bf16 meets a near-tie at token 12 of the short prompt and at token 5 of the long one
    # (reference top-2 margin 0.097 against a logit error of 0.39).
    for generation, least in zip(runs, (8, 4)):
        assert generation["ok"] and len(generation["tokens"]) == 16 and generation["min_logit_cosine"] > 0.998
        first_difference = generation["first_difference"]
        agreed = len(generation["tokens"]) if first_difference is None else first_difference
        assert agreed >= least
        if quantize == "bf16":
            assert generation["tokens"][:agreed] == generation["fp32_tokens"][:agreed]
    assert json.loads((folder / "report.json").read_text())["target"]["ok"]


def test_tiny_qwen2_5_compiles_to_bf16_and_passes_the_simulator_checks(net_cache, tmp_path):
    """Qwen2.5's q/k/v biases and tied head through the same passes and TPU-MLIR, checked in the simulator."""
    folder = tmp_path / "qwen2.5-bf16"
    run = graphopt("run", "tiny-qwen2.5", "--target", "bm1684x", "--quantize", "bf16", "--seq-length", SEQ,
                   "--out", str(folder), env=net_cache)
    assert "checks: all passed" in run.stdout, run.stdout
    report = json.loads((folder / "bm1684x.json").read_text())
    assert report["ok"] and report["bmodel"] == f"tiny-qwen2.5_bf16_seq{SEQ}_bm1684x_1dev.bmodel"
    assert not report["contract_problems"]
    blocks = [n for n in report["nets"] if n["net"].startswith("block")]
    assert len(blocks) == 4 and all(not n["cached"] and n["worst"] >= contract.MIN_COSINE for n in blocks)
    # Simulated greedy tokens against onnxruntime's: the same, except that bf16 may resolve a near-tie
    # of the reference logits the other way (tiny-qwen2.5 has one at the 8th token: top-2 margin 0.06;
    # with the query scaled before q·kᵀ bf16 resolves it as fp32 does). Logit cosine per step, measured:
    # 0.9993 or better for the first 8 steps, 0.9983 at the 10th.
    generation = report["generation"]["runs"][0]
    assert report["generation"]["ok"] and generation["min_logit_cosine"] > 0.998
    first_difference = generation["first_difference"]
    agreed = len(generation["tokens"]) if first_difference is None else first_difference
    assert agreed >= 4 and generation["tokens"][:agreed] == generation["fp32_tokens"][:agreed]


def test_tiny_qwen3_in_todays_contract_compiles_to_w4bf16_and_passes_the_simulator_checks(net_cache, tmp_path):
    """Qwen3 (q/k norms, the architecture of LLM-TPU's current demo) with the final norm in its last block and
    lm_head answering the token, driven as that demo drives it: K/V rows written straight into the cache; the
    prefill takes 32 of the 64 rows the cache holds (--max-input-length); decode stages at 64, 48, 32 and 16
    cache rows (--chunk-length 16), each step on the smallest that holds the history, as the cpp_demo picks."""
    folder = tmp_path / "qwen3-w4bf16"
    run = graphopt("run", "tiny-qwen3", "--target", "bm1684x", "--seq-length", SEQ, "--max-input-length", "32",
                   "--chunk-length", "16", "--out", str(folder), env=net_cache)
    assert "checks: all passed" in run.stdout, run.stdout
    report = json.loads((folder / "bm1684x.json").read_text())
    assert report["ok"] and report["contract"].startswith("llm-tpu: LLM-TPU chat demos") and not report["contract_problems"]
    assert [n["net"] for n in report["nets"]] == NETS["llm-tpu"]
    assert "memory check" in report["seconds"]  # the demo's copies and bound outputs checked on the file's layout
    runs = report["generation"]["runs"]
    assert [r["prompt_length"] for r in runs] == [8, 24]  # the long prompt: 3/4 of the prefill's 32 rows
    for generation in runs:
        assert generation["ok"] and len(generation["tokens"]) == 16 and generation["min_logit_cosine"] > 0.998
    _, infos = read_info(toolchain.require(), folder / report["bmodel"])
    by_name = {n.name: n for n in infos}
    assert [(t.shape, t.dtype) for t in by_name["lm_head"].outputs] == [((1, 1), "int32")]
    assert by_name["embedding"].inputs[0].shape == (1, 32) and by_name["block_0"].inputs[2].shape == (1, 1, 32, 32)
    assert by_name["block_cache_0"].inputs[3].shape[1] == 64  # SEQ: what the demo reads from history_k
    # The stages are stages of block_cache_i in the file, longest first, and the run compiled and reported them;
    # the generation above (8 and 24 prompt tokens, 16 new) decoded on the 16-, 32- and 48-row stages.
    assert [s.inputs[3].shape[1] for s in by_name["block_cache_1"].more_stages] == [48, 32, 16]
    assert [(s["net"], s["cache_rows"]) for s in report["decode_stages"]] == [
        (f"block_cache_{i}", rows) for i in (0, 1) for rows in (48, 32, 16)]
    assert all(s["total_cycle"] > 0 for s in report["decode_stages"]) and "decode stages, block_cache_0" in run.stdout
    # Each stage in the simulator against onnxruntime at the stage's shapes, held to the nets' bar.
    assert all(s["ok"] and s["worst"] >= contract.MIN_COSINE for s in report["decode_stages"])
    assert "decode stages in the simulator vs onnxruntime at their shapes: 6 stages" in run.stdout
    inspect = graphopt("inspect", str(folder / report["bmodel"])).stdout
    assert "block_cache_0 (4 stages)" in inspect and "contract (llm-tpu" in inspect and ": met (2 layers)" in inspect
    # Stages joined under their net's name, as model_tool --combine joins them, to the byte.
    combined = _combined_as_model_tool_combines(toolchain.require(), folder, tmp_path)
    assert (combined["nets"], combined["stages"]) == (7, 7 + 6)


def test_tiny_qwen3_with_history_kv_compiles_dynamic_blocks_that_run_at_the_lengths_the_demo_sets(net_cache, tmp_path):
    """--history-kv (llm_convert's --use_history_kv): block_i and block_kv_i compiled --dynamic with their causal
    mask baked (TPU-MLIR's small mask) and their shapes open along the sequence; each checked in the simulator
    at other lengths than it was compiled for (3/4 of its rows, after half of the cache), against onnxruntime
    with the mask those lengths mean; a three-turn chat driven as the Qwen3 cpp_demo drives it (chunks through
    block_i then block_kv_i, the cache copied into its history inputs) against the same chat in onnxruntime,
    whose turns the run's end-to-end check holds to one prefill of the whole conversation in transformers."""
    folder = tmp_path / "qwen3-history"
    run = graphopt("run", "tiny-qwen3", "--target", "bm1684x", "--seq-length", SEQ, "--history-kv", "--out",
                   str(folder), env=net_cache)
    assert "checks: all passed" in run.stdout, run.stdout
    report = json.loads((folder / "bm1684x.json").read_text())
    assert report["ok"] and report["contract"].startswith("llm-tpu --dynamic --history-kv: ")
    nets = {n["net"]: n for n in report["nets"]}
    assert [n for n in nets if n.startswith("block")] == ["block_0", "block_cache_0", "block_kv_0", "block_1",
                                                          "block_cache_1", "block_kv_1"]
    for name in ("block_0", "block_kv_0", "block_1", "block_kv_1"):
        assert "--dynamic" in nets[name]["flags"] and nets[name]["total_cycle"] is None
        assert nets[name]["top_passes"]["small-causal-mask"]["changed"] == 1, nets[name]["top_passes"]
        assert nets[name]["top_passes"]["dynamic-sequence"]["changed"] > 0
        assert nets[name]["ok"] and nets[name]["worst"] >= contract.MIN_COSINE
    # block_kv_i's [history ; new rows] concats merged in place, as llm_convert sets them (no copy of the cache)
    assert nets["block_kv_0"]["top_passes"]["merge-cache-concat"]["changed"] == 2
    chat = report["generation"]["chat"]["turns"]
    assert chat and all(t["ok"] for t in chat) and chat[0]["tokens_identical"], chat
    end_to_end = json.loads((folder / "report.json").read_text())["end_to_end"]["chat"]
    assert end_to_end["ok"] and len(end_to_end["turns"]) == 3
    _, infos = read_info(toolchain.require(), folder / report["bmodel"])
    by_name = {n.name: n for n in infos}
    assert [t.name for t in by_name["block_kv_0"].inputs][2:] == ["history_k", "history_v"]
    assert len(by_name["block_0"].inputs) == 2 and by_name["block_kv_0"].inputs[2].shape == (1, 64, 2, 32)
    inspect = graphopt("inspect", str(folder / report["bmodel"])).stdout
    assert "contract (llm-tpu --dynamic --history-kv: " in inspect and ": met (2 layers)" in inspect
    _combined_as_model_tool_combines(toolchain.require(), folder, tmp_path)  # dynamic nets


def test_tiny_llama_with_dynamic_blocks_walks_the_rmsnorm_tpu_mlir_leaves_unfused(net_cache, tmp_path):
    """Llama's RMSNorm comes out of model_transform as ops (top.Reduce over the hidden axis, tiny-llama's), not
    top.RMSNorm as Qwen3's: dynamic-sequence follows the sequence axis through the Reduce, and the blocks run in
    the simulator at other lengths than compiled (the run failed on block_4's top.Reduce before)."""
    folder = tmp_path / "llama-dynamic"
    run = graphopt("run", "tiny-llama", "--target", "bm1684x", "--seq-length", SEQ, "--dynamic", "--out",
                   str(folder), env=net_cache)
    assert "checks: all passed" in run.stdout, run.stdout
    nets = {n["net"]: n for n in json.loads((folder / "bm1684x.json").read_text())["nets"]}
    for name in ("block_0", "block_1"):
        assert "--dynamic" in nets[name]["flags"] and nets[name]["top_passes"]["dynamic-sequence"]["changed"] > 0
        assert nets[name]["ok"] and nets[name]["worst"] >= contract.MIN_COSINE


def test_tiny_llama_with_do_sample_draws_on_the_chip_from_transformers_distribution(net_cache, tmp_path):
    """--do-sample (llm_convert's --do_sample): lm_head answers logits, greedy_head and sample_head read them;
    sample_head is compiled --dynamic (the demo sets how many ids it penalises) and io_alone, checked in the
    simulator at 3/4 of its ids against onnxruntime; a generation sampled as the Qwen3 demos' penalty_sample
    draws has every simulated draw from transformers' distribution on the simulated logits."""
    folder = tmp_path / "llama-sample"
    run = graphopt("run", "tiny-llama", "--target", "bm1684x", "--seq-length", SEQ, "--do-sample", "--out", str(folder),
                   env=net_cache)
    assert "checks: all passed" in run.stdout, run.stdout
    report = json.loads((folder / "bm1684x.json").read_text())
    assert report["ok"] and report["contract"].startswith("llm-tpu --do-sample: ")
    nets = {n["net"]: n for n in report["nets"]}
    assert list(nets)[-3:] == ["lm_head", "greedy_head", "sample_head"]
    assert "--dynamic" in nets["sample_head"]["flags"] and "io_alone" in nets["sample_head"]["flags"]
    assert "--dynamic" not in nets["block_0"]["flags"]  # sampling alone leaves the blocks static
    assert nets["sample_head"]["ok"] and nets["sample_head"]["outputs"]["token"]["equal"] == 1.0, nets["sample_head"]
    sampled = report["generation"]["sampled"]
    assert sampled["ok"] and sampled["max_prob_err"] <= 1e-5 and len(sampled["tokens"]) == 16, sampled
    assert all(r["tokens_identical"] for r in report["generation"]["runs"])  # greedy, through greedy_head
    inspect = graphopt("inspect", str(folder / report["bmodel"])).stdout
    assert "contract (llm-tpu --do-sample: " in inspect and ": met (2 layers)" in inspect
    tokens = [json.loads(graphopt("generate", str(folder), "--input-ids", "1,2,3", "--max-new-tokens", "4", "--do-sample",
                                  "--backend", "bm1684x-sim", "--json").stdout)["tokens"] for _ in range(2)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 4


def test_a_hand_written_model_with_an_adapter_only_gives_its_own_tokens_in_the_simulator(net_cache, tmp_path):
    """examples/custom_model/diy_lm.py (attention written out, a causal mask built from positions, interleaved
    rotary): compiled bf16 with its adapter only, every attention fused into FAttention (K found behind the
    rotary's pairs join, which TPU-MLIR folds into the head repeat), its simulated greedy tokens equal the fp32
    networks' (which the run's end-to-end check holds to the model's own forward) up to a near-tie the run
    excuses."""
    folder = tmp_path / "diy-bf16"
    model = Path(__file__).resolve().parents[1] / "examples" / "custom_model" / "diy_lm.py"
    run = graphopt("run", str(model), "--target", "bm1684x", "--quantize", "bf16", "--seq-length", SEQ, "--out",
                   str(folder), env=net_cache)
    assert "checks: all passed" in run.stdout, run.stdout
    report = json.loads((folder / "bm1684x.json").read_text())
    for run in report["generation"]["runs"]:
        same = run["first_difference"] if not run["tokens_identical"] else len(run["tokens"])
        assert run["ok"] and same >= 8 and run["tokens"][:same] == run["fp32_tokens"][:same], run
    assert json.loads((folder / "report.json").read_text())["end_to_end"]["tokens_identical"]
    nets = {n["net"]: n for n in report["nets"]}
    assert all(nets[f"block_{i}"]["top_passes"]["fuse-flash-attention"]["changed"] == 1 for i in (0, 1))


def test_simulated_generation_from_the_command_line_matches_onnxruntime(builds):
    folder, _ = builds["bf16"]
    golden, _ = load_golden("tiny-llama")
    ids = ",".join(map(str, golden["prompt"]))
    # 12 tokens: at the 13th, tiny-llama's reference logits hold a near-tie (top-2 margin 0.14) that
    # bf16 with the attention fused into FAttention resolves the other way (unfused it held to the 18th,
    # margin 0.04, at lower per-net cosines).
    common = ["--input-ids", ids, "--max-new-tokens", "12", "--ignore-eos", "--json"]
    sim = json.loads(graphopt("generate", str(folder), "--backend", "bm1684x-sim", *common).stdout)["tokens"]
    ort = json.loads(graphopt("generate", str(folder), *common).stdout)["tokens"]
    assert sim == ort == golden["tokens"][:12]


def test_inspect_lists_the_nets_and_says_which_contract_they_meet(builds, tools):
    folder, _ = builds["w4bf16"]
    bmodel = next(folder.glob("*.bmodel"))
    out = graphopt("inspect", str(bmodel)).stdout
    assert "contract (llm-tpu: LLM-TPU chat demos (Qwen3 python_demo) / TPU-MLIR llm_convert): met (2 layers)" in out
    assert "contract (llama3_1: LLM-TPU Llama3_1 chat demo (legacy)): not met (net 'greedy_head' is missing" in out
    assert "history_k" in out and "[1, 64, 2, 32]" in out and "int32" in out and "bfloat16" in out
    legacy = graphopt("inspect", str(next(builds["w4f16-llama3_1"][0].glob("*.bmodel")))).stdout
    assert "contract (llama3_1: LLM-TPU Llama3_1 chat demo (legacy)): met (2 layers)" in legacy and "float16" in legacy
    assert "contract (llm-tpu: LLM-TPU chat demos (Qwen3 python_demo) / TPU-MLIR llm_convert): not met" in legacy
    # A single net is not a runtime's bmodel: inspect says what is missing and exits 1.
    single = _cached_bmodel(folder, "lm_head")
    partial = graphopt("inspect", str(single), check=False)
    assert partial.returncode == 1 and "NOT MET" in partial.stdout and "'embedding' is missing" in partial.stdout


def _cached_bmodel(folder: Path, net: str) -> Path:
    """The single-net bmodel a build compiled for `net`, in the network cache."""
    report = json.loads((folder / "bm1684x.json").read_text())
    return Path(next(n["cache_dir"] for n in report["nets"] if n["net"] == net)) / f"{net}.bmodel"


def test_inspect_refuses_a_file_that_is_not_a_bmodel(tmp_path, tools):
    bogus = tmp_path / "x.bmodel"
    bogus.write_bytes(b"not a bmodel")
    proc = graphopt("inspect", str(bogus), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("graphopt: error: ") and "Traceback" not in proc.stderr


def test_a_second_run_reuses_finished_networks_and_redoes_only_missing_ones(builds, net_cache, tools, tmp_path):
    folder, _ = builds["bf16"]
    report = json.loads((folder / "bm1684x.json").read_text())
    # As if a run had been killed before lm_head finished: its cache entry is not there.
    shutil.rmtree(next(n["cache_dir"] for n in report["nets"] if n["net"] == "lm_head"))
    again = tmp_path / "again"
    graphopt("run", "tiny-llama", "--target", "bm1684x", "--quantize", "bf16", "--seq-length", SEQ, "--no-check",
             "--out", str(again), env=net_cache)
    nets = {n["net"]: n for n in json.loads((again / "bm1684x.json").read_text())["nets"]}
    assert not nets["lm_head"]["cached"] and all(n["cached"] for name, n in nets.items() if name != "lm_head")
    # Same networks, same flags: the same nets (the file itself holds its creation time).
    assert read_info(tools, again / report["bmodel"])[1] == read_info(tools, folder / report["bmodel"])[1]
    assert not list(again.parent.glob(".again*")), "no partial output left behind"


def test_a_failed_compile_names_the_network_and_its_log(tools, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_NET_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "lm_head.onnx"
    broken.write_bytes(b"this is not an onnx model")
    spec = contract.DeploySpec("lm_head", "lm_head", ((1, 128),), "BF16", ("--quant_input",))
    with pytest.raises(GraphoptError) as error:
        deploy.deploy_network(tools, spec, broken, "0" * 64)
    message = str(error.value)
    assert "model_transform failed (exit status 1) for network 'lm_head'" in message and "compile.log" in message
    log = Path(message.split("full log is ")[1].split(";")[0])
    assert log.is_file() and log.parent.name.endswith(".failed")
    assert not list((tmp_path / "cache").glob("*.partial-*")) and not list((tmp_path / "cache").glob("*/result.json"))


def test_the_transform_server_writes_what_the_model_transform_command_writes(tools, tmp_path, monkeypatch):
    """transform_server.py runs model_transform for many nets in one process and skips copies graphopt never
    reads (its converter reads external data straight from the file): the top MLIR and its weights must be the
    same bytes as the command's, net after net, with the weights in the ONNX file and beside it."""
    from graphopt import onnx_ir
    from graphopt.export import export_networks
    from graphopt.models import open_model
    from graphopt.targets import get_target
    from graphopt.targets.bm1684x.model_transform import TransformServers

    nets = {}
    for where, threshold in (("inline", onnx_ir.EXTERNAL_DATA_BYTES), ("external", 0)):
        monkeypatch.setattr(onnx_ir, "EXTERNAL_DATA_BYTES", threshold)
        exported = export_networks(open_model("tiny-llama"), ["block_0", "lm_head"], 32, tmp_path / where,
                                   target=get_target("bm1684x"), check=False)
        assert all((len(net.files) > 1) == (where == "external") for net in exported.values())
        nets.update({f"{name}_{where}": net for name, net in exported.items()})
    servers = TransformServers()
    try:
        for name, net in nets.items():
            args = contract.DeploySpec(name, name, tuple(s.shape for s in net.inputs), "BF16", ()).transform_args(
                str(net.files[0]), f"{name}.mlir")
            for how in ("command", "server", "server again"):
                (tmp_path / how / name).mkdir(parents=True)
            assert tools.run("model_transform", args, tmp_path / "command" / name, tmp_path / "command.log") == 0
            peaks = {}
            for how in ("server", "server again"):
                assert servers.run(tools, args, tmp_path / how / name, tmp_path / f"{how}.log", 1, peaks) == 0
            assert peaks["model_transform"] > 0
            # What the rest of the compile reads: the top MLIR and its weights. (The converter's `_origin.mlir`
            # differs: the server folds a weight's Transpose there, which tpuc-opt would do after it.)
            for made in (tmp_path / "command" / name / f"{name}.mlir",
                         *(tmp_path / "command" / name).glob("*_top_*weight.npz")):
                for how in ("server", "server again"):
                    assert (tmp_path / how / name / made.name).read_bytes() == made.read_bytes(), (how, made.name)
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"this is not an onnx model")
        (tmp_path / "broken").mkdir()
        status = servers.run(tools, ["--model_name", "x", "--model_def", str(broken), "--input_shapes", "[[1]]",
                                     "--mlir", "x.mlir"], tmp_path / "broken", tmp_path / "broken.log")
        assert status != 0 and "Traceback" in (tmp_path / "broken.log").read_text()
        # model_validate would read the weights the server's converter lets go of: refused, and the log says so.
        status = servers.run(tools, [*args, "--test_input", "in.npz"], tmp_path / "broken", tmp_path / "validate.log")
        assert status == 2 and "--test_input is not served" in (tmp_path / "validate.log").read_text()
    finally:
        servers.close()


def test_idle_transform_servers_make_room_for_a_model_deploy_that_would_not_fit_beside_them(tools, tmp_path):
    """With --max-memory 8 an 8B head's model_deploy (5.9 GiB) runs alone, and the compile threads' idle transform
    servers (0.58 GiB each) took the run past 7.5 GiB. make_room stops the idle servers when a net's planned peak
    and theirs would not fit the budget; the next transform starts one again."""
    from graphopt.export import export_networks
    from graphopt.models import open_model
    from graphopt.targets import get_target
    from graphopt.targets.bm1684x.model_transform import TransformServers

    net = export_networks(open_model("tiny-llama"), ["block_0"], 32, tmp_path / "onnx", target=get_target("bm1684x"),
                          check=False)["block_0"]
    args = contract.DeploySpec("block_0", "block_0", tuple(s.shape for s in net.inputs), "BF16", ()).transform_args(
        str(net.files[0]), "block_0.mlir")
    servers = TransformServers()
    try:
        for attempt in ("first", "again"):
            (tmp_path / attempt).mkdir()
            assert servers.run(tools, args, tmp_path / attempt, tmp_path / f"{attempt}.log") == 0
            assert servers.make_room(1 << 30, 64 << 30) == 0  # room for both: the server stays
            assert servers.make_room(1 << 30, 1 << 30) == 1  # the net alone fills the budget: the server goes
            assert servers.make_room(1 << 30, 1 << 30) == 0
    finally:
        servers.close()


def test_the_transform_server_leaves_the_top_weights_in_the_converters_file_only_where_they_are_its(tools,
                                                                                                    tmp_path):
    """keep_converter_weights (deploy.py asks it for every net that runs the tool): tpuc-opt writes no weights file
    and the top MLIR names the converter's. For tiny-llama's block_0 (whose RMSNorm weights tpuc-opt reshapes) and
    lm_head: the top MLIR is the command's but for that name, and each weight it names is the command's bytes in
    the converter's file. A net where tpuc-opt makes a weight of its own (a 3-D weight's Transpose, which the
    converter leaves to it) is made again as the command makes it, and the log says why."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.export import export_networks
    from graphopt.models import open_model
    from graphopt.targets import get_target
    from graphopt.targets.bm1684x.model_transform import TransformServers

    exported = export_networks(open_model("tiny-llama"), ["block_0", "lm_head"], 32, tmp_path / "onnx",
                               target=get_target("bm1684x"), check=False)
    nets = {name: (net.files[0], tuple(s.shape for s in net.inputs)) for name, net in exported.items()}
    weight = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    graph = helper.make_graph([helper.make_node("Transpose", ["w"], ["wt"], perm=[0, 2, 1], name="t"),
                               helper.make_node("Add", ["x", "wt"], ["y"], name="add")], "folds",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "folds.onnx")
    nets["folds"] = (tmp_path / "folds.onnx", ((2, 3, 4),))
    servers = TransformServers()
    try:
        for name, (path, shapes) in nets.items():
            args = contract.DeploySpec(name, name, shapes, "BF16", ()).transform_args(str(path), f"{name}.mlir")
            command, server = tmp_path / "command" / name, tmp_path / "server" / name
            command.mkdir(parents=True), server.mkdir(parents=True)
            assert tools.run("model_transform", args, command, command / "log") == 0
            kept = []
            assert servers.run(tools, args, server, server / "log", 1, keep_converter_weights=True, kept=kept) == 0
            top = f"{name}_top_f32_all_weight.npz"
            if name == "folds":
                assert kept == [False] and "tpuc-opt made 1 weight(s) the converter did not (wt_Transpose_folder)" \
                    in (server / "log").read_text()
                for made in (f"{name}.mlir", top):
                    assert (server / made).read_bytes() == (command / made).read_bytes(), made
                continue
            assert kept == [True] and not (server / top).exists()
            converters = f"{name}_top_f32_all_origin_weight.npz"
            assert (server / f"{name}.mlir").read_text() == (command / f"{name}.mlir").read_text().replace(
                f'module.weight_file = "{top}"', f'module.weight_file = "{converters}"')
            with np.load(command / top) as want, np.load(server / converters) as got:
                assert want.files and set(want.files) <= set(got.files)
                for key in want.files:
                    assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), key
    finally:
        servers.close()


def test_a_dynamic_net_whose_baked_mask_is_not_causal_is_refused_with_why(tools, tmp_path, monkeypatch):
    """small-causal-mask swaps a dynamic net's baked mask for TPU-MLIR's small causal mask only where the baked
    one is exactly causal after the cache: any other mask would be wrong at every other length, so the compile
    stops and its log says so."""
    import numpy as np

    from graphopt import contract as c
    from graphopt.export import export_networks
    from graphopt.models import open_model
    from graphopt.targets import get_target
    from graphopt.targets.bm1684x.top_passes import passes_for

    monkeypatch.setenv("GRAPHOPT_NET_CACHE", str(tmp_path / "cache"))
    block = export_networks(open_model("tiny-llama"), ["block_0"], 32, tmp_path / "onnx", target=get_target("bm1684x"),
                            check=False, contract_options=(c.DYNAMIC,))["block_0"]
    spec = contract.DeploySpec("block_0", "block_0", tuple(s.shape for s in block.inputs[:2]), "BF16",
                               contract.block_flags("bf16", 64) + contract.DYNAMIC_FLAGS, passes_for(c.BLOCK, dynamic=True),
                               baked=((c.ATTENTION_MASK, block.inputs[2].shape),), dynamic=True)

    def one_ahead(steps, history_rows=0):  # every query also sees the next key
        return np.triu(np.full((steps, steps + history_rows), c.MASK_VALUE, np.float32), k=2 + history_rows)[None, None]

    monkeypatch.setattr(c, "baked_mask", one_ahead)
    with pytest.raises(GraphoptError) as error:
        deploy.deploy_network(tools, spec, block.files[0], block.sha256)
    assert "top passes fuse-flash-attention,small-causal-mask,dynamic-sequence failed" in str(error.value)
    log = Path(str(error.value).split("full log is ")[1].split(";")[0]).read_text()
    assert "its mask is not causal after the cache" in log


def test_without_a_toolchain_the_error_says_how_to_install_one(tmp_path):
    bare_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not Path(p, "model_deploy.py").exists())
    proc = graphopt("run", "tiny-llama", "--target", "bm1684x", "--out", str(tmp_path / "o"), check=False,
                    env={"GRAPHOPT_CACHE": str(tmp_path / "empty-cache"), "PATH": bare_path, "TPUC_ROOT": ""})
    assert proc.returncode == 2 and "graphopt toolchain install bm1684x" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text[text.index("[") + 1:text.index("]")]


# A 64 MiB malloc, every page touched; what of this process is in transparent huge pages.
HUGE_PAGES_OF_A_MALLOC = ("b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); "
                          "print(next(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') "
                          "if l.startswith('AnonHugePages')))")


@pytest.mark.skipif(_thp_mode() == "never", reason="transparent huge pages are off on this machine")
def test_the_tools_that_copy_weights_get_their_malloc_in_huge_pages(tools):
    """graphopt.machine.HUGE_PAGE_MALLOC reaches the transform servers, model_deploy and model_tool (its combine)
    (toolchain.HUGE_PAGE_TOOLS): the copies of gigabytes of weights are not spent faulting in 4 KiB pages. The
    simulator runs with glibc's default."""
    from graphopt.targets.bm1684x.toolchain import HUGE_PAGE_TOOLS

    assert HUGE_PAGE_TOOLS == ("model_transform", "model_deploy", "model_tool")
    env = tools.environ(huge_pages=True)
    huge_kb = int(subprocess.run([str(tools.python), "-c", HUGE_PAGES_OF_A_MALLOC], env=env, check=True,
                                 capture_output=True, text=True).stdout)
    assert huge_kb >= 32 << 10
    if _thp_mode() == "madvise":  # then malloc asks for them only with the tunable
        env = tools.environ()
        assert "hugetlb" not in env.get("GLIBC_TUNABLES", "")
        plain_kb = int(subprocess.run([str(tools.python), "-c", HUGE_PAGES_OF_A_MALLOC], env=env, check=True,
                                      capture_output=True, text=True).stdout)
        assert plain_kb < huge_kb


# Stands in front of the real tpuc-opt on PATH: writes down each step's option, its personality(2), and how many
# variables and bytes its environment has (and whether the caller's PAD is among them); then runs the real one.
TPUC_OPT_WITNESS = """#!/bin/sh
vars=$(tr '\\0' '\\n' < /proc/$$/environ | wc -l)
pad=$(tr '\\0' '\\n' < /proc/$$/environ | grep -c '^PAD=')
echo "$2 personality=$(cat /proc/self/personality) vars=$vars bytes=$(wc -c < /proc/$$/environ) pad=$pad" >> {log}
exec {real} "$@"
"""


def _witnessed(step: str, key: str) -> int:
    return int(step.split(f" {key}=")[1].split()[0], 16 if key == "personality" else 10)


def test_model_deploys_codegen_runs_on_a_pinned_stack(tools, tmp_path):
    """deploy_runner.py: codegen writes a field it never sets into the ArgMax command lm_head's TopK becomes, from
    the stack's leftovers; so codegen runs with address-space randomization off and its environment padded to a
    fixed size, and gives the same bytes from callers whose environments and directories differ. The other
    steps run as model_deploy runs them. Watched from outside: each tpuc-opt model_deploy starts."""
    from graphopt.export import export_networks
    from graphopt.models import open_model
    from graphopt.targets import get_target
    from graphopt.targets.bm1684x.deploy_runner import ADDR_NO_RANDOMIZE, ENV_BYTES, ENV_VARS

    net = export_networks(open_model("tiny-llama"), ["lm_head"], 32, tmp_path / "onnx", target=get_target("bm1684x"),
                          check=False)["lm_head"]
    spec = contract.DeploySpec("lm_head", "lm_head", tuple(s.shape for s in net.inputs), "BF16", ("--quant_input",))
    top = tmp_path / "top"
    top.mkdir()
    assert tools.run("model_transform", spec.transform_args(str(net.files[0]), "lm_head.mlir"), top,
                     tmp_path / "compile.log") == 0
    witness = tmp_path / "bin" / "tpuc-opt"
    witness.parent.mkdir()
    witness.write_text(TPUC_OPT_WITNESS.format(log=tmp_path / "witness.log",
                                               real=shutil.which("tpuc-opt", path=tools.environ()["PATH"])))
    witness.chmod(0o755)
    python, runner = tools.tool("model_deploy")
    # `import tpu_mlir` puts its own bin first on PATH: the witness goes in front after that.
    start = (f"import os, runpy, sys, tpu_mlir; os.environ['PATH'] = {str(witness.parent)!r} + ':' + os.environ['PATH']; "
             f"sys.argv = sys.argv[1:]; runpy.run_path({runner!r}, run_name='__main__')")
    bmodels = []
    for pad in (0, 1600):  # two callers whose environments and directories differ in size
        work = tmp_path / ("work" + "-" * (pad // 40))
        work.mkdir()
        for made in top.glob("lm_head*"):
            if made.suffix in (".mlir", ".npz"):
                (work / made.name).symlink_to(made)
        subprocess.run([python, "-c", start, runner, *spec.deploy_args("lm_head.mlir", "lm_head.bmodel")], cwd=work,
                       env={**tools.environ(huge_pages=True), "PAD": "x" * pad}, check=True, capture_output=True)
        bmodels.append(_without_build_time(work / "lm_head.bmodel"))
    assert bmodels[0] == bmodels[1]
    steps = (tmp_path / "witness.log").read_text().splitlines()
    codegen = [step for step in steps if step.startswith("--codegen")]
    assert len(codegen) == 2 and len(steps) >= 6, steps
    for step in codegen:  # the caller's environment, padded
        assert _witnessed(step, "personality") & ADDR_NO_RANDOMIZE, step
        assert (_witnessed(step, "vars"), _witnessed(step, "bytes"), _witnessed(step, "pad")) == (ENV_VARS, ENV_BYTES, 1)
    for step in steps:
        if step not in codegen:  # as model_deploy runs them: the caller's environment, randomization on
            assert not _witnessed(step, "personality") & ADDR_NO_RANDOMIZE and _witnessed(step, "pad") == 1, step


def test_toolchain_status_names_the_toolchain_in_use(tools):
    out = graphopt("toolchain", "status").stdout
    assert f"used by --target bm1684x: {tools.describe()}" in out


def test_tiny_marian_compiles_to_bf16_and_passes_the_simulator_checks(net_cache, tmp_path):
    """An encoder-decoder model on the chip: encoder, cross_kv, the decoder blocks with their cross-attention
    inputs, one bmodel; every net in the simulator against onnxruntime, then a simulated translation."""
    folder = tmp_path / "marian-bf16"
    run = graphopt("run", "tiny-marian", "--target", "bm1684x", "--quantize", "bf16", "--seq-length", SEQ,
                   "--out", str(folder), env=net_cache)
    assert "checks: all passed" in run.stdout, run.stdout
    report = json.loads((folder / "bm1684x.json").read_text())
    assert report["ok"] and report["bmodel"] == f"tiny-marian_bf16_seq{SEQ}_bm1684x_1dev.bmodel"
    assert report["contract"].startswith("encoder-decoder: ") and not report["contract_problems"]
    nets = {n["net"]: n for n in report["nets"]}
    assert list(nets) == ["encoder", "cross_kv", "embedding", "embedding_cache", "decoder_block_0",
                          "decoder_block_cache_0", "decoder_block_1", "decoder_block_cache_1", "lm_head", "greedy_head"]
    assert all(n["worst"] >= contract.MIN_COSINE for n in nets.values()), nets
    for generation in report["generation"]["runs"]:  # a 9-token source and one of 48
        assert generation["tokens_identical"] and generation["tokens"] == generation["fp32_tokens"]
        assert len(generation["tokens"]) == 16 and generation["min_logit_cosine"] > 0.999

    # The bmodel holds the contract's dtypes: int32 ids and source mask, bf16 states, masks and K/V.
    _, infos = read_info(toolchain.require(), folder / report["bmodel"])
    by_name = {n.name: n for n in infos}
    assert [t.dtype for t in by_name["encoder"].inputs] == ["int32", "int32"]
    assert {t.dtype for n in infos if n.name.startswith("decoder_block") for t in n.inputs + n.outputs} == {"bfloat16"}
    assert "contract (encoder-decoder: encoder-decoder networks" in graphopt("inspect", str(folder / report["bmodel"])).stdout
    _combined_as_model_tool_combines(toolchain.require(), folder, tmp_path)

    # `graphopt generate --backend bm1684x-sim` translates with the bmodel as transformers does.
    golden, _ = load_golden("tiny-marian")
    common = ["--input-ids", ",".join(map(str, golden["prompt"])), "--max-new-tokens", "12", "--ignore-eos", "--json"]
    sim = json.loads(graphopt("generate", str(folder), "--backend", "bm1684x-sim", *common).stdout)["tokens"]
    assert sim == golden["tokens"][:12]


def test_embeddings_in_shared_memory_overlap_block_0_and_the_run_says_so(builds, net_cache, tmp_path, monkeypatch):
    """Issue 17, defect 2. Compiled as before io_alone (embedding and lm_head in the nets' shared memory),
    TPU-MLIR puts block_0's input inside the embedding's output at SEQ 64, and the demo's first-turn copy
    between them runs over its own source in the simulator: a 48-token prompt then answers other tokens.
    The memory check names the copy, and the simulated generation (on the bmodel's own memory) differs."""
    from graphopt.compiler import compile_model
    from graphopt.models import open_model
    from graphopt.targets import get_target

    monkeypatch.setenv("GRAPHOPT_NET_CACHE", net_cache["GRAPHOPT_NET_CACHE"])  # the blocks are compiled already
    monkeypatch.setattr(contract, "EMBEDDING_FLAGS", ("--quant_input", "--quant_output"))
    monkeypatch.setattr(contract, "LM_HEAD_FLAGS", ("--quant_input",))
    result = compile_model(open_model("tiny-llama"), get_target("bm1684x"), int(SEQ), tmp_path / "shared-embedding",
                           show_progress=False, target_options={"quantize": "w4f16", "group_size": 64, "jobs": None},
                           contract="llama3_1")
    built = result.target
    assert not result.ok and len(built.problems) == 1, built.problems
    assert built.problems[0].startswith("the runtime copies embedding output 0") and \
        "into block_0 input 0" in built.problems[0] and "overlaps the source" in built.problems[0]
    short, long = built.generation["runs"]
    assert short["ok"] and short["tokens_identical"]  # 8 rows: the overlap starts past them
    assert not long["ok"] and long["first_difference"] == 0
    # The same nets with io_alone embeddings and lm_head (the contract): no hazard, both prompts right.
    report = json.loads((builds["w4f16-llama3_1"][0] / "bm1684x.json").read_text())
    assert not report["contract_problems"] and all(r["ok"] for r in report["generation"]["runs"])


def _without_build_time(bmodel: Path) -> bytes:
    """The bmodel's bytes but the one field two builds of the same nets differ in: the wall-clock time
    (ctime) model_tool --combine writes into the header."""
    data = bmodel.read_bytes()
    head, stamps = re.subn(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}\n", b"(time)", data[:1024])
    assert stamps == 1
    return head + data[1024:]


def _combined_as_model_tool_combines(tools, folder: Path, tmp_path: Path) -> dict:
    """The build's bmodel, which graphopt's combine wrote, is the file TPU-MLIR's model_tool --combine writes
    from the same nets (but the build time); returns the build's account of its combine."""
    report = json.loads((folder / "bm1684x.json").read_text())
    combined = report["combine"]
    assert combined["by"] == "graphopt", combined
    theirs = tmp_path / f"model_tool-{folder.name}.bmodel"
    status = tools.run("model_tool", ["--combine", *combined["inputs"], "-o", str(theirs)], cwd=tmp_path,
                       log=tmp_path / "model_tool.log")
    assert status == 0, (tmp_path / "model_tool.log").read_text()
    assert _without_build_time(folder / report["bmodel"]) == _without_build_time(theirs)
    return combined


@pytest.mark.parametrize("key", list(BUILDS))
def test_the_bmodel_is_the_file_model_tool_combine_writes_from_the_same_nets(builds, tools, key, tmp_path):
    """combine.py writes the bmodel without holding it in memory; byte for byte it is model_tool's, whose combine
    held 1.33x the bmodel resident (7.54 GiB for the 8B). Both tiny-llama layers' blocks carry the kernel module,
    and embedding_cache the embedding's table: each is stored once."""
    combined = _combined_as_model_tool_combines(tools, builds[key][0], tmp_path)
    assert combined["nets"] == len(combined["inputs"]) == len(NETS[BUILDS[key][1]])
    assert combined["stored_once"] >= len(combined["inputs"]) - 1  # the kernel module of every file but the first


def test_the_combine_refuses_a_file_that_is_not_a_bmodel_and_a_stage_that_cannot_join_its_net(builds, tools, tmp_path):
    """Bad input to the combine is one paragraph that names the file and the net, and leaves no file behind."""
    from graphopt.targets.bm1684x.combine import combine

    inputs = json.loads((builds["w4bf16"][0] / "bm1684x.json").read_text())["combine"]["inputs"]
    block_0 = Path(next(i for i in inputs if i.endswith("/block_0.bmodel")))
    out = tmp_path / "out.bmodel"
    (tmp_path / "not.bmodel").write_bytes(b"\0" * 100)
    with pytest.raises(GraphoptError, match=r"not\.bmodel is not a bmodel written by TPU-MLIR's model_deploy"):
        combine(tools.root, [block_0, tmp_path / "not.bmodel"], out)
    # The same net twice: a second stage whose inputs are the first's shapes, which no runtime could choose.
    with pytest.raises(GraphoptError, match=r"adds a stage to net block_0 that cannot join it: its input shapes"):
        combine(tools.root, [block_0, block_0], out)
    assert list(tmp_path.iterdir()) == [tmp_path / "not.bmodel"]


@pytest.fixture
def ray_cluster(tmp_path):
    """A two-node Ray cluster on loopback (`ray start --head` and a worker), each node with a net cache of its own."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    node_cache = tmp_path / "node-cache"
    env = {**os.environ, "GRAPHOPT_NET_CACHE": str(node_cache), "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    port = "6399"
    try:
        subprocess.run([ray, "start", "--head", "--port", port, "--include-dashboard", "false", *common], env=env,
                       check=True, capture_output=True, timeout=180)
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True, timeout=180)
        yield f"127.0.0.1:{port}", node_cache
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


def test_the_ray_executor_exports_and_builds_the_same_bytes_as_a_local_run(builds, ray_cluster, tmp_path):
    address, node_cache = ray_cluster
    folder, _ = builds["w4bf16"]
    name = f"tiny-llama_w4bf16_seq{SEQ}_bm1684x_1dev.bmodel"
    driver_cache = tmp_path / "driver-cache"
    run = graphopt("run", "tiny-llama", "--target", "bm1684x", "--quantize", "w4bf16", "--seq-length", SEQ,
                   "--executor", "ray", "--ray-address", address, "--no-check", "--out", str(tmp_path / "ray"),
                   env={"GRAPHOPT_NET_CACHE": str(driver_cache)})
    assert _without_build_time(tmp_path / "ray" / name) == _without_build_time(folder / name)
    # Exported by the nodes too, a weight group a task: the same ONNX bytes as the local run's.
    export = json.loads((tmp_path / "ray" / "report.json").read_text())["export"]
    assert export["tasks"] == 3 and len(export["nodes"]) == 3 and all(export["nodes"].values()), export
    manifests = [json.loads((f / "manifest.json").read_text())["networks"] for f in (tmp_path / "ray", folder)]
    assert [(n["name"], n["sha256"]) for n in manifests[0]] == [(n["name"], n["sha256"]) for n in manifests[1]]
    assert "export: on Ray at" in run.stdout
    report = json.loads((tmp_path / "ray" / "bm1684x.json").read_text())
    nodes = {n["net"]: n["node"] for n in report["nets"]}
    assert all(nodes.values()) and not any(n["cached"] for n in report["nets"]), nodes  # compiled by the nodes
    assert "on 2 of 2 nodes" in report["schedule"], report["schedule"]
    # The nodes compiled into their own cache; the driver's holds the same entries, under the same keys.
    entries = {p.name for p in node_cache.iterdir() if not p.name.endswith(".log")}
    assert entries == {p.name for p in driver_cache.iterdir() if not p.name.endswith(".log")}
    assert "compile schedule: on Ray at" in run.stdout


def test_ray_address_without_the_ray_executor_is_refused(tmp_path):
    run = graphopt("run", "tiny-llama", "--target", "bm1684x", "--ray-address", "127.0.0.1:6379", "--out",
                   str(tmp_path / "o"), check=False)
    assert run.returncode == 2 and "--ray-address" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


def test_the_simulator_takes_the_device_memory_a_large_bmodel_needs(builds, tools, tmp_path):
    """An 8B W4 bmodel needs 6 GB of device memory, past the cmodel's default; the simulator is started with
    CMODEL_GLOBAL_MEM_SIZE, which the cmodel reads in hexadecimal (a decimal value loads nothing at all)."""
    from graphopt.targets.bm1684x.simulator import Simulator

    folder, _ = builds["w4bf16"]
    bmodel = folder / f"tiny-llama_w4bf16_seq{SEQ}_bm1684x_1dev.bmodel"
    with Simulator(tools, tmp_path / "sim.log", 7 << 30) as sim:
        assert set(sim.layout(bmodel)) == set(NETS["llm-tpu"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to hold the cmodel's threads off")
def test_the_cmodels_engine_threads_keep_to_one_core_unless_a_program_runs(builds, tools, tmp_path):
    """The cmodel's engine threads poll without sleeping (cmodel_device._Engines): idle, they took every core,
    and the bmodel's load (the memory check's, 7-16 s for an 8-layer 8B) got a fraction of one. They are held
    to one core from the device's start, given every core while a program runs, and held again after it."""
    from graphopt.targets.bm1684x.simulator import Simulator

    folder, _ = builds["w4bf16"]
    bmodel = folder / f"tiny-llama_w4bf16_seq{SEQ}_bm1684x_1dev.bmodel"

    def engine_cores(pid: int) -> list[int]:
        tasks = Path(f"/proc/{pid}/task")
        return [len(os.sched_getaffinity(int(t.name))) for t in tasks.iterdir()
                if (t / "comm").read_text().strip() in ("CORE_MAIN", "TPU_BD", "TPU_GDMA", "TPU_GDE")]

    with Simulator(tools, tmp_path / "sim.log") as sim:
        ids = sim.layout(bmodel)["embedding_cache"]["in"][0]
        assert engine_cores(sim.process.pid) == [1] * 4
        out, = sim.run(bmodel, "embedding_cache", {ids["name"]: np.full(ids["shape"], 3, dtype=np.int32)})
        assert out.size and np.isfinite(out.astype(np.float32)).all()
        assert engine_cores(sim.process.pid) == [1] * 4


def test_blocks_of_one_graph_reuse_model_transforms_output_and_the_bmodel_is_the_same_bytes(tools, tmp_path,
                                                                                              monkeypatch):
    """transform_reuse.py: with 5 layers, block_0..3 are one graph (block_4 holds the final norm), and so are
    block_cache_0..3. The first two nets of each run model_transform (the recipe is learned, then checked), the
    others get its output made from their own weights. The nets that ran the tool keep the converter's weights
    file (tpuc-opt writes none), and the recipes are learned from those. The bmodel is the bytes of a build where
    every net ran the tool and tpuc-opt wrote every weights file."""
    from graphopt.compiler import compile_model
    from graphopt.models import open_model
    from graphopt.targets import get_target
    from graphopt.targets.bm1684x import transform_reuse

    from graphopt.testing import tiny_llama_checkpoint

    checkpoint = tiny_llama_checkpoint(tmp_path / "tiny-5-layers", 5)
    reports = {}
    for how in ("reused", "every net ran it"):
        monkeypatch.setenv("GRAPHOPT_NET_CACHE", str(tmp_path / f"cache {how}"))
        if how == "every net ran it":
            monkeypatch.setattr(transform_reuse.TransformReuse, "recipe", lambda self, key: None)
            monkeypatch.setattr(deploy, "KEEP_CONVERTER_WEIGHTS", False)
        build = compile_model(open_model(str(checkpoint)), get_target("bm1684x"), int(SEQ), tmp_path / how,
                              check=False, show_progress=False, jobs=2,
                              target_options={"quantize": "w4bf16", "group_size": 64})
        reports[how] = build
    made = {n["net"]: n["transform_from"] for n in reports["reused"].target.nets}
    assert sorted(n for n, source in made.items() if source) == [
        "block_2", "block_3", "block_cache_2", "block_cache_3"], made
    assert {made[n] for n in ("block_2", "block_3")} <= {"block_0", "block_1"}, made
    assert not any(n["transform_from"] or n["converter_weights"] for n in reports["every net ran it"].target.nets)
    kept = sorted(n["net"] for n in reports["reused"].target.nets if n["converter_weights"])
    assert kept == sorted(n for n, source in made.items() if not source), kept
    lines = "\n".join(reports["reused"].target.report_lines())
    assert "model_transform: ran for 9 of 13 compiled nets (9 of them with the converter's weights file" in lines, lines
    bmodels = [tmp_path / how / reports[how].target.bmodel for how in reports]
    assert _without_build_time(bmodels[0]) == _without_build_time(bmodels[1])


@pytest.mark.parametrize("quantize, lm_head", [("w4bf16", "bf16"), ("w4f16", "w4")])
def test_weights_quantized_by_the_top_pass_give_the_bmodel_model_deploy_gives(tools, tmp_path, monkeypatch, quantize,
                                                                             lm_head):
    """quantize-weights (top_passes/quantize_weights.py) quantizes each int4 Linear with TPU-MLIR's own arithmetic
    and hands model_deploy top.A16MatMul: every block's seven Linears (and an int4 lm_head's), and the bmodel is
    the bytes of a build where model_deploy quantized them itself (BF16 and F16 scales)."""
    from graphopt.compiler import compile_model
    from graphopt.models import open_model
    from graphopt.pass_manager import get_pass
    from graphopt.targets import get_target
    from graphopt.testing import tiny_llama_checkpoint

    checkpoint = tiny_llama_checkpoint(tmp_path / "tiny", 2)
    builds = {}
    for how in ("quantize-weights", "model_deploy"):
        with monkeypatch.context() as patch:
            patch.setenv("GRAPHOPT_NET_CACHE", str(tmp_path / f"cache {how}"))
            if how == "model_deploy":
                patch.setattr(get_pass("quantize-weights"), "modes", frozenset())
            options = {"quantize": quantize, "group_size": 64, "head_weights": lm_head}
            builds[how] = compile_model(open_model(str(checkpoint)), get_target("bm1684x"), int(SEQ), tmp_path / how,
                                        check=False, show_progress=False, jobs=2, target_options=options)
    quantized = {n["net"]: n["top_passes"].get("quantize-weights", {}).get("changed")
                 for n in builds["quantize-weights"].target.nets}
    expected = {n: 7 if n.startswith("block") else 1 if n == "lm_head" and lm_head == "w4" else None for n in quantized}
    assert quantized == expected
    assert not any("quantize-weights" in n["top_passes"] for n in builds["model_deploy"].target.nets)
    bmodels = [tmp_path / how / builds[how].target.bmodel for how in builds]
    assert _without_build_time(bmodels[0]) == _without_build_time(bmodels[1])


def test_a_net_whose_graph_holds_a_value_of_its_own_runs_model_transform(tools, tmp_path):
    """A recipe takes from a net only the initializers model_transform passed on as weights (copied or transposed).
    An initializer it folded (here a scale, into the MLIR text) must be the reference's in every net the recipe
    makes, else that net runs the tool; what the recipe makes is the tool's output, byte for byte. A graph whose
    weight tpuc-opt made of two initializers (the scale merged into the MatMul's) gets no recipe, and says why."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.targets.bm1684x.transform_reuse import NoRecipe, TransformReuse, graph_key

    def net(name: str, seed: int, scale: float, scale_last: bool = False) -> Path:
        rng = np.random.default_rng(seed)
        nodes = [helper.make_node("Mul", ["x", "scale"], ["xs"]), helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                 helper.make_node("MatMul", ["xs", "wt"], ["y"])]
        if scale_last:  # tpuc-opt merges the scale into the MatMul's weight: a weight made of two initializers
            nodes = [nodes[1], helper.make_node("MatMul", ["x", "wt"], ["h"]), helper.make_node("Mul", ["h", "scale"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 32])],
                                  [numpy_helper.from_array(rng.standard_normal((32, 64), np.float32), "w"),
                                   numpy_helper.from_array(np.array([scale], np.float32), "scale")])
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8), str(path))
        return path

    paths = {name: net(name, seed, scale) for name, seed, scale in
             (("n0", 0, 2.0), ("n1", 1, 2.0), ("n2", 2, 2.0), ("n3", 3, 3.0))}
    args = {name: contract.DeploySpec(name, name, ((1, 4, 64),), "BF16", ()).transform_args(str(path), f"{name}.mlir")
            for name, path in paths.items()}
    keys = {graph_key(paths[name], args[name]) for name in ("n0", "n1", "n2", "n3")}
    assert len(keys) == 1  # one graph, whatever the weights and the name
    key = keys.pop()

    def transform(name: str) -> Path:
        work = tmp_path / name
        work.mkdir()
        assert tools.run("model_transform", args[name], work, tmp_path / "log") == 0
        return work

    paths["m0"] = net("m0", 0, 2.0, scale_last=True)
    args["m0"] = contract.DeploySpec("m0", "m0", ((1, 4, 64),), "BF16", ()).transform_args(str(paths["m0"]), "m0.mlir")
    merged = graph_key(paths["m0"], args["m0"])
    reuse = TransformReuse({**{name: key for name in ("n0", "n1", "n2", "n3")},
                            **{name: merged for name in ("m0", "m1", "m2")},
                            **{name: "a graph of two nets" for name in ("t0", "t1")}})
    # The nets a scheduler starts n2 and n3 after (deploy_all's Job.after): the two that learn and check the recipe.
    assert [reuse.teachers(n) for n in ("n0", "n1", "n2", "n3", "t1")] == [(), (), ("n0", "n1"), ("n0", "n1"), ()]
    reuse.ran("a graph of two nets", "n0", paths["n0"], tmp_path)  # a recipe would serve no third net: not learned
    assert reuse.recipe("a graph of two nets") is None and reuse.refusals() == []
    for name in ("n0", "n1"):  # learned, then checked
        reuse.ran(key, name, paths[name], transform(name))
    recipe = reuse.recipe(key)
    assert recipe is not None and reuse.refusals() == [], reuse.refusals()
    assert [(w.source, w.transposed) for w in recipe.weights] == [("w", True)] and set(recipe.fixed) == {"scale"}
    made, real = tmp_path / "made", transform("n2")
    made.mkdir()
    recipe.apply("n2", paths["n2"], made)
    assert (made / "n2.mlir").read_text() == (real / "n2.mlir").read_text()
    with np.load(made / "n2_top_f32_all_weight.npz") as ours, np.load(real / "n2_top_f32_all_weight.npz") as theirs:
        assert ours.files == theirs.files and all(np.array_equal(ours[k], theirs[k]) for k in ours.files)
    with pytest.raises(NoRecipe, match="initializer scale differs from n0's"):
        recipe.apply("n3", paths["n3"], made)
    # No recipe where a weight is made of more than one initializer: each net runs the tool.
    reuse.ran(merged, "m0", paths["m0"], transform("m0"))
    assert reuse.recipe(merged) is None
    assert reuse.refusals() == ["m0: weight h_MatMul__mergeMulConst (float32, 2048 elements) is no initializer, "
                                "copied or transposed"]
