"""The example pass keeps the goldens: tiny-llama (rope on q, GQA) and tiny-bart (an encoder, and
decoder blocks with cross-attention) compiled with it through `golden_check`, the fixture a user's
own suite gets from graphopt, against the goldens transformers recorded in tests/golden."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EXAMPLE = Path(__file__).with_name("fold_attention_scale.py")


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bart"])
def test_fold_attention_scale_keeps_the_golden(golden_check, model):
    report = golden_check(model, ROOT / "tests" / "golden", pass_files=[EXAMPLE])
    assert [s.stage for s in report.stages] == ["reference", "fx", "onnx"]
