"""onnx-tidy: IR 8 / opset 15 pinned, unused values dropped, and the Linear layout checked: a MatMul
that multiplies by a 2-D weight as it is (the exporter's folded [in, out] form) is refused."""

import onnx
import pytest
import torch
import torch.nn as nn

from graphopt.errors import GraphoptError
from graphopt.onnx_ir import IR_VERSION, OPSET, export_onnx
from graphopt.pass_manager import PassManager
from graphopt.targets.pipeline import FX_PIPELINE
from graphopt.testing import run_passes, traced
from graphopt.trace import trace_network

TIDY = ["onnx-simplify", "onnx-tidy"]


def test_a_block_leaves_pinned_with_every_weight_in_linear_layout():
    onnx_net = export_onnx(run_passes(traced("block_0"), *FX_PIPELINE))
    onnx_net.model.opset_import[0].version = 17  # as another exporter might write it
    records = PassManager(TIDY, stage="onnx").run(onnx_net)
    assert [r.pass_name for r in records] == TIDY
    model = onnx_net.model
    assert model.ir_version == IR_VERSION and [o.version for o in model.opset_import] == [OPSET]
    assert model.producer_name == "graphopt" and not any(n.doc_string for n in model.graph.node)
    assert {"onnx.tidy", "weights.linear-layout"} <= onnx_net.properties


class FoldedLinear(nn.Module):
    """x @ W with a constant W: the exporter stores it [in, out], not nn.Linear's [out, in] + Transpose."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.randn(64, 32))

    def forward(self, hidden_states):
        return hidden_states @ self.weight


def test_a_weight_multiplied_as_it_is_is_refused():
    net = trace_network(FoldedLinear(), {"hidden_states": torch.randn(1, 64)}, name="lm_head", kind="lm_head",
                        output_names=["m_logits"], seq_length=1)
    onnx_net = export_onnx(net)
    with pytest.raises(GraphoptError, match="onnx-tidy.*lm_head.*weights.linear-layout.*multiplies by weight"):
        PassManager(TIDY, stage="onnx").run(onnx_net)


def test_an_unused_value_is_removed_and_counted():
    onnx_net = export_onnx(run_passes(traced("block_0"), *FX_PIPELINE))
    PassManager(["onnx-simplify"], stage="onnx").run(onnx_net)
    graph = onnx_net.model.graph
    graph.node.append(onnx.helper.make_node("Identity", [graph.input[0].name], ["unused"], name="unused"))
    (record,) = PassManager(["onnx-tidy"], stage="onnx", assume=frozenset({"onnx.simplified"})).run(onnx_net)
    assert record.changed == 1 and "1 unused removed" in record.note
    assert not any(n.name == "unused" for n in onnx_net.model.graph.node)
