"""Decode stages (issue 19): what a decode step costs at each stage of a long-SEQ build, beside the
decode block of a build whose SEQ is that stage's length.

graphopt exports block_cache_0 of `llama3.1-8b` (published config, seeded random weights, layer 0 of
two) at each `--seq-length`, compiles it as `graphopt run --chunk-length` does (stage 0 with
`--save_io_alone_config`, every multiple of the chunk below SEQ as a further stage with
`--use_io_alone_config`), and reads TPU-MLIR's cycle estimate (`total_cycle`) per stage. A short
build (SEQ = the chunk) is compiled too: the issue's goal is that a decode step at a context of
1,000 tokens, which runs the 1024-row stage of a seq-8192 build, costs within 10% of a seq-1024
build's decode step.

    python bench/decode_stages.py                               # seq 2048 and 8192, chunk 1024, w4bf16
    python bench/decode_stages.py --seq-length 8192 --chunk-length 1024 --quantize bf16

Compiled nets are cached (~/.cache/graphopt/bm1684x/nets): a second run only re-reads the cycles.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, publish  # noqa: E402

NET = "block_cache_0"
GOAL = 0.10  # a stage within 10% of the decode step of a build whose SEQ is the stage's length


def export_decode_block(seq: int, folder: Path):
    from graphopt.export import export_networks
    from graphopt.models import open_model
    from graphopt.targets import get_target

    source = open_model("llama3.1-8b", random_weights=True, num_layers=2)  # layer 0: no final norm
    return export_networks(source, [NET], seq, folder / f"seq{seq}", target=get_target("bm1684x"))[NET]


def compile_stages(result, seq: int, chunk: int, quantize: str, group_size: int) -> list[dict]:
    """Stage 0 (SEQ rows) and every further stage of the exported decode block, as the build compiles them."""
    from graphopt.targets.bm1684x import contract, deploy, toolchain
    from graphopt.targets.bm1684x.top_passes import passes_for
    from graphopt import contract as c

    tools = toolchain.require()
    rows = contract.decode_stage_rows(seq, chunk if chunk < seq else None)
    flags = contract.block_flags(quantize, group_size) + contract.DECODE_FLAGS
    if len(rows) > 1:
        flags += ("--save_io_alone_config", contract.IO_ALONE_CONFIG)
    mode = contract.QUANT_MODES[quantize][0]
    first = contract.DeploySpec(NET, NET, tuple(s.shape for s in result.inputs), mode, flags,
                                passes_for(c.BLOCK_CACHE, mode=mode))
    out = []
    done = deploy.deploy_network(tools, first, result.files[0], result.sha256)
    specs = contract.stage_specs(first, [s.name for s in result.inputs], rows,
                                 str(done.directory / contract.IO_ALONE_CONFIG))
    for spec, cache_rows in zip([first, *specs], rows):
        net = done if spec is first else deploy.deploy_network(tools, spec, result.files[0], result.sha256)
        out.append({"seq_length": seq, "stage": spec.stage, "cache_rows": cache_rows, "total_cycle": net.total_cycle,
                    "cached": net.cached})
        print(f"  seq {seq} stage {spec.stage} ({cache_rows} rows) {quantize}: {net.total_cycle:,} cycles "
              f"({'cached' if net.cached else 'compiled'})", file=sys.stderr)
    return out


def main() -> int:
    from graphopt.targets.bm1684x import contract

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, action="append", help="default: 2048 and 8192")
    parser.add_argument("--chunk-length", type=int, default=1024)
    parser.add_argument("--quantize", default="w4bf16", choices=tuple(contract.QUANT_MODES))
    parser.add_argument("--group-size", type=int, default=contract.DEFAULT_GROUP_SIZE)
    parser.add_argument("--json", help="where to write the JSON (default bench/results/decode_stages.json)")
    args = parser.parse_args()
    seqs = args.seq_length or [2048, 8192]
    chunk = args.chunk_length
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphopt-decode-stages-") as work:
        short = compile_stages(export_decode_block(chunk, Path(work)), chunk, chunk, args.quantize, args.group_size)[0]
        stages = [s for seq in seqs for s in compile_stages(export_decode_block(seq, Path(work)), seq, chunk,
                                                           args.quantize, args.group_size)]
    base = short["total_cycle"]
    rows = [[f"seq {s['seq_length']}", s["stage"], s["cache_rows"], f"{s['total_cycle']:,}",
             f"{100 * (s['total_cycle'] - base) / base:+.1f}%" if s["cache_rows"] == chunk else ""] for s in stages]
    rows.append([f"seq {chunk} build", 0, chunk, f"{base:,}", "(the reference)"])
    table = markdown_table(["build", "stage", "cache rows", f"{NET} cycles ({args.quantize})",
                            f"vs the seq-{chunk} build (goal within {GOAL:.0%})"], rows)
    met = all(abs(s["total_cycle"] - base) <= GOAL * base for s in stages if s["cache_rows"] == chunk)
    publish("decode_stages", f"Decode stages, Llama-3.1-8B decode block (layer 0), chunk {chunk}, {args.quantize}"
            f" (goal {'met' if met else 'NOT met'})", table,
            {"chunk_length": chunk, "quantize": args.quantize, "stages": stages, "short_build": short,
             "goal_met": met, "seconds": round(time.perf_counter() - start, 1)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
