"""--do-sample (graphopt.contract.llm_tpu_with): lm_head answers the logits, greedy_head and sample_head read
them, and the runtime draws as LLM-TPU's Qwen3 demos' penalty_sample does.

The head tests hold SampleHead to transformers' own logits processors; the program tests record what the
runtime writes (no toolchain); the compile tests run the ONNX target, whose end-to-end check holds every
draw of a sampled generation to transformers' distribution on the model's own logits.
"""

import json
import re
from dataclasses import replace

import pytest
import torch

from graphopt import contract as c
from graphopt.checks import CHECK_SAMPLING, MAX_PROB_ERR, draw_error, sampling_check
from graphopt.compiler import compile_model
from graphopt.device_program import Copy, Launch, Read, Write
from graphopt.errors import GraphoptError
from graphopt.models import open_model
from graphopt.networks.decoder import SampleHead
from graphopt.runtime import Draw, LlmTpuRuntime, OrtBackend, Sampling, Shapes, runtime_for
from graphopt.targets.onnx_target import ONNX_TARGET
from tests.recorder import Recorder

SEQ = 64
SAMPLING = c.llm_tpu_with((c.DO_SAMPLE,))


def test_do_sample_adds_the_heads_the_demos_look_up_and_lm_head_answers_logits():
    assert SAMPLING.spec(c.LM_HEAD).outputs == (c.M_LOGITS,) and not SAMPLING.head_outputs_token
    # The demos write the inputs by position: penalty_sample's in2..in5, greedy_search's in0.
    assert SAMPLING.spec(c.SAMPLE_HEAD).inputs == (c.M_LOGITS, c.INPUT_IDS, c.PENALTY, c.TEMPERATURE, c.TOP_K, c.TOP_P)
    assert SAMPLING.spec(c.SAMPLE_HEAD).outputs == (c.PROBS, c.TOKEN)
    assert SAMPLING.spec(c.SAMPLE_HEAD).dynamic and not SAMPLING.spec(c.BLOCK).dynamic  # sampling alone: static blocks
    assert c.contract_of_nets(["embedding", "block_0", "lm_head", "greedy_head", "sample_head"]).options == {c.DO_SAMPLE}
    both = c.contract_of_nets(["embedding", "block_0", "block_kv_0", "lm_head", "greedy_head", "sample_head"])
    assert both.options == {c.DO_SAMPLE, c.HISTORY_KV, c.DYNAMIC}


def _bf16_logits(seed: int, vocab: int = 300) -> torch.Tensor:
    """Logits as a bf16 head answers them: many exact ties, at the top_k-th too."""
    return (torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed)) * 3).to(torch.bfloat16).float()


@pytest.mark.parametrize("penalty, temperature, top_k, top_p", [
    (1.0, 1.0, 50, 1.0), (1.3, 0.7, 10, 0.9), (1.3, 0.7, 1, 0.9), (0.8, 1.5, 40, 0.5), (2.0, 0.3, 7, 0.99)])
def test_the_sample_head_is_transformers_sampling_distribution(penalty, temperature, top_k, top_p):
    """Its candidates and probabilities against transformers' RepetitionPenalty, Temperature, TopK and TopP
    processors on the same logits and ids, every token of the vocabulary (ties included, as draw_error says)."""
    head = SampleHead()
    sampling = Sampling(penalty, temperature, top_k, top_p)
    for seed in range(20):
        logits = _bf16_logits(seed)
        ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(seed))
        probs, tokens = head(logits, ids, torch.tensor([penalty]), torch.tensor([temperature]), torch.tensor([top_k]),
                             torch.tensor([top_p]))
        draw = Draw(tokens[0, :top_k].numpy(), probs[0, :top_k].numpy(), ids[0].numpy())
        assert draw_error(logits[0].numpy(), draw, sampling) <= MAX_PROB_ERR
        assert float(probs[0, top_k:].sum()) == 0.0  # past top_k, what the demo does not read, holds nothing


