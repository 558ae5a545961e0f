import numpy as np
import onnx
import onnxruntime
import torch

from graphopt.onnx_ir import export_onnx
from graphopt.pass_manager import PassManager
from graphopt.targets.onnx_target import FX_PIPELINE
from graphopt.testing import prefill_inputs, run_passes, traced


def _run(model, feeds):
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_matmul_weights_are_linear_layout_under_their_names():
    net = run_passes(traced("block_0"), *FX_PIPELINE)
    onnx_net = export_onnx(net, weights_out_of_band=False)  # the exporter folds constant weights
    PassManager(["onnx-simplify"]).run(onnx_net)
    inits = {t.name: t for t in onnx_net.model.graph.initializer}
    folded = [n for n in onnx_net.model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(folded) == 7  # q, k, v, o, gate, up, down: folded to [in, out] by the exporter
    x, positions, mask = prefill_inputs(16)
    feeds = {"input_states": x.numpy(), "position_ids": positions.numpy(), "attention_mask": mask.numpy()}
    before = _run(onnx_net.model, feeds)

    PassManager(["linear-weight-layout"]).run(onnx_net)
    model = onnx_net.model
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    weights = [producers[n.input[1]] for n in matmuls if n.input[1] in producers
               and producers[n.input[1]].op_type == "Transpose" and producers[n.input[1]].input[0] in inits]
    names = sorted(t.input[0] for t in weights)
    assert names == sorted(f"layer.{m}.weight" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert inits["layer.self_attn.k_proj.weight"].shape == (64, 128)  # [out, in], as nn.Linear stores it
    for got, want in zip(_run(model, feeds), before):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(inits["layer.mlp.down_proj.weight"]),
                               dict(net.gm.named_buffers())["layer.mlp.down_proj.weight"])
