import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn as nn

from graphopt.errors import GraphoptError
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
    run_passes(net, "views-to-reshapes", "export-legalize")
    assert count(net, aten._to_copy.default) == 0
    model = export_onnx(net).model
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    np.testing.assert_array_equal(session.run(None, {"input_ids": ids})[0], ids.reshape(-1) * 0.5)


class XieluLike(nn.Module):
    """The negative branch of xIELU (Apertus' activation) uses expm1, which the exporter cannot write."""

    def forward(self, input_states):
        return torch.where(input_states > 0, input_states, torch.expm1(input_states) * 0.8)


def test_expm1_is_expanded_and_export_runs():
    x = torch.linspace(-6, 3, 64).view(1, 8, 8)
    net = trace_network(XieluLike(), {"input_states": x}, name="toy", kind="block", output_names=["y"], seq_length=8)
    expected = net.run(x)[0]
    with pytest.raises(GraphoptError, match="network 'toy' uses an op the ONNX exporter cannot write.*expm1"):
        export_onnx(net)  # without the pass: a one-paragraph error, not the exporter's traceback
    run_passes(net, "export-legalize")
    assert count(net, aten.expm1.default) == 0
    session = onnxruntime.InferenceSession(export_onnx(net).model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input_states": x.numpy()})[0], expected.numpy(), atol=1e-6)
