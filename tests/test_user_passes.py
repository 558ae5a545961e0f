"""User passes: a --pass-file or an installed package's entry point adds a pass to a target's pipeline,
placed by the pass or by --insert-after/--insert-before; it runs in parallel export workers too, its
graphs can be dumped, and every mistake in placing or loading it is one clear paragraph."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

EXAMPLE = str(Path(__file__).parents[1] / "examples" / "passes" / "fold_attention_scale.py")


def graphopt(*args, env=None):
    return subprocess.run([sys.executable, "-m", "graphopt", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def _pipeline(listing: str) -> list[str]:
    """The FX pass names of `graphopt passes` output, in order."""
    fx = listing.split("ONNX passes")[0]
    return [line.split()[1] for line in fx.splitlines() if line[:5].strip().rstrip(".").isdigit()]


def test_the_example_pass_places_itself_and_runs_in_parallel_workers(tmp_path):
    listing = graphopt("passes", "--target", "bm1684x", "--pass-file", EXAMPLE)
    assert listing.returncode == 0, listing.stderr
    pipeline = _pipeline(listing.stdout)
    assert pipeline[pipeline.index("fold-attention-scale") + 1] == "attention-lower"
    assert f"user pass from {EXAMPLE}" in listing.stdout

    out = tmp_path / "out"
    run = graphopt("run", "tiny-llama", "--seq-length", "32", "--out", str(out), "--pass-file", EXAMPLE,
                   "--jobs", "2", "--dump-after", "fold-attention-scale")
    assert run.returncode == 0 and "checks: all passed" in run.stdout, run.stdout + run.stderr
    assert "fold-attention-scale" in json.loads((out / "manifest.json").read_text())["pipeline"]["fx"]
    # The workers ran it: the query is scaled in q_proj's weights, so no Mul by 1/sqrt(32) is left.
    block = onnx.load(str(out / "block_0.onnx"))
    scalars = [onnx.numpy_helper.to_array(i) for i in block.graph.initializer if not i.dims]
    assert not any(abs(float(s) - 32 ** -0.5) < 1e-6 for s in scalars)
    dumps = sorted(p.name for p in (tmp_path / "out.dump" / "block_0").iterdir())
    assert dumps == ["fx-00-input.py", "fx-13-fold-attention-scale.py", "onnx-00-input.txt"]
    assert "scale = 1.0" in (tmp_path / "out.dump" / "block_0" / "fx-13-fold-attention-scale.py").read_text()


def test_insert_after_on_the_command_line_overrides_the_pass_and_order_is_checked():
    after = graphopt("passes", "--pass-file", EXAMPLE, "--insert-after", "kv-layout")
    pipeline = _pipeline(after.stdout)
    assert pipeline[pipeline.index("kv-layout") + 1] == "fold-attention-scale"
    # Before attention-canonical, nothing has established what the pass needs.
    early = graphopt("passes", "--pass-file", EXAMPLE, "--insert-before", "attention-canonical")
    assert early.returncode == 2 and "needs attention.canonical" in early.stderr and "Traceback" not in early.stderr


@pytest.mark.parametrize("content, flags, message", [
    (None, (), "does not exist"),
    ("raise RuntimeError('oops')", (), "could not be loaded: RuntimeError: oops"),
    ("x = 1", (), "defines no pass"),
    ("""
     from graphopt.pass_manager import Pass, register_pass
     @register_pass
     class Nowhere(Pass):
         '''Does nothing.'''
         name = "nowhere"
         def run(self, net):
             return ""
     """, (), "does not say where it goes"),
    ("""
     from graphopt.pass_manager import Pass, register_pass
     @register_pass
     class Lost(Pass):
         '''Does nothing.'''
         name = "lost"
         def run(self, net):
             return ""
     """, ("--insert-after", "no-such-pass"), "not in this target's fx pipeline"),
])
def test_a_bad_pass_file_is_one_paragraph(tmp_path, content, flags, message):
    path = tmp_path / "mine.py"
    if content is not None:
        path.write_text(textwrap.dedent(content))
    out = tmp_path / "out"
    result = graphopt("run", "tiny-llama", "--out", str(out), "--pass-file", str(path), *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_an_installed_package_adds_passes_through_the_entry_point_group(tmp_path):
    """What `pip install` of a package declaring `[project.entry-points."graphopt.passes"]` leaves on the path."""
    package = tmp_path / "acme_passes"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        from graphopt.pass_manager import Pass, register_pass

        @register_pass
        class AcmeNoop(Pass):
            '''Change nothing (a package's pass).'''
            name = "acme-noop"
            insert_after = "kv-layout"

            def run(self, net):
                return "nothing to do"
        """))
    info = tmp_path / "acme_passes-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-passes\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[graphopt.passes]\nacme = acme_passes\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    listing = graphopt("passes", env=env)
    assert listing.returncode == 0, listing.stderr
    pipeline = _pipeline(listing.stdout)
    assert pipeline[pipeline.index("kv-layout") + 1] == "acme-noop"
