"""The run report counts what each pass changed on each network, and names a pass that changed nothing."""

import json
import textwrap

from graphopt.compiler import compile_model
from graphopt.models import open_model
from graphopt.plugins import PassPlugins
from graphopt.report import pass_changes, render, write_json
from graphopt.targets import get_target

IDLE = textwrap.dedent('''
    from graphopt.pass_manager import Pass, PassResult, register_pass

    @register_pass
    class LookButDoNotTouch(Pass):
        """Finds nothing to do, as a pass whose pattern no longer matches would."""
        name = "look-but-do-not-touch"
        insert_after = "kv-layout"

        def run(self, net):
            return PassResult(0, "nothing matched")
''')


def test_change_counts_per_pass_and_an_idle_pass_named(tmp_path):
    pass_file = tmp_path / "idle.py"
    pass_file.write_text(IDLE)
    result = compile_model(open_model("tiny-llama"), get_target("onnx"), 32, tmp_path / "out", show_progress=False,
                           plugins=PassPlugins(files=(str(pass_file),), entry_points=False))
    changes = pass_changes(result)
    assert list(changes) == ["fx", "onnx"] and list(changes["fx"])[-1] == "export-legalize"
    assert changes["fx"]["look-but-do-not-touch"] == [0] * 6  # it ran on all 6 networks, changed none
    assert changes["fx"]["kv-layout"] == [1, 1, 1, 1]  # one attention per block and decode block
    assert changes["fx"]["rope-table"] == [2, 2, 2, 2]  # a cos and a sin table each
    text = render(result, 1.0)
    assert "kv-layout 4 (4/4)" in text
    idle = next(line for line in text.splitlines() if "changed nothing on any network:" in line)
    assert "look-but-do-not-touch" in idle and "kv-layout" not in idle
    report = json.loads(write_json(result, 1.0).read_text())
    assert report["pass_changes"]["fx"]["look-but-do-not-touch"] == [0] * 6
    block = next(n for n in report["networks"] if n["name"] == "block_0")
    assert {"pass": "kv-layout", "changed": 1} in [{"pass": p["pass"], "changed": p["changed"]} for p in block["passes"]]
