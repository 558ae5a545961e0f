"""Architectures beyond the four goldens, through the same passes, against transformers end to end.

Granite and Cohere scale the embeddings or logits in their model's forward rather than in a
module (graphopt.models.decoder: EMBEDDING_SCALES, LOGIT_SCALES); the scales are set far from
1 so that dropping one would fail the logits check. bench/architectures.py surveys more.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from graphopt.compiler import compile_model
from graphopt.errors import GraphoptError
from graphopt.models import open_model
from graphopt.models.configs import _TINY_COMMON
from graphopt.targets.onnx_target import ONNX_TARGET

CASES = {
    "granite": {"embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22,
                "attention_multiplier": 0.0078125},
    "cohere": {"logit_scale": 0.25, "use_qk_norm": False},
    "phi3": {},  # fused qkv and gate_up projections
    # The parts found by structure: final norms named final_layernorm (Phi) and final_layer_norm (GPT-NeoX),
    # partial rotary, parallel attention and MLP, a head the checkpoint stores as embed_out (renamed on load).
    "phi": {},
    "gpt_neox": {},
    "gemma": {},  # the embedding's scale: a buffer checkpoints do not store, computed by its constructor
    # a rotary table per attention type (sliding, full); the logits soft-capped, low enough to matter
    "gemma3_text": {"final_logit_softcapping": 2.0},
    "mixtral": {},  # a mixture of experts: the checkpoint's per-expert weights stacked as the model keeps them
}


@pytest.mark.parametrize("model_type", list(CASES))
def test_compiles_and_matches_transformers(model_type, tmp_path):
    config = AutoConfig.for_model(model_type, **_TINY_COMMON, pad_token_id=0, **CASES[model_type])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
    build = compile_model(open_model(str(tmp_path / model_type)), ONNX_TARGET, 32, tmp_path / "out", show_progress=False)
    assert build.ok, build.end_to_end
    assert build.end_to_end["tokens_identical"] and build.end_to_end["max_abs_logit_err"] < 1e-3


def test_soft_capped_attention_is_refused_with_why(tmp_path):
    """Gemma 2 soft-caps its attention scores (tanh) and transformers has no SDPA for it: its eager attention,
    written out, is read by attention-explicit, which names the soft cap as what attention's one call cannot
    express."""
    config = AutoConfig.for_model("gemma2", **_TINY_COMMON, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")
    with pytest.raises(GraphoptError, match="soft-capped"):
        compile_model(open_model(str(tmp_path / "gemma2")), ONNX_TARGET, 32, tmp_path / "out", show_progress=False)


def test_a_mixture_of_experts_is_refused_by_the_bm1684x_target_before_any_work(tmp_path):
    from graphopt.targets.bm1684x.contract import check_experts

    config = AutoConfig.for_model("mixtral", **_TINY_COMMON, pad_token_id=0, num_local_experts=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mixtral")
    with pytest.raises(GraphoptError, match=r"mixture of experts \(4 experts a layer\).*--target onnx"):
        check_experts(open_model(str(tmp_path / "mixtral")))
    check_experts(open_model("tiny-llama"))  # a dense model passes
