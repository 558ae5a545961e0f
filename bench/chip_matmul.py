"""Cycles of one Llama-3.1-8B MLP Linear layer as TPU-MLIR 1.30.2 tiles it, in four spellings (issue 8).

chip_cycles.py's profiles put 15.1M of block_0's 18.1M W4BF16 cycles in the Linear layers, and the
BF16 block's down projection at 8.30M for 30 GMAC, over twice its compute floor. This bench asks
whether the graph can make TPU-MLIR tile a Linear layer better. One [1,512,K] x [K,N] MatMul
(seeded random weights) is compiled with the contract's block flags, as written and split three
ways, for both MLP shapes (gate/up: 4096 -> 14336; down: 14336 -> 4096):

    as is       one MatMul
    K split     x[..., :K/2] @ W[:K/2] + x[..., K/2:] @ W[K/2:]   (the partial sums meet in an Add)
    N split     Concat(x @ W[:, :N/2], x @ W[:, N/2:])
    M split     Concat(x[:, :256] @ W, x[:, 256:] @ W)

Besides total_cycle it reads the bytes the GDMA loaded (compiler_profile_0.txt), which show the
tiling: a weight streamed more than once, or the input reloaded per weight tile. The compute floor
is MACs / 8,192 (the bf16 MACs per cycle of BM1684X's 64 lanes).

    python bench/chip_matmul.py         # 16 compiles, about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, publish  # noqa: E402

SEQ = 512
SHAPES = {"gate/up": (4096, 14336), "down": (14336, 4096)}  # (K, N) of Llama-3.1-8B's MLP
SPELLINGS = ("as is", "K split", "N split", "M split")
MACS_PER_CYCLE = 8192


def linear_onnx(path: Path, k: int, n: int, spelling: str) -> None:
    """One Linear layer [1,SEQ,k] -> [1,SEQ,n] written as `spelling`; weights stored beside it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32) * 0.02
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def matmul(left, right, out):
        nodes.append(helper.make_node("MatMul", [left, right], [out]))
        return out

    def half(of, axis, index, length):
        out = f"{of}_{axis}_{index}"
        nodes.append(helper.make_node("Slice", [of, const(f"{out}_start", [index * length // 2]),
                                                const(f"{out}_end", [(index + 1) * length // 2]),
                                                const(f"{out}_axis", [axis])], [out]))
        return out

    if spelling == "as is":
        matmul("x", const("w", weight), "y")
    elif spelling == "K split":
        parts = [matmul(half("x", 2, i, k), const(f"w{i}", np.split(weight, 2, axis=0)[i]), f"p{i}") for i in (0, 1)]
        nodes.append(helper.make_node("Add", parts, ["y"]))
    elif spelling == "N split":
        parts = [matmul("x", const(f"w{i}", np.split(weight, 2, axis=1)[i]), f"p{i}") for i in (0, 1)]
        nodes.append(helper.make_node("Concat", parts, ["y"], axis=2))
    elif spelling == "M split":
        w = const("w", weight)
        parts = [matmul(half("x", 1, i, SEQ), w, f"p{i}") for i in (0, 1)]
        nodes.append(helper.make_node("Concat", parts, ["y"], axis=1))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, n])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path,
              save_as_external_data=True, location=path.name + ".data")


def loaded_bytes(profile: Path) -> int:
    """Bytes the GDMA moved into local memory (direction 0) over the whole net."""
    return sum(int(size) for size in re.findall(r"\|dr:0\|sz:(\d+)", profile.read_text(errors="replace")))


def measure(quantize: str, k: int, n: int, spelling: str, work: Path) -> dict:
    from graphopt.targets.bm1684x import contract, deploy, toolchain

    tools = toolchain.require()
    folder = work / f"{quantize}-{k}x{n}-{spelling.replace(' ', '_')}"
    folder.mkdir()
    linear_onnx(folder / "linear.onnx", k, n, spelling)
    spec = contract.DeploySpec("linear", "linear", ((1, SEQ, k),), contract.QUANT_MODES[quantize][0],
                               contract.block_flags(quantize, contract.DEFAULT_GROUP_SIZE))
    try:
        deploy.compile_in(tools, spec, folder / "linear.onnx", folder, folder / "log.txt")
    except deploy.ToolFailed as failure:
        raise SystemExit(f"{failure}:\n{toolchain.log_tail(folder / 'log.txt', 15)}") from None
    profile = folder / "compiler_profile_0.txt"
    return {"total_cycle": deploy.read_total_cycle(profile), "loaded_mb": round(loaded_bytes(profile) / 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", action="append", choices=("w4bf16", "bf16"), help="default: both")
    parser.add_argument("--json", help="where to write the JSON (default bench/results/chip_matmul.json)")
    args = parser.parse_args()
    results, rows = [], []
    with tempfile.TemporaryDirectory(prefix="graphopt-chip-matmul-") as work:
        for quantize in args.quantize or ["bf16", "w4bf16"]:
            for layer, (k, n) in SHAPES.items():
                floor = SEQ * k * n // MACS_PER_CYCLE
                first = None
                for spelling in SPELLINGS:
                    got = measure(quantize, k, n, spelling, Path(work))
                    first = first or got["total_cycle"]
                    print(f"  {quantize} {layer} {spelling}: {got['total_cycle']:,} cycles", file=sys.stderr)
                    results.append({"quantize": quantize, "layer": layer, "k": k, "n": n, "spelling": spelling,
                                    "compute_floor": floor, **got})
                    rows.append([quantize, layer, spelling, got["total_cycle"], f"{got['total_cycle'] / first - 1:+.1%}",
                                 floor, got["loaded_mb"]])
    table = markdown_table(["mode", "layer", "spelling", "total_cycle", "vs as is", "compute floor", "GDMA loaded MB"], rows)
    publish("chip_matmul", f"One Llama-3.1-8B MLP Linear layer, seq {SEQ}, four spellings", table,
            {"seq_length": SEQ, "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
