"""Chip cycles of one Llama-3.1-8B-shaped layer, against the hand-patched reference flow (issue 8).

graphopt exports block_0 and block_cache_0 of `llama3.1-8b` (published config, seeded random
weights, one layer, seq 512) through the bm1684x pipelines, compiles each with the contract's
model_deploy flags for w4bf16 and bf16, and reads TPU-MLIR's cycle estimate (`total_cycle`, the
last line of model_deploy's compiler_profile_0.txt). It prints them beside the figures measured
for LLM-TPU's patched modeling_llama.py exported at opset 15 (TPU-MLIR 1.30.2, same shape),
and the issue's goals (about 15% under the reference).

    python bench/chip_cycles.py                     # w4bf16 and bf16
    python bench/chip_cycles.py --quantize w4bf16 --pass-file examples/passes/fold_attention_scale.py
    python bench/chip_cycles.py --without clamp-mask --label "without clamp-mask" --json /tmp/before.json

Compiled nets are cached by their ONNX hash and flags (~/.cache/graphopt/bm1684x/nets): a second
run with the same passes only re-reads the cycles.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, publish  # noqa: E402

# LLM-TPU's flow, measured on these machines (issue 8): TorchScript export at opset 15, TPU-MLIR 1.30.2.
REFERENCE = {("block_0", "w4bf16"): 18_259_253, ("block_cache_0", "w4bf16"): 2_348_380,
             ("block_0", "bf16"): 26_802_652, ("block_cache_0", "bf16"): 7_647_608}
GOALS = {("block_0", "w4bf16"): 16_000_000, ("block_cache_0", "w4bf16"): 2_000_000,
         ("block_0", "bf16"): 0.85 * 26_802_652, ("block_cache_0", "bf16"): 0.85 * 7_647_608}
NETS = ("block_0", "block_cache_0")


def export_layer(seq: int, folder: Path, plugins, without: tuple[str, ...] = ()) -> dict:
    import dataclasses

    from graphopt.models import open_model
    from graphopt.plugins import with_plugins
    from graphopt.targets import get_target
    from graphopt.export import export_networks

    target = with_plugins(get_target("bm1684x"), plugins) if plugins else get_target("bm1684x")
    target = dataclasses.replace(target, fx_pipeline=tuple(p for p in target.fx_pipeline if p not in without))
    # Two layers, layer 0 exported: a block that is not the last, so it holds no final norm in either
    # contract (llm-tpu moves the final norm into the last layer's nets). Weights are seeded per name,
    # so layer 0 is the same as in a one-layer model.
    source = open_model("llama3.1-8b", random_weights=True, num_layers=2)
    return export_networks(source, list(NETS), seq, folder, target=target)


def layer_spec(result, quantize: str, group_size: int, passes: tuple[str, ...], extra_flags=()):
    """The contract's DeploySpec for an exported block or decode block (`result`), plus `extra_flags`."""
    from graphopt.targets.bm1684x import contract

    flags = contract.block_flags(quantize, group_size) + (contract.DECODE_FLAGS if "cache" in result.name else ())
    return contract.DeploySpec(result.name, result.name, tuple(s.shape for s in result.inputs),
                               contract.QUANT_MODES[quantize][0], flags + tuple(extra_flags), passes)


def compile_nets(results: dict, quantize: str, group_size: int, passes: tuple[str, ...]) -> dict:
    from graphopt.targets.bm1684x import deploy, toolchain

    tools = toolchain.require()
    rows = {}
    for name in NETS:
        result = results[name]
        spec = layer_spec(result, quantize, group_size, passes)
        start = time.perf_counter()
        net = deploy.deploy_network(tools, spec, result.files[0], result.sha256)
        rows[name] = {"total_cycle": net.total_cycle, "cached": net.cached, "seconds": round(time.perf_counter() - start, 1),
                      "memory": net.memory, "cache_dir": str(net.directory),
                      "top_passes": {r["pass"]: r["summary"] for r in net.top_passes}}
        print(f"  {name} {quantize}: {net.total_cycle:,} cycles ({'cached' if net.cached else 'compiled'})",
              file=sys.stderr)
    return rows


def main() -> int:
    from graphopt.targets.bm1684x import contract

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", action="append", choices=("w4bf16", "bf16"), help="default: both")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=contract.DEFAULT_GROUP_SIZE)
    parser.add_argument("--pass-file", action="append", default=[], help="user passes to add (graphopt run's)")
    parser.add_argument("--no-top-passes", action="store_true", help="compile without the top passes (before/after)")
    parser.add_argument("--without", action="append", default=[], help="leave this FX pass out (a pass's before/after)")
    parser.add_argument("--label", default="graphopt", help="the row label (e.g. the pass set measured)")
    parser.add_argument("--json", help="where to write the JSON (default bench/results/chip_cycles.json)")
    args = parser.parse_args()
    from graphopt.plugins import PassPlugins
    from graphopt.targets.bm1684x.top_passes import TOP_PIPELINE

    passes = () if args.no_top_passes else TOP_PIPELINE
    plugins = PassPlugins(tuple(args.pass_file)) if args.pass_file else None
    with tempfile.TemporaryDirectory(prefix="graphopt-chip-cycles-") as work:
        start = time.perf_counter()
        results = export_layer(args.seq_length, Path(work), plugins, tuple(args.without))
        exported = time.perf_counter() - start
        modes = {q: compile_nets(results, q, args.group_size, passes) for q in (args.quantize or ["w4bf16", "bf16"])}
    rows = []
    for quantize, nets in modes.items():
        for name, net in nets.items():
            ref, goal = REFERENCE[(name, quantize)], GOALS[(name, quantize)]
            cycles = net["total_cycle"]
            rows.append([name, quantize, f"{ref:,}", f"{cycles:,}", f"{100 * (cycles - ref) / ref:+.1f}%",
                         f"≤ {goal:,.0f}", "met" if cycles <= goal else "not met"])
    table = markdown_table(["net", "mode", "reference flow cycles", f"{args.label} cycles", "vs reference", "goal",
                            "goal met"], rows)
    publish("chip_cycles", f"Chip cycles, Llama-3.1-8B shape, 1 layer, seq {args.seq_length} ({args.label})", table,
            {"seq_length": args.seq_length, "label": args.label, "pass_files": args.pass_file, "top_passes": list(passes),
             "without": args.without,
             "export_seconds": round(exported, 1), "nets": modes, "reference": {f"{n} {q}": v for (n, q), v in REFERENCE.items()}},
            args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
