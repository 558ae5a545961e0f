"""Decode networks are held to their prefill networks in every run, at every size (issue 17, defect 3).

A decode block (block_cache_i, decoder_block_cache_i) gains its cache inputs from the passes, so it
has no traced form to be compared with, and the end-to-end check against transformers runs only for
models under 200M parameters. Every run now decodes a few rows of each decode block with the cache its
prefill block produced and holds them to the prefill's rows (graphopt/checks.py, `decode_check`).
"""

import textwrap

import pytest

from graphopt.compiler import compile_model
from graphopt.models import source as source_module
from graphopt.models import open_model
from graphopt.contract import DECODE_BLOCKS
from graphopt.plugins import PassPlugins
from graphopt.targets.onnx_target import ONNX_TARGET

SEQ = 32

# A decode-only bug, as a user pass could bring one: the decode blocks read their K cache halved.
HALVE_HISTORY = textwrap.dedent('''
    import torch
    from graphopt.pass_manager import DECODE_BLOCKS, Pass, PassResult, register_pass

    @register_pass
    class HalveHistory(Pass):
        """The decode blocks read their K cache at half its value."""
        name = "halve-history"
        applies_to = DECODE_BLOCKS
        insert_after = "concat-cache"

        def run(self, net):
            cache = net.input("history_k")
            readers = list(cache.users)
            with net.graph.inserting_after(net.placeholders()[-1]):
                half = net.graph.call_function(torch.ops.aten.mul.Tensor, (cache, 0.5))
            for reader in readers:
                reader.replace_input_with(cache, half)
            return PassResult(1, "history_k halved")
''')


def _decode_checks(result) -> dict:
    return {n.name: next(c for c in n.checks if c.stage.startswith("decode vs prefill"))
            for n in result.networks if n.kind in DECODE_BLOCKS}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-marian"])
def test_every_decode_block_matches_its_prefill_block(model, tmp_path):
    result = compile_model(open_model(model), ONNX_TARGET, SEQ, tmp_path / "out", show_progress=False)
    checks = _decode_checks(result)
    assert len(checks) == 2 and result.ok
    assert all(c.ok and c.max_abs_err < 1e-4 and c.stage == "decode vs prefill (rows 0, 1, 16, 31)"
               for c in checks.values()), checks


def test_a_decode_only_bug_fails_a_run_too_large_for_the_end_to_end_check(tmp_path, monkeypatch):
    # A Llama-3.1-8B is past the end-to-end check's 200M parameters; as if these models were too.
    monkeypatch.setattr(source_module, "SMALL_MODEL_PARAMS", 0)
    pass_file = tmp_path / "halve_history.py"
    pass_file.write_text(HALVE_HISTORY)
    plugins = PassPlugins(files=(str(pass_file),), entry_points=False)
    for model in ("tiny-llama", "tiny-marian"):
        result = compile_model(open_model(model), ONNX_TARGET, SEQ, tmp_path / model, plugins=plugins,
                               show_progress=False)
        assert result.end_to_end is None and not result.ok, model
        checks = _decode_checks(result)
        assert checks and not any(c.ok for c in checks.values()), checks
        # Everything else still agrees: only the decode blocks are wrong, and only this check says so.
        others = [c for n in result.networks for c in n.checks if not c.stage.startswith("decode vs prefill")]
        assert all(c.ok for c in others)
