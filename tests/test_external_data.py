"""Networks whose weights pass the size limit are saved with ONNX external data and still load."""

import numpy as np
import onnx
import onnxruntime
import torch

import graphopt.onnx_ir as onnx_ir
from graphopt.testing import traced


def test_large_weights_go_to_a_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_ir, "EXTERNAL_DATA_BYTES", 1000)  # the 8B embedding (2.1 GB) takes this path
    net = traced("lm_head")
    files = onnx_ir.save_onnx(onnx_ir.export_onnx(net).model, tmp_path / "lm_head.onnx")
    assert [f.name for f in files] == ["lm_head.onnx", "lm_head.onnx.data"]
    assert files[1].stat().st_size > files[0].stat().st_size
    model = onnx.load(str(files[0]), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"hidden_states": x.numpy()})[0], net.run(x)[0].numpy(),
                               rtol=1e-5, atol=1e-5)
