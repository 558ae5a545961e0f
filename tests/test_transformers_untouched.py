"""graphopt never patches transformers (or torch): every function they hold is the same object after a run."""

import importlib

import torch.nn.functional as F

from graphopt.compiler import compile_model
from graphopt.models import open_model
from graphopt.targets.onnx_target import ONNX_TARGET

MODULES = ("transformers.models.llama.modeling_llama", "transformers.modeling_utils",
           "transformers.integrations.sdpa_attention", "transformers.masking_utils", "transformers.cache_utils")


def _snapshot():
    seen = {}
    for name in MODULES:
        module = importlib.import_module(name)
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
    before = _snapshot()
    compile_model(source, ONNX_TARGET, 16, tmp_path / "out", show_progress=False)
    after = _snapshot()
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"changed by graphopt: {changed[:10]}"
    assert len(before) > 200
