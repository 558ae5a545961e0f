"""The real configs in the registry, at full size: Qwen2.5-7B-Instruct, Qwen3-8B, Mistral-7B-Instruct-v0.3.

No checkpoint can be downloaded here, so: the configs give the published parameter counts, one
full-size layer of each goes through the same passes as the minis with every stage checked, and
`--model-path` reads a real-size (bf16, like the published checkpoints) tensor file for its
registry config.
"""

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from graphopt.errors import GraphoptError
from graphopt.models import open_model
from graphopt.export import export_networks

# What transformers builds from each config, against the model cards' figures (7.61B, 8.2B, 7.25B).
PARAMETERS = {"qwen2.5-7b": 7_615_616_512, "qwen3-8b": 8_190_735_360, "mistral-7b": 7_248_023_552}
CONTRACT_PASSES = {"rope-table", "kv-layout", "concat-cache", "fixed-mask", "attention-lower"}


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_config_has_the_published_size_and_needs_a_checkpoint(name):
    assert sum(p.numel() for p in open_model(name, random_weights=True).skeleton.parameters()) == PARAMETERS[name]
    with pytest.raises(GraphoptError, match="--model-path"):
        open_model(name)


@pytest.mark.parametrize("name", ["qwen3-8b", "mistral-7b"])
def test_a_full_size_layer_goes_through_the_passes(name, tmp_path):
    results = export_networks(open_model(name, random_weights=True), ["block_0", "block_cache_0"], 64, tmp_path)
    for result in results.values():
        assert result.checks and all(c.ok for c in result.checks), [c.to_json() for c in result.checks]
    assert CONTRACT_PASSES <= {p.pass_name for p in results["block_cache_0"].passes}
    heads, kv_heads, head_dim = 32, 8, 128
    cache = {s.name: s.shape for s in results["block_cache_0"].inputs}
    assert cache["history_k"] == (1, 64, kv_heads, head_dim) and heads * head_dim == 4096


def test_model_path_reads_a_real_size_bf16_checkpoint_for_the_registry_config(tmp_path):
    """Qwen2.5-7B's layer 0 as a bf16 safetensors file (what the published shards hold), no config.json:
    the registry's config shapes the model and every tensor comes from the file."""
    skeleton = open_model("qwen2.5-7b", random_weights=True).skeleton
    g = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
               for name, p in skeleton.named_parameters() if name.startswith("model.layers.0.")}
    checkpoint = tmp_path / "qwen2.5-7b-layer0"
    checkpoint.mkdir()
    save_file(tensors, checkpoint / "model.safetensors")

    results = export_networks(open_model("qwen2.5-7b", model_path=str(checkpoint)), ["block_0"], 64, tmp_path / "out")
    assert all(c.ok for c in results["block_0"].checks)
    model = onnx.load(results["block_0"].files[0])  # external data loads beside it
    k_bias = tensors["model.layers.0.self_attn.k_proj.bias"].float().numpy()
    assert any(np.array_equal(onnx.numpy_helper.to_array(t), k_bias) for t in model.graph.initializer)
