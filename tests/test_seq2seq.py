"""Encoder-decoder models (Marian, BART) through the same trace -> passes -> ONNX path (issue 6, first part).

The networks are graphopt.seq2seq_networks'; the runtime (graphopt.runtime.Seq2SeqRuntime) drives
them as a chip would: encoder and cross_kv once per source, then decoder_block_i for the start
token and decoder_block_cache_i per new token. It must give transformers' greedy tokens and
logits for a source padded to SEQ (transformers sees it unpadded). The stored goldens for both
models are in tests/golden/.
"""

import json

import numpy as np
import pytest

from graphopt.cli import main
from graphopt.compiler import compile_model
from graphopt.models.reference import hf_greedy
from graphopt.models import open_model
from graphopt.runtime import FxBackend, OrtBackend, Seq2SeqRuntime, runtime_for
from graphopt.targets.onnx_target import ONNX_TARGET

SEQ = 32
SOURCE = [5, 17, 300, 42, 9, 900, 64, 7, 3]  # padded to SEQ by the runtime
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["tiny-marian", "tiny-bart"])
def build(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("seq2seq") / request.param
    return request.param, compile_model(open_model(request.param), ONNX_TARGET, SEQ, out, keep_fx=True,
                                        show_progress=False)


def test_networks_and_their_contract(build):
    name, result = build
    assert result.ok and result.end_to_end["tokens_identical"], result.end_to_end
    nets = {n["name"]: n for n in result.manifest["networks"]}
    assert list(nets) == ["encoder", "cross_kv", "embedding", "decoder_block_0", "decoder_block_cache_0",
                          "decoder_block_1", "decoder_block_cache_1", "lm_head", "greedy_head"]
    shapes = {(net, io["name"]): tuple(io["shape"]) for net, n in nets.items() for io in n["inputs"] + n["outputs"]}
    assert all(0 not in shape for shape in shapes.values()), "no empty tensor anywhere (the usual past-with-encoder bug)"
    assert shapes[("cross_kv", "cross_k_1")] == shapes[("decoder_block_cache_1", "cross_k")] == (1, SEQ, 4, 32)
    # What a decode step outputs is what the next one takes: past_k rows go into history_k.
    assert shapes[("decoder_block_0", "past_k")] == shapes[("decoder_block_cache_0", "history_k")] == (1, SEQ, 4, 32)
    assert shapes[("decoder_block_cache_0", "past_k")] == (1, 1, 4, 32)
    applied = {p["pass"] for p in nets["decoder_block_cache_0"]["passes"]}
    assert {"cross-kv-inputs", "fixed-mask", "kv-layout", "concat-cache", "attention-lower"} <= applied
    assert "rope-table" not in applied


@pytest.mark.parametrize("stage", ["fx", "onnx"])
def test_translation_matches_transformers_generate(build, stage):
    name, result = build
    reference = hf_greedy(open_model(name).reference_model(), SOURCE, NEW_TOKENS)
    backend = FxBackend(result.fx_networks) if stage == "fx" else OrtBackend(result.out_dir, result.manifest)
    runtime = runtime_for(backend, result.manifest)
    assert isinstance(runtime, Seq2SeqRuntime)
    ours = runtime.translate(SOURCE, NEW_TOKENS)
    assert ours.tokens == reference["tokens"]
    err = float(np.max(np.abs(np.stack(ours.logits) - np.stack(reference["logits"]))))
    assert err <= 1e-4, f"{name} {stage}: max logit error {err:.2e}"


def test_generate_from_the_command_line_translates_the_source(build, capsys):
    """`graphopt generate DIR --input-ids SOURCE`: for an encoder-decoder model the ids are the source."""
    name, result = build
    reference = hf_greedy(open_model(name).reference_model(), SOURCE, 8)
    ids = ",".join(map(str, SOURCE))
    capsys.readouterr()
    assert main(["generate", str(result.out_dir), "--input-ids", ids, "--max-new-tokens", "8", "--ignore-eos",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tokens": reference["tokens"]}