def test_draw_error_finds_a_distribution_that_is_not_transformers():
    head, sampling = SampleHead(), Sampling(1.3, 0.7, 10, 0.9)
    logits, ids = _bf16_logits(0), torch.tensor([[1, 2, 3]])
    probs, tokens = head(logits, ids, torch.tensor([1.3]), torch.tensor([1.0]), torch.tensor([10]), torch.tensor([0.9]))
    assert draw_error(logits[0].numpy(), Draw(tokens[0, :10].numpy(), probs[0, :10].numpy(), ids[0].numpy()),
                      sampling) > 0.01  # the head was given temperature 1.0, not 0.7


def _runtime(sampling) -> tuple[LlmTpuRuntime, Recorder]:
    recorder = Recorder()
    shapes = Shapes(seq_length=SEQ, num_layers=1, hidden=128, kv_heads=2, head_dim=32)
    return LlmTpuRuntime(recorder, shapes, contract=SAMPLING, sampling=sampling), recorder


def test_the_runtime_samples_as_the_demos_penalty_sample_does():
    runtime, recorder = _runtime(Sampling(1.3, 0.7, 3, 0.9, window=4, seed=0))
    # At init, once (the cpp_demo): penalty, temperature, top_k, top_p into sample_head's inputs 2..5, as C types.
    (init,) = recorder.programs
    assert [(w.dst.net, w.dst.index, w.value.dtype.name, w.value.tolist()) for w in init.steps] == [
        ("sample_head", 2, "float32", [pytest.approx(1.3)]), ("sample_head", 3, "float32", [pytest.approx(0.7)]),
        ("sample_head", 4, "int32", [3]), ("sample_head", 5, "float32", [pytest.approx(0.9)])]
    token, _ = runtime.prefill([5, 6, 7, 8, 9, 10])
    head = recorder.programs[-1].steps[-6:]
    # The turn's last `window` ids written (their count the launch's length), the logits copied in, top_k read back.
    assert isinstance(head[0], Write) and head[0].partial and head[0].value.tolist() == [7, 8, 9, 10]
    assert isinstance(head[1], Copy) and head[1].src.net == "lm_head" and head[1].dst.net == "sample_head"
    assert isinstance(head[2], Launch) and head[2].dims == ((1, 1, 4),)
    assert [(r.name, r.rows) for r in head[3:] if isinstance(r, Read)] == [("candidate_probs", 3), ("candidates", 3),
                                                                           ("penalised", 4)]
    assert token in (11, 12) and runtime.draw.candidates.tolist() == [11, 12, 13]
    runtime.decode(token)  # the drawn token joins the turn the penalty looks at
    assert recorder.programs[-1].steps[-6].value.tolist() == [8, 9, 10, token]


def test_greedy_on_sampling_networks_goes_through_greedy_head():
    runtime, recorder = _runtime(None)
    assert recorder.programs == []  # nothing written at init without sampling
    runtime.prefill([1, 2, 3])
    steps = recorder.programs[-1].steps
    assert [s.net for s in steps if isinstance(s, Launch)][-2:] == ["lm_head", "greedy_head"]
    copy = next(s for s in steps if isinstance(s, Copy) and getattr(s.dst, "net", None) == "greedy_head")
    assert copy.src.net == "lm_head"  # greedy_search's d2d, not a read in place


@pytest.mark.parametrize("values, message", [
    ({"top_k": 80}, "top_k 80 is not between 1 and 50"), ({"top_k": 0}, "top_k 0 is not between 1 and 50"),
    ({"temperature": 0.0}, "temperature 0.0 is not above 0"), ({"top_p": 1.5}, "top_p 1.5 is not in (0, 1]")])
def test_sampling_parameters_the_head_cannot_take_are_refused(tmp_path, values, message):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(GraphoptError, match=re.escape(message)):
        Sampling.from_generation_config(path)


@pytest.fixture(scope="module")
def sampling_build(tmp_path_factory):
    return compile_model(open_model("tiny-llama"), ONNX_TARGET, SEQ, tmp_path_factory.mktemp("ds") / "out",
                         show_progress=False, contract_options=(c.DO_SAMPLE,))


