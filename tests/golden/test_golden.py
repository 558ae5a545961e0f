"""Golden outputs, stage by stage: transformers → rewritten FX → ONNX in onnxruntime.

Each stage is driven like the chip runtime (pad to SEQ, prefill, concat-cache decode) and
must give transformers' greedy tokens exactly and its logits within 1e-4.
"""

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from graphopt.compiler import compile_model, hf_greedy
from graphopt.models import open_model
from graphopt.runtime import ChipStyleRuntime, FxBackend, OrtBackend, Shapes
from graphopt.targets.onnx_target import ONNX_TARGET
from tests.conftest import GOLDEN_SEQ
from tests.golden.record import load_golden

LOGIT_ATOL = 1e-4


def assert_matches_golden(tokens, logits, name="tiny-llama"):
    golden, golden_logits = load_golden(name)
    assert tokens == golden["tokens"]
    assert len(logits) == len(golden_logits)
    err = float(np.max(np.abs(np.stack(logits) - golden_logits)))
    assert err <= LOGIT_ATOL, f"max logit error {err:.2e} > {LOGIT_ATOL}"


def test_golden_is_discriminative():
    golden, logits = load_golden("tiny-llama")
    assert len(golden["tokens"]) == 32
    assert len(set(golden["tokens"])) >= 16, "a near-constant golden would let a broken rewrite pass"
    assert 0.3 < float(np.abs(logits).max()) < 100  # logits of order 1, where 1e-4 is meaningful


def test_transformers_today_still_gives_the_golden():
    golden, _ = load_golden("tiny-llama")
    ref = hf_greedy(open_model("tiny-llama").reference_model(), golden["prompt"], golden["new_tokens"])
    assert_matches_golden(ref["tokens"], ref["logits"])


@pytest.mark.parametrize("stage", ["fx", "onnx"])
def test_stage_matches_golden(tiny_llama_build, stage):
    golden, _ = load_golden("tiny-llama")
    build = tiny_llama_build
    backend = FxBackend(build.fx_networks) if stage == "fx" else OrtBackend(build.out_dir, build.manifest)
    runtime = ChipStyleRuntime(backend, Shapes.from_manifest(build.manifest))
    result = runtime.generate(golden["prompt"], golden["new_tokens"])
    assert_matches_golden(result.tokens, result.logits)


def test_run_checks_and_end_to_end_pass(tiny_llama_build):
    assert tiny_llama_build.ok
    assert tiny_llama_build.end_to_end["tokens_identical"]


def test_save_pretrained_directory_gives_the_same_golden(tmp_path):
    """The loading path for real checkpoints: sharded safetensors + index, read lazily per network."""
    checkpoint = tmp_path / "tiny-llama-hf"
    open_model("tiny-llama").reference_model().save_pretrained(checkpoint, max_shard_size="300KB")
    assert (checkpoint / "model.safetensors.index.json").exists()

    golden, _ = load_golden("tiny-llama")
    # transformers loading the directory on its own is the reference for this path.
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa").float().eval()
    ref = hf_greedy(reference, golden["prompt"], golden["new_tokens"])
    assert_matches_golden(ref["tokens"], ref["logits"])

    build = compile_model(open_model(str(checkpoint)), ONNX_TARGET, GOLDEN_SEQ, tmp_path / "out", show_progress=False)
    assert build.ok
    runtime = ChipStyleRuntime(OrtBackend(build.out_dir, build.manifest), Shapes.from_manifest(build.manifest))
    result = runtime.generate(golden["prompt"], golden["new_tokens"])
    assert_matches_golden(result.tokens, result.logits)
