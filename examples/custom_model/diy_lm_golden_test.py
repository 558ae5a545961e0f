"""The hand-written DIY model (attention written out, a mask built from positions, interleaved rotary,
fused qkv, tied head) compiled with an adapter only, held to its golden at every stage."""

import json
from pathlib import Path

from graphopt.models import open_model

HERE = Path(__file__).parent
MODEL = str(HERE / "diy_lm.py")
GOLDENS = HERE / "golden"


def test_the_golden_is_discriminative():
    golden = json.loads((GOLDENS / "diy_lm.json").read_text())
    assert len(golden["tokens"]) == 32 and len(set(golden["tokens"])) >= 16


def test_diy_lm_matches_its_golden_at_every_stage(golden_check):
    report = golden_check(MODEL, GOLDENS)
    assert [s.stage for s in report.stages] == ["reference", "fx", "onnx"]


def test_its_passes_read_the_written_out_attention_and_the_positions_mask(tmp_path):
    from graphopt.compiler import compile_model
    from graphopt.targets import get_target

    build = compile_model(open_model(MODEL), get_target("onnx"), 64, tmp_path / "out", show_progress=False)
    assert build.ok and build.end_to_end["tokens_identical"]
    for net in build.manifest["networks"]:
        changed = {p["pass"] for p in net["passes"] if p["changed"]}
        if net["kind"] in ("block", "block_cache"):
            # one attention made of its ops, its head repeat dropped, its rotary made tables, its mask the input's
            assert {"attention-explicit", "attention-canonical", "rope-table", "fixed-mask"} <= changed, net["passes"]
