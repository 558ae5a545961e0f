"""The emitted networks carry their runtime contract's names, shapes and ONNX versions: today's LLM-TPU
contract (the default) and the legacy Llama3_1 demo's."""

import onnx
import pytest

from graphopt.compiler import compile_model
from graphopt.models import open_model
from graphopt.targets.onnx_target import ONNX_TARGET

SEQ, H, KV, D, V = 64, 128, 2, 32, 1024

LLAMA3_1 = {
    "embedding": ([("input_ids", ["seq"])], [("input_embed", [1, "seq", H])]),
    "block_0": ([("input_states", [1, SEQ, H]), ("position_ids", [1, SEQ]), ("attention_mask", [1, 1, SEQ, SEQ])],
                [("hidden_states", [1, SEQ, H]), ("past_k", [1, SEQ, KV, D]), ("past_v", [1, SEQ, KV, D])]),
    "block_cache_1": ([("input_states", [1, 1, H]), ("position_ids", [1, 1]), ("attention_mask", [1, 1, 1, SEQ + 1]),
                       ("history_k", [1, SEQ, KV, D]), ("history_v", [1, SEQ, KV, D])],
                      [("hidden_states", [1, 1, H]), ("past_k", [1, 1, KV, D]), ("past_v", [1, 1, KV, D])]),
    "lm_head": ([("hidden_states", [1, H])], [("m_logits", [1, V])]),
    "greedy_head": ([("m_logits", [1, V])], [("token", [1, 1])]),
    "penalty_sample_head": ([("m_logits", [1, V]), ("input_ids", [1, SEQ]), ("top_p", [1]), ("temperature", [1]),
                             ("penalty", [1])], [("probs", [1, 50]), ("token", [1, 50])]),
}


# Today's: the same embedding and blocks, lm_head answering the token (TopK 1), no heads after it.
LLM_TPU = {**{k: v for k, v in LLAMA3_1.items() if k not in ("lm_head", "greedy_head", "penalty_sample_head")},
           "lm_head": ([("hidden_states", [1, H])], [("token", [1, 1])])}


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def legacy_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("legacy") / "tiny-llama"
    return compile_model(open_model("tiny-llama"), ONNX_TARGET, SEQ, out, show_progress=False, contract="llama3_1")


@pytest.mark.parametrize("contract", ["llm-tpu", "llama3_1"])
def test_networks_follow_the_contract(contract, tiny_llama_build, legacy_build):
    build, expected = (tiny_llama_build, LLM_TPU) if contract == "llm-tpu" else (legacy_build, LLAMA3_1)
    assert build.manifest["contract"] == contract and build.ok
    names = [n["name"] for n in build.manifest["networks"]]
    assert names == list(expected)[:1] + ["block_0", "block_cache_0", "block_1", "block_cache_1"] + list(expected)[3:]
    for name, (inputs, outputs) in expected.items():
        model = onnx.load(str(build.out_dir / f"{name}.onnx"))
        assert model.ir_version <= 8 and model.opset_import[0].version <= 17
        got_inputs = [(i.name, _dims(i)) for i in model.graph.input]
        if name == "embedding":
            got_inputs = [(n, d[1:]) for n, d in got_inputs]  # [1, seq]: seq is dynamic (embedding_cache uses 1)
        assert got_inputs == inputs, name
        assert [(o.name, _dims(o)) for o in model.graph.output] == outputs, name


def test_blocks_have_no_rope_or_mask_building_ops(tiny_llama_build):
    banned = {"Cos", "Sin", "Range", "CumSum", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "Where",
              "Trilu"}
    for name in ("block_0", "block_cache_0"):
        ops = {n.op_type for n in onnx.load(str(tiny_llama_build.out_dir / f"{name}.onnx")).graph.node}
        assert not ops & banned, (name, ops & banned)
        assert "Softmax" in ops and "Gather" in ops  # attention, and the rope tables gathered by position
