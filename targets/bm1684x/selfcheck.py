"""A toolchain's self-check: one Linear layer through model_transform, model_deploy (W4BF16)
and the cmodel simulator, compared with onnxruntime. Run after installing, and by
`graphopt toolchain check`."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import GraphoptError
from graphopt.onnx_ir import IR_VERSION, OPSET
from graphopt.targets.bm1684x.simulator import Simulator
from graphopt.targets.bm1684x.toolchain import Toolchain, log_tail

MIN_COSINE = 0.99  # W4 with group 64 on this layer measured 0.996


def _one_layer(path: Path) -> np.ndarray:
    """y = x @ W^T with W stored [out, in] + Transpose, the layout W4 quantizes well; returns x."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((128, 64)) * 0.1).astype(np.float32), "weight")
    nodes = [helper.make_node("Transpose", ["weight"], ["weight_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "weight_t"], ["y"])]
    graph = helper.make_graph(nodes, "selfcheck", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 128])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    return rng.standard_normal((1, 4, 64)).astype(np.float32)


def run_selfcheck(toolchain: Toolchain, directory: Path) -> dict:
    from graphopt.runtime import ort_session

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    start = time.perf_counter()
    x = _one_layer(directory / "selfcheck.onnx")
    log = directory / "selfcheck.log"
    for tool, args in (("model_transform", ["--model_name", "selfcheck", "--model_def", "selfcheck.onnx",
                                            "--input_shapes", "[[1,4,64]]", "--mlir", "selfcheck.mlir"]),
                       ("model_deploy", ["--mlir", "selfcheck.mlir", "--quantize", "W4BF16", "--q_group_size", "64",
                                         "--quant_input", "--quant_output", "--chip", "bm1684x",
                                         "--model", "selfcheck.bmodel"])):
        if toolchain.run(tool, args, cwd=directory, log=log) != 0:
            raise GraphoptError(f"the TPU-MLIR toolchain's self-check failed: {tool} exited with an error. Its log "
                                f"is {log}; the last lines:\n{log_tail(log)}\nIf it says `GLIBC_... not found`, the bundled "
                                "glibc in tpu_mlir/lib/third_party does not suit this system; run `graphopt toolchain "
                                "install bm1684x --force`.")
    reference = ort_session(directory / "selfcheck.onnx").run(None, {"x": x})[0]
    with Simulator(toolchain, directory / "simulator.log") as sim:
        (got,) = sim.run(directory / "selfcheck.bmodel", "selfcheck", {"x": x})
    cosine = float(np.dot(got.ravel(), reference.ravel()) / (np.linalg.norm(got) * np.linalg.norm(reference)))
    if not cosine >= MIN_COSINE:
        raise GraphoptError(f"the TPU-MLIR toolchain's self-check ran, but its simulated W4BF16 Linear layer matches "
                            f"onnxruntime only to cosine {cosine:.4f} (expected >= {MIN_COSINE}); the toolchain in "
                            f"{toolchain.root} is not usable. Reinstall it with `graphopt toolchain install bm1684x "
                            "--force`.")
    return {"quantize": "W4BF16", "cosine": round(cosine, 6), "seconds": round(time.perf_counter() - start, 1)}
