"""graphopt never patches transformers (or torch): every function they hold is the same object after a run."""

import sys

import torch.nn.functional as F

from graphopt.compiler import compile_model
from graphopt.models import open_model
from graphopt.targets.onnx_target import ONNX_TARGET



def _snapshot(names):
    seen = {}
    for name in names:
        module = sys.modules[name]
        for attr, value in vars(module).items():
            seen[f"{name}.{attr}"] = id(value)
            if isinstance(value, type) and value.__module__ == name:
                for member, inner in vars(value).items():
                    seen[f"{name}.{attr}.{member}"] = id(inner)
    seen["F.scaled_dot_product_attention"] = id(F.scaled_dot_product_attention)
    return seen


def test_a_full_run_leaves_transformers_unchanged(tmp_path):
    source = open_model("tiny-llama")
    _ = source.skeleton  # import everything a run imports before taking the snapshot
    # Every transformers module loaded by now (modeling, attention, masks, caches: whatever this
    # release has), so the test holds on each transformers line CI runs.
    names = sorted(n for n, m in sys.modules.items() if n.startswith("transformers") and m is not None)
    before = _snapshot(names)
    compile_model(source, ONNX_TARGET, 16, tmp_path / "out", show_progress=False)
    after = _snapshot(names)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"changed by graphopt: {changed[:10]}"
    assert "transformers.models.llama.modeling_llama.LlamaAttention.forward" in before and len(before) > 1000
