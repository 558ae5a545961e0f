"""export_reuse.py: a network whose rewritten graph one exported before takes that ONNX model with its own
weights, and what is saved is the bytes an export of its own would have written."""

from pathlib import Path

import pytest
import torch

from graphopt import export_reuse
from graphopt.compiler import compile_model
from graphopt.export_reuse import ExportedGraphs, graph_key
from graphopt.models import open_model
from graphopt.onnx_ir import is_weight
from graphopt.report import render
from graphopt.targets import get_target
from graphopt.testing import tiny_llama_checkpoint


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.onnx*"))}


def test_blocks_of_one_graph_take_the_first_ones_model_and_write_the_same_bytes(tmp_path, monkeypatch):
    """4 layers: block_0..2 are one graph (block_3 holds the final norm; at this size the norms' weights are
    constants in the graph, all ones here), block_cache_0..2 another. Exported in
    one process, the later ones take the first's model; the files are those of a run where every network is
    exported, and every check still runs and passes."""
    checkpoint = tiny_llama_checkpoint(tmp_path / "tiny-4-layers", 4)
    builds = {}
    for how in ("reused", "every network exported"):
        if how == "every network exported":
            monkeypatch.setattr(ExportedGraphs, "find", lambda self, key, net: None)
        builds[how] = compile_model(open_model(str(checkpoint)), get_target("onnx"), 64, tmp_path / how,
                                    show_progress=False, jobs=1)
    taken = {n.name: n.onnx_from for n in builds["reused"].networks}
    assert taken == {"embedding": None, "block_0": None, "block_cache_0": None, "block_1": "block_0",
                     "block_cache_1": "block_cache_0", "block_2": "block_0", "block_cache_2": "block_cache_0",
                     "block_3": None, "block_cache_3": None, "lm_head": None}, taken
    assert not any(n.onnx_from for n in builds["every network exported"].networks)
    assert _files(tmp_path / "reused") == _files(tmp_path / "every network exported")
    for build in builds.values():
        assert build.ok and all(len(n.checks) >= 2 and all(c.ok for c in n.checks) for n in build.networks
                                if n.kind.startswith("block"))
    # the ONNX passes' records are the first network's, under each network's name
    records = {(r.network, r.pass_name): r.changed for n in builds["reused"].networks for r in n.passes}
    assert records[("block_2", "onnx-simplify")] == records[("block_0", "onnx-simplify")] > 0
    report = render(builds["reused"], 1.0)
    assert "onnx export: ran for 6 of 10 networks; the others' model taken from a network of the same graph " \
           "(block_0's: 2, block_cache_0's: 2)" in report, report


def _block(tmp_path):
    from graphopt.export import ExportJob, export_serially
    from graphopt.testing import tiny_llama

    target = get_target("onnx")
    job = ExportJob(tiny_llama(), list(target.fx_pipeline), list(target.onnx_pipeline), 64, tmp_path, [0],
                    check=False, dump_dir=None)
    plans = [p for p in job.plans() if p.name == "block_0"]
    return export_serially(job, plans, keep_fx=True)[1]["block_0"]


def test_the_key_holds_small_constants_by_value_and_weights_by_shape(tmp_path):
    """A constant the exporter may fold changes the key when its value changes; a weight (a graph input of the
    export) only when its shape or dtype does."""
    net = _block(tmp_path)
    before = graph_key(net, None, ["onnx-simplify"])
    tensors = {n.target: _tensor(net, n.target) for n in net.graph.nodes if n.op == "get_attr"}
    small = next(name for name, t in tensors.items() if not is_weight(t) and t.is_floating_point())  # a norm's
    weight = next(name for name, t in tensors.items() if is_weight(t))
    with torch.no_grad():
        _tensor(net, weight).mul_(2)
    assert graph_key(net, None, ["onnx-simplify"]) == before
    with torch.no_grad():
        _tensor(net, small).add_(1)
    assert graph_key(net, None, ["onnx-simplify"]) != before
    assert graph_key(net, {"input_states": {1: "seq"}}, ["onnx-simplify"]) != graph_key(net, None, ["onnx-simplify"])
    assert graph_key(net, None, ["onnx-simplify", "onnx-tidy"]) != graph_key(net, None, ["onnx-simplify"])


def _tensor(net, name: str) -> torch.Tensor:
    tensor = net.gm
    for part in name.split("."):
        tensor = getattr(tensor, part)
    return tensor


def test_nothing_is_reused_under_a_users_onnx_pass_or_dumps(monkeypatch):
    """A user's ONNX pass may read the weights' values, and dumps are per network: no reuse under either."""
    from graphopt import pass_manager
    from graphopt.pass_manager import OnnxPass

    class ReadsWeights(OnnxPass):
        """A user pass (test)."""

        name = "test-reads-weights"

    monkeypatch.setitem(pass_manager._REGISTRY, ReadsWeights.name, ReadsWeights)
    assert ExportedGraphs(["onnx-simplify", "onnx-tidy"], dumping=False).enabled
    assert not ExportedGraphs(["onnx-simplify"], dumping=True).enabled
    graphs = ExportedGraphs(["onnx-simplify", "test-reads-weights"], dumping=False)
    assert not graphs.enabled
    monkeypatch.setattr(export_reuse, "graph_key", pytest.fail)  # not even computed
    assert graphs.key(object(), None) is None and graphs.find(None, object()) is None
