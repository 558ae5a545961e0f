"""`graphopt golden record|check`: recording gives the goldens the suite holds, a check passes on an
honest pipeline, and a pass that moves the numbers fails with the stage table and per-network errors."""

import json
import subprocess
import sys
import textwrap

import numpy as np

from tests.golden.record import load_golden

SKEWED_HEAD = """
    import torch
    from graphopt.pass_manager import Pass, register_pass

    @register_pass
    class SkewLogits(Pass):
        '''Scale the logits by 1.001: what a subtly wrong rewrite does.'''
        name = "skew-logits"
        applies_to = frozenset({"lm_head"})
        insert_before = "export-legalize"

        def run(self, net):
            (logits,) = net.output_values()
            with net.graph.inserting_after(logits):
                skewed = net.graph.call_function(torch.ops.aten.mul.Tensor, (logits, 1.001))
            net.output_node.args = ((skewed,),)
            return "skewed"
    """


def graphopt(*args):
    return subprocess.run([sys.executable, "-m", "graphopt", *args], capture_output=True, text=True, timeout=600)


def test_record_writes_what_the_suite_holds(tmp_path):
    result = graphopt("golden", "record", "tiny-llama", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    recorded = json.loads((tmp_path / "tiny-llama.json").read_text())
    golden, logits = load_golden("tiny-llama")
    assert recorded["tokens"] == golden["tokens"] and recorded["prompt"] == golden["prompt"]
    # Within the suite's own bar for the reference stage: the stored logits were recorded on another
    # transformers release, and fp32 kernels move between releases (5.23 -> 5.24: 7.5e-6 on tiny-llama).
    np.testing.assert_allclose(np.load(tmp_path / "tiny-llama.logits.npz")["logits"], logits, atol=1e-4)
    assert not list(tmp_path.glob("*.partial"))


def test_check_fails_on_a_pass_that_moves_the_numbers_and_says_where(tmp_path):
    graphopt("golden", "record", "tiny-llama", "--dir", str(tmp_path))
    honest = graphopt("golden", "check", "tiny-llama", "--dir", str(tmp_path))
    assert honest.returncode == 0 and "FAIL" not in honest.stdout, honest.stdout + honest.stderr

    skew = tmp_path / "skew.py"
    skew.write_text(textwrap.dedent(SKEWED_HEAD))
    broken = graphopt("golden", "check", "tiny-llama", "--dir", str(tmp_path), "--pass-file", str(skew))
    assert broken.returncode == 1, broken.stdout + broken.stderr
    lines = {line.split()[0]: line for line in broken.stdout.splitlines()[2:6]}
    assert "ok" in lines["reference"] and "FAIL" in lines["fx"] and "FAIL" in lines["onnx"]
    # The compile's own check already saw the lm_head move away from its traced self.
    (head,) = [line for line in broken.stdout.splitlines() if line.strip().startswith("lm_head")
               and "fx-rewritten vs traced" in line]
    assert head.rstrip().endswith("FAIL")


def test_a_missing_golden_is_one_paragraph(tmp_path):
    result = graphopt("golden", "check", "tiny-llama", "--dir", str(tmp_path))
    assert result.returncode == 2 and "graphopt golden record" in result.stderr and "Traceback" not in result.stderr
