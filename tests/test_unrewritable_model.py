"""A model whose blocks the passes cannot rewrite fails by pass, network and reason, never with a wrong ONNX."""

import pytest

from graphopt.cli import main
from graphopt.compiler import compile_model
from graphopt.errors import PassMatchError
from graphopt.models import open_model
from graphopt.models.configs import TINY_LLAMA
from graphopt.targets.onnx_target import ONNX_TARGET
from tests.models.self_masking_llama import SelfMaskingLlamaConfig, SelfMaskingLlamaForCausalLM


@pytest.fixture(scope="module")
def self_masking_checkpoint(tmp_path_factory):
    """Tiny-llama-sized, layer 1 (of 2) builds its own mask; layer 0 is plain Llama."""
    values = {k: v for k, v in TINY_LLAMA.items() if k not in ("model_type", "architectures")}
    config = SelfMaskingLlamaConfig(self_masking_layers=[1], **values)
    directory = tmp_path_factory.mktemp("models") / "self-masking-llama"
    SelfMaskingLlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_the_error_names_the_pass_the_network_and_what_was_not_found(self_masking_checkpoint, tmp_path):
    with pytest.raises(PassMatchError) as error:
        compile_model(open_model(str(self_masking_checkpoint)), ONNX_TARGET, 32, tmp_path / "out", show_progress=False)
    assert (error.value.pass_name, error.value.network) == ("fixed-mask", "block_1")
    assert "computed inside the network" in error.value.missing and "attention_mask" in error.value.missing
    assert "lets row 2 not see key 0" in error.value.missing  # the window, found by running the mask
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), "nothing half-written"


def test_from_export_worker_processes_the_command_line_says_the_same(self_masking_checkpoint, tmp_path, capsys):
    """--jobs 2: the error is raised in a spawned worker and must reach the user intact."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["run", str(self_masking_checkpoint), "--seq-length", "32", "--jobs", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error = err.strip().splitlines()[-1]  # after the progress lines
    assert error.startswith("graphopt: error: pass 'fixed-mask' cannot rewrite network 'block_1': the mask of attention")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
