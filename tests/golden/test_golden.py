"""Golden outputs, stage by stage: transformers → rewritten FX → ONNX in onnxruntime.

One golden per architecture (tests/golden/record.py: Llama-3.1, Qwen2.5, Qwen3, Mistral),
all through the same passes. Each stage is driven like the chip runtime (pad to SEQ, prefill,
concat-cache decode) and must give transformers' greedy tokens exactly and its logits within
1e-4, through the registry name and through a `save_pretrained` directory.
"""

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from graphopt.compiler import compile_model, hf_greedy
from graphopt.models import open_model
from graphopt.runtime import ChipStyleRuntime, FxBackend, OrtBackend, Shapes
from graphopt.targets.onnx_target import ONNX_TARGET
from tests.conftest import GOLDEN_SEQ
from tests.golden.record import CASES, load_golden

LOGIT_ATOL = 1e-4
MODELS = list(CASES)


def assert_matches_golden(tokens, logits, name="tiny-llama"):
    golden, golden_logits = load_golden(name)
    assert tokens == golden["tokens"]
    assert len(logits) == len(golden_logits)
    err = float(np.max(np.abs(np.stack(logits) - golden_logits)))
    assert err <= LOGIT_ATOL, f"{name}: max logit error {err:.2e} > {LOGIT_ATOL}"


@pytest.fixture(scope="module")
def golden_build(request, tiny_llama_build, tmp_path_factory):
    """Each model compiled once per module, rewritten FX graphs kept (tiny-llama: the session's build)."""
    builds = {"tiny-llama": tiny_llama_build}

    def build(name):
        if name not in builds:
            out = tmp_path_factory.mktemp("golden") / name
            builds[name] = compile_model(open_model(name), ONNX_TARGET, GOLDEN_SEQ, out, keep_fx=True,
                                         show_progress=False)
        return builds[name]

    return build


@pytest.mark.parametrize("name", MODELS)
def test_golden_is_discriminative(name):
    golden, logits = load_golden(name)
    assert len(golden["tokens"]) == 32
    assert len(set(golden["tokens"])) >= 16, "a near-constant golden would let a broken rewrite pass"
    assert 0.3 < float(np.abs(logits).max()) < 100  # logits of order 1, where 1e-4 is meaningful


@pytest.mark.parametrize("name", MODELS)
def test_transformers_today_still_gives_the_golden(name):
    golden, _ = load_golden(name)
    ref = hf_greedy(open_model(name).reference_model(), golden["prompt"], golden["new_tokens"])
    assert_matches_golden(ref["tokens"], ref["logits"], name)


@pytest.mark.parametrize("stage", ["fx", "onnx"])
@pytest.mark.parametrize("name", MODELS)
def test_stage_matches_golden(golden_build, name, stage):
    golden, _ = load_golden(name)
    build = golden_build(name)
    backend = FxBackend(build.fx_networks) if stage == "fx" else OrtBackend(build.out_dir, build.manifest)
    runtime = ChipStyleRuntime(backend, Shapes.from_manifest(build.manifest))
    result = runtime.generate(golden["prompt"], golden["new_tokens"])
    assert_matches_golden(result.tokens, result.logits, name)


@pytest.mark.parametrize("name", MODELS)
def test_run_checks_and_end_to_end_pass(golden_build, name):
    build = golden_build(name)
    assert build.ok
    assert build.end_to_end["tokens_identical"]
    # Every block was rewritten by the passes the contract needs, not passed through.
    applied = {p["pass"] for net in build.manifest["networks"] if net["kind"] == "block_cache" for p in net["passes"]}
    assert {"rope-table", "kv-layout", "concat-cache", "fixed-mask", "attention-lower"} <= applied


@pytest.mark.parametrize("name", MODELS)
def test_save_pretrained_directory_gives_the_same_golden(tmp_path, name):
    """The loading path for real checkpoints: sharded safetensors + index, read lazily per network.
    Tied models (the Qwen minis) store the embedding once and no lm_head.weight."""
    checkpoint = tmp_path / f"{name}-hf"
    open_model(name).reference_model().save_pretrained(checkpoint, max_shard_size="300KB")
    assert (checkpoint / "model.safetensors.index.json").exists()

    golden, _ = load_golden(name)
    # transformers loading the directory on its own is the reference for this path.
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa").float().eval()
    ref = hf_greedy(reference, golden["prompt"], golden["new_tokens"])
    assert_matches_golden(ref["tokens"], ref["logits"], name)

    build = compile_model(open_model(str(checkpoint)), ONNX_TARGET, GOLDEN_SEQ, tmp_path / "out", show_progress=False)
    assert build.ok
    runtime = ChipStyleRuntime(OrtBackend(build.out_dir, build.manifest), Shapes.from_manifest(build.manifest))
    result = runtime.generate(golden["prompt"], golden["new_tokens"])
    assert_matches_golden(result.tokens, result.logits, name)
