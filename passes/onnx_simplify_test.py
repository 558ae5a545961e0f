"""onnx-simplify on an exported block: shape arithmetic folded away, the numbers unchanged, and what it
changed reported as a count of nodes."""

import numpy as np

from graphopt.onnx_ir import export_onnx, node_signatures, save_onnx
from graphopt.pass_manager import PassManager
from graphopt.runtime import ort_session
from graphopt.targets.pipeline import FX_PIPELINE
from graphopt.testing import prefill_inputs, run_passes, traced


def test_shape_arithmetic_is_folded_and_numbers_hold(tmp_path):
    net = run_passes(traced("block_0"), *FX_PIPELINE)
    onnx_net = export_onnx(net)
    exported = len(onnx_net.model.graph.node)
    before = node_signatures(onnx_net.model)
    raw = save_onnx(onnx_net.model, tmp_path / "raw.onnx", onnx_net.weights)[0]
    (record,) = PassManager(["onnx-simplify"], stage="onnx").run(onnx_net)
    assert len(onnx_net.model.graph.node) < exported and record.changed > 0
    assert record.note == f"{exported} -> {len(onnx_net.model.graph.node)} nodes"
    assert node_signatures(onnx_net.model) != before
    simplified = save_onnx(onnx_net.model, tmp_path / "simplified.onnx", onnx_net.weights)[0]
    states, positions, mask = (t.numpy() for t in prefill_inputs(16, length=5))
    feeds = {"input_states": states, "position_ids": positions, "attention_mask": mask}
    for got, want in zip(ort_session(simplified).run(None, feeds), ort_session(raw).run(None, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
