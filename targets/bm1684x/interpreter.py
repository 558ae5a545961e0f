"""A net's MLIR (top or tpu level) run in TPU-MLIR's interpreter, model_runner.py: no bmodel, no simulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphopt.targets.bm1684x.toolchain import Toolchain, log_tail


def run_mlir(toolchain: Toolchain, mlir: Path, feeds: dict[str, np.ndarray], outputs: list[str], log: Path,
             weight: str | None = None) -> dict[str, np.ndarray]:
    """The named outputs of `mlir` on `feeds`. Its inputs and outputs are written beside it; `weight`
    names the weight file when it is not the one the MLIR itself names (a final, addressed tpu.mlir)."""
    folder, label = mlir.parent, mlir.stem
    np.savez(folder / f"{label}.inputs.npz", **feeds)
    args = ["--input", f"{label}.inputs.npz", "--model", mlir.name, "--output", f"{label}.outputs.npz"]
    status = toolchain.run("model_runner", args + (["--weight", weight] if weight else []), folder, log)
    if status != 0:
        raise RuntimeError(f"model_runner failed on {mlir.name} (exit status {status}); the last lines of {log}:\n"
                           f"{log_tail(log, 15)}")
    got = np.load(folder / f"{label}.outputs.npz")
    # TPU-MLIR names an output after the ONNX value and the op that made it (past_k -> past_k_Reshape).
    return {name: got[next(k for k in got.files if k == name or k.startswith(name + "_"))] for name in outputs}
