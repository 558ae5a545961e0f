import numpy as np
import onnxruntime
import torch
import torch.nn as nn

from graphopt.onnx_ir import export_onnx
from graphopt.testing import count, run_passes
from graphopt.trace import trace_network

aten = torch.ops.aten


class IdsToFloat(nn.Module):
    def forward(self, input_ids):
        return input_ids.float().view(-1) * 0.5


def test_exporter_unknown_ops_are_renamed_and_export_runs():
    net = trace_network(IdsToFloat(), {"input_ids": torch.arange(6).view(2, 3)}, name="toy", kind="embedding",
                        output_names=["y"], seq_length=3)
    assert count(net, aten._to_copy.default) == 1
    run_passes(net, "views-to-reshapes", "onnx-legalize")
    assert count(net, aten._to_copy.default) == 0
    model = export_onnx(net).model
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    np.testing.assert_array_equal(session.run(None, {"input_ids": ids})[0], ids.reshape(-1) * 0.5)
