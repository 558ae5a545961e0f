"""Networks whose weights pass the size limit are saved with ONNX external data and still load."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import graphopt.onnx_ir as onnx_ir
from graphopt.testing import traced


def test_large_weights_go_to_a_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_ir, "EXTERNAL_DATA_BYTES", 1000)  # the 8B embedding (2.1 GB) takes this path
    monkeypatch.chdir(tmp_path)
    Path("lm_head.onnx.data").write_text("a file of the same name in the current directory changes nothing")
    net = traced("lm_head")
    onnx_net = onnx_ir.export_onnx(net)
    (tmp_path / "out").mkdir()
    files = onnx_ir.save_onnx(onnx_net.model, tmp_path / "out" / "lm_head.onnx", onnx_net.weights)
    assert [f.name for f in files] == ["lm_head.onnx", "lm_head.onnx.data"]
    assert files[1].stat().st_size > files[0].stat().st_size
    model = onnx.load(str(files[0]), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"hidden_states": x.numpy()})[0], net.run(x)[0].numpy(),
                               rtol=1e-5, atol=1e-5)


def test_weights_travel_out_of_band_and_come_back_in_linear_layout(tmp_path):
    from graphopt.targets.pipeline import FX_PIPELINE
    from graphopt.testing import run_passes

    net = run_passes(traced("block_0"), *FX_PIPELINE)
    onnx_net = onnx_ir.export_onnx(net)
    # The passes see a weightless model: the weights are extra inputs, by their traced names.
    assert onnx_net.model.ByteSize() < 100_000
    assert "layer.self_attn.q_proj.weight" in onnx_net.weights
    assert all(w.numel() >= onnx_ir.WEIGHT_MIN_ELEMENTS for w in onnx_net.weights.values())
    files = onnx_ir.save_onnx(onnx_net.model, tmp_path / "block_0.onnx", onnx_net.weights)
    model = onnx.load(str(files[0]))
    assert [i.name for i in model.graph.input] == ["input_states", "position_ids", "attention_mask"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits["layer.self_attn.k_proj.weight"].shape == (64, 128)  # [out, in], as nn.Linear stores it
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    matmul_weights = {transposed.get(n.input[1]) for n in model.graph.node if n.op_type == "MatMul"}
    assert {f"layer.{m}.weight" for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")} <= matmul_weights


def test_block_cache_reads_the_weights_block_wrote(tmp_path, monkeypatch):
    """block_i and block_cache_i hold the same weights: written once, read by both (8B: 32 GB, not 60)."""
    from graphopt.compiler import compile_model
    from graphopt.targets import get_target
    from graphopt.testing import tiny_llama

    monkeypatch.setattr(onnx_ir, "EXTERNAL_DATA_BYTES", 1000)  # every network takes the 8B path
    result = compile_model(tiny_llama(), get_target("onnx"), 32, tmp_path / "out", show_progress=False)
    nets = {n["name"]: n for n in result.manifest["networks"]}
    for i in range(2):
        assert nets[f"block_{i}"]["external_data"] == [f"block_{i}.onnx.data"]
        assert nets[f"block_cache_{i}"]["external_data"] == [f"block_{i}.onnx.data"]
        assert not (result.out_dir / f"block_cache_{i}.onnx.data").exists()
    for net in nets.values():  # the digests, hashed as the data files were written, are the files' own
        files = [result.out_dir / net["file"], *(result.out_dir / f for f in net["external_data"])]
        assert net["sha256"] == onnx_ir.SharedData(result.out_dir).digest(files), net["name"]
    # Each network still loads on its own and matches the FX graph; generation matches transformers.
    assert all(c.ok for r in result.networks for c in r.checks)
    assert result.end_to_end["tokens_identical"] and result.end_to_end["ok"]


def test_a_tensor_is_shared_only_when_every_byte_is_the_same(tmp_path):
    """The index keys tensors by a sample of their bytes; a tensor that agrees with a written one on the sample but
    not everywhere is written again, one equal in every byte points at the written one."""
    written = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    (tmp_path / "a.data").write_bytes(b"\0" * 64 + written.tobytes())
    shared = onnx_ir.SharedData(tmp_path)
    key, found = shared.find(memoryview(written).cast("B"))
    assert found is None
    shared.add(key, "a.data", 64)
    nearly = written.copy()
    nearly[12345] += 1.0  # bytes 49380..49383: between the sampled bytes (every 64th here) and before the last 4 KiB
    near_key, found = shared.find(memoryview(nearly).cast("B"))
    assert near_key == key and found is None
    assert shared.find(memoryview(written.copy()).cast("B"))[1] == ("a.data", 64)
