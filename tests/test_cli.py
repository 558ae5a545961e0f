"""The command line: a full run, generate, passes, and clear errors for bad input."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

from graphopt.cli import main
from tests.golden.record import load_golden


def graphopt(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "graphopt", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_run_then_generate_gives_transformers_tokens(tmp_path):
    out = tmp_path / "tiny"
    run = graphopt("run", "tiny-llama", "--target", "onnx", "--seq-length", "64", "--out", str(out))
    assert "checks: all passed" in run.stdout and "identical" in run.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seq_length"] == 64 and manifest["contract"] == "llm-tpu" and len(manifest["networks"]) == 6
    assert json.loads((out / "report.json").read_text())["ok"] is True

    golden, _ = load_golden("tiny-llama")
    ids = ",".join(map(str, golden["prompt"]))
    gen = graphopt("generate", str(out), "--input-ids", ids, "--max-new-tokens", "32", "--ignore-eos", "--json")
    assert json.loads(gen.stdout) == {"tokens": golden["tokens"]}


def test_num_layers_compiles_the_first_layers_and_still_matches_transformers(tmp_path):
    out = tmp_path / "one"
    assert main(["run", "tiny-llama", "--num-layers", "1", "--seq-length", "32", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == "tiny-llama-1l" and manifest["model"]["config"]["num_hidden_layers"] == 1
    assert [n["name"] for n in manifest["networks"]][:3] == ["embedding", "block_0", "block_cache_0"]
    assert len(manifest["networks"]) == 4  # embedding, block_0, block_cache_0, lm_head
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True  # includes greedy generation against the 1-layer transformers model


def test_passes_lists_the_pipeline_with_docs():
    out = graphopt("passes", "--target", "onnx").stdout
    # linear-weight-layout gave way to onnx-tidy's check of the Linear layout it named (issue 18).
    for name in ("rope-table", "kv-layout", "concat-cache", "fixed-mask", "attention-lower", "weights.linear-layout"):
        assert name in out
    assert out.index("kv-layout") < out.index("concat-cache")
    assert "Precompute rotary cos/sin" in out


# ---- bad input: one paragraph, exit 2, no traceback, nothing half-written -----------------

def _error(capsys, *argv) -> str:
    capsys.readouterr()  # drop what test set-up printed
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphopt: error: ") and "Traceback" not in err
    assert err.strip().count("\n") == 0, "one paragraph"
    return err


def test_unknown_model_lists_known_ones(capsys, tmp_path):
    err = _error(capsys, "run", "no-such-model", "--out", str(tmp_path / "o"))
    assert "tiny-llama" in err and "llama3.1-8b" in err
    assert not (tmp_path / "o").exists()


def test_real_model_without_weights_says_how_to_provide_them(capsys, tmp_path):
    err = _error(capsys, "run", "llama3.1-8b", "--out", str(tmp_path / "o"))
    assert "--model-path" in err


def test_directory_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(capsys, "run", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))


def test_directory_without_weights(capsys, tmp_path):
    from graphopt.models.configs import TINY_LLAMA

    model_dir = tmp_path / "noweights"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    assert "safetensors" in _error(capsys, "run", str(model_dir), "--out", str(tmp_path / "o"))


def test_architecture_the_passes_cannot_handle(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0)).save_pretrained(model_dir)
    err = _error(capsys, "run", str(model_dir), "--out", str(tmp_path / "o"))
    assert "GPT2LMHeadModel" in err
    assert not (tmp_path / "o").exists()


def test_seq_length_beyond_max_positions(capsys, tmp_path):
    assert "max_position_embeddings" in _error(capsys, "run", "tiny-llama", "--seq-length", "4096",
                                               "--out", str(tmp_path / "o"))


def test_num_layers_beyond_the_model(capsys, tmp_path):
    assert "num_hidden_layers, 2" in _error(capsys, "run", "tiny-llama", "--num-layers", "3",
                                            "--out", str(tmp_path / "o"))


def test_unwritable_out(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "--out" in _error(capsys, "run", "tiny-llama", "--out", str(tmp_path / "file" / "sub"))


def test_out_holding_foreign_files_is_not_replaced(capsys, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _error(capsys, "run", "tiny-llama", "--out", str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("ids,message", [("1,x,3", "comma-separated"), ("", "at least one"), ("-1,2", "negative")])
def test_malformed_input_ids(capsys, tiny_llama_build, ids, message):
    assert message in _error(capsys, "generate", str(tiny_llama_build.out_dir), f"--input-ids={ids}")


def test_prompt_longer_than_seq(capsys, tiny_llama_build):
    ids = ",".join(["5"] * 65)
    assert "--seq-length 64" in _error(capsys, "generate", str(tiny_llama_build.out_dir), "--input-ids", ids)


def test_token_outside_vocabulary(capsys, tiny_llama_build):
    assert "vocabulary" in _error(capsys, "generate", str(tiny_llama_build.out_dir), "--input-ids", "1,5000")


def test_generate_on_a_directory_that_is_not_an_output(capsys, tmp_path):
    assert "manifest.json" in _error(capsys, "generate", str(tmp_path), "--input-ids", "1,2")


def test_errors_from_the_real_process_have_no_traceback(tmp_path):
    proc = graphopt("run", "no-such-model", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown model" in proc.stderr


def test_a_sliding_window_shorter_than_seq_is_refused_and_a_longer_one_compiles(capsys, tmp_path):
    """Mistral-7B-v0.1 attends within 4096 tokens; the runtime's causal mask cannot express a window."""
    from graphopt.compiler import compile_model
    from graphopt.models import open_model
    from graphopt.targets.onnx_target import ONNX_TARGET

    checkpoint = tmp_path / "windowed-mistral"
    model = open_model("tiny-mistral").reference_model()
    model.config.sliding_window = 16
    model.save_pretrained(checkpoint)
    err = _error(capsys, "run", str(checkpoint), "--seq-length", "32", "--out", str(tmp_path / "o"))
    assert "sliding window of 16 tokens" in err and "--seq-length 16 or less" in err
    # Within the window the model is plain causal attention: compiled, it matches transformers end to end.
    build = compile_model(open_model(str(checkpoint)), ONNX_TARGET, 16, tmp_path / "ok", show_progress=False)
    assert build.ok and build.end_to_end["tokens_identical"]


def test_a_model_file_without_an_adapter_is_one_paragraph(tmp_path):
    model = tmp_path / "mine.py"
    model.write_text("import torch.nn as nn\n\nclass Mine(nn.Module):\n    pass\n")
    result = graphopt("run", str(model), "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "declares no ADAPTER = CustomDecoder(...)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    wrong = tmp_path / "wrong.py"
    wrong.write_text((Path(__file__).parents[1] / "examples" / "custom_model" / "tiny_gpt.py").read_text()
                     .replace('layers="blocks"', 'layers="stack"'))
    result = graphopt("run", str(wrong), "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "layers = 'stack' is not a submodule of TinyGPT" in result.stderr