def test_sampling_networks_draw_from_transformers_distribution(sampling_build):
    manifest = sampling_build.manifest
    assert manifest["contract_options"] == ["do-sample"]
    nets = {n["name"]: n for n in manifest["networks"]}
    assert list(nets)[-3:] == ["lm_head", "greedy_head", "sample_head"]
    assert nets["sample_head"]["dynamic_axes"] == {"input_ids": {1: "length"}}  # onnxruntime runs the launch's ids
    end_to_end = sampling_build.end_to_end
    assert end_to_end["tokens_identical"]  # greedy, through greedy_head
    sampled = end_to_end["sampled"]
    assert sampled["ok"] and len(sampled["tokens"]) == 8 and sampled["max_prob_err"] <= MAX_PROB_ERR, sampled
    assert sampling_build.ok


def test_the_sampling_check_fails_when_the_head_samples_otherwise(sampling_build):
    """No check that cannot fail: a runtime that writes another temperature than it samples with."""

    class Colder(LlmTpuRuntime):
        def _init_heads(self, sampling):
            super()._init_heads(sampling and replace(CHECK_SAMPLING, temperature=0.5))
            self.sampling = sampling

    backend = OrtBackend(sampling_build.out_dir, sampling_build.manifest)
    right, other = (runtime_for(backend, sampling_build.manifest, sampling=CHECK_SAMPLING) for _ in range(2))
    wrong = Colder(other.device, other.shapes, contract=other.contract, sampling=CHECK_SAMPLING)
    source, prompt = open_model("tiny-llama"), [1, 17, 300, 42, 5, 900, 64, 7]
    assert sampling_check(right, source.greedy, prompt, 4)["ok"]
    assert not sampling_check(wrong, source.greedy, prompt, 4)["ok"]


def test_generate_samples_with_the_generation_config_beside_the_networks(sampling_build, capsys):
    from graphopt.cli import main

    folder = sampling_build.out_dir
    config = folder / "config" / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "temperature": 0.7, "top_k": 20}))

    def generate(*extra):
        assert main(["generate", str(folder), "--input-ids", "1,2,3", "--max-new-tokens", "6", "--ignore-eos", "--json",
                     *extra]) == 0
        return json.loads(capsys.readouterr().out)["tokens"]

    greedy = generate()
    assert greedy == runtime_for(OrtBackend(folder, sampling_build.manifest), sampling_build.manifest).generate(
        [1, 2, 3], 6).tokens
    first = generate("--do-sample", "--seed", "1")
    assert first == generate("--do-sample", "--seed", "1")  # graphopt's draws repeat
    assert first != generate("--do-sample", "--seed", "2") != greedy
    config.write_text(json.dumps({"top_k": 80}))
    assert main(["generate", str(folder), "--input-ids", "1,2,3", "--do-sample"]) == 2
    assert "top_k 80 is not between 1 and 50" in capsys.readouterr().err


def test_sampling_is_refused_where_the_networks_cannot_sample(tmp_path, capsys):
    from graphopt.cli import main

    out = tmp_path / "greedy"
    assert main(["run", "tiny-llama", "--seq-length", "32", "--out", str(out), "--no-check"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--input-ids", "1,2,3", "--do-sample"]) == 2
    assert "were compiled without --do-sample" in capsys.readouterr().err
    assert main(["run", "tiny-llama", "--contract", "llama3_1", "--do-sample", "--out", str(tmp_path / "x")]) == 2
    assert "--do-sample is an option of --contract llm-tpu" in capsys.readouterr().err


def test_a_generation_config_the_sample_head_cannot_use_is_named_in_the_report(tmp_path):
    """A checkpoint whose generation config asks for top_k 100 (more than sample_head's 50 candidates)."""
    from transformers import GenerationConfig

    checkpoint = tmp_path / "tiny-llama-checkpoint"
    model = open_model("tiny-llama").reference_model()
    model.save_pretrained(checkpoint)
    GenerationConfig(do_sample=True, top_k=100, temperature=0.6).save_pretrained(checkpoint)
    build = compile_model(open_model(str(checkpoint)), ONNX_TARGET, 32, tmp_path / "out", show_progress=False,
                          check=False, contract_options=(c.DO_SAMPLE,))
    (note,) = [m for m in build.config_folder.missing if m.startswith("sampling parameters")]
    assert "top_k 100 is not between 1 and 50" in note
