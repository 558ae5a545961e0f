import pytest

from graphopt.compiler import compile_model
from graphopt.models import open_model
from graphopt.targets.onnx_target import ONNX_TARGET

GOLDEN_SEQ = 64  # prompt (8) + 32 new tokens fit, small enough to compile in seconds


@pytest.fixture(scope="session")
def tiny_llama_build(tmp_path_factory):
    """tiny-llama compiled once for the session, with the rewritten FX graphs kept for stage checks."""
    out = tmp_path_factory.mktemp("build") / "tiny-llama"
    return compile_model(open_model("tiny-llama"), ONNX_TARGET, GOLDEN_SEQ, out, keep_fx=True, show_progress=False)
