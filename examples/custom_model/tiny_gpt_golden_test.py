"""The example custom model (no transformers: its own config, attention, RMSNorm, tied head) through
the same passes, held to its golden at every stage, from seeded weights and from a saved checkpoint."""

import json
from pathlib import Path

from safetensors.torch import save_model

from graphopt.models import open_model

HERE = Path(__file__).parent
MODEL = str(HERE / "tiny_gpt.py")
GOLDENS = HERE / "golden"


def test_the_golden_is_discriminative():
    golden = json.loads((GOLDENS / "tiny_gpt.json").read_text())
    assert len(golden["tokens"]) == 32 and len(set(golden["tokens"])) >= 16


def test_tiny_gpt_matches_its_golden_at_every_stage(golden_check):
    report = golden_check(MODEL, GOLDENS)
    assert [s.stage for s in report.stages] == ["reference", "fx", "onnx"]


def test_a_saved_checkpoint_gives_the_same_golden(golden_check, tmp_path):
    """--model-path: the module's own state_dict names in safetensors (the tied head stored once)."""
    checkpoint = tmp_path / "tiny-gpt"
    checkpoint.mkdir()
    save_model(open_model(MODEL).reference_model(), str(checkpoint / "model.safetensors"))
    golden_check(MODEL, GOLDENS, model_path=str(checkpoint))


def test_every_block_was_rewritten_by_the_contract_passes(tmp_path):
    from graphopt.compiler import compile_model
    from graphopt.targets import get_target

    build = compile_model(open_model(MODEL), get_target("onnx"), 64, tmp_path / "out", show_progress=False)
    assert build.ok and build.end_to_end["tokens_identical"]
    for net in build.manifest["networks"]:
        applied = {p["pass"] for p in net["passes"]}
        if net["kind"] == "block_cache":
            assert {"rope-table", "fixed-mask", "kv-layout", "concat-cache", "attention-lower"} <= applied
