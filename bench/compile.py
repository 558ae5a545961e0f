"""bm1684x compile benchmark: per-network TPU-MLIR time at Llama-3.1-8B shape, and --jobs 1 vs all cores.

Each configuration is one `graphopt run MODEL --target bm1684x --random-weights --no-check
--num-layers N` with a fresh net cache (nothing cached). Per network it reports
model_transform and model_deploy seconds and total_cycle (from bm1684x.json). Then it derives
the time of the full model (all layers) from the measured per-network times and the measured
parallel speed-up, and says so.

    python bench/compile.py                                   # 8B shape, 1 layer, w4bf16 + w8bf16, jobs 1 and all cores
    python bench/compile.py --quantize w4bf16 --jobs 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import graphopt_command, markdown_table, measure, publish, remove  # noqa: E402

PER_LAYER = ("block_", "block_cache_")


def run(model: str, layers: int, seq: int, quantize: str, jobs: int, work: Path) -> dict:
    out, cache = work / f"{quantize}-j{jobs}", work / f"nets-{quantize}-j{jobs}"
    remove(out), remove(cache)
    measured = measure(graphopt_command("run", model, "--target", "bm1684x", "--random-weights", "--no-check",
                                        "--num-layers", str(layers), "--seq-length", str(seq), "--quantize", quantize,
                                        "--jobs", str(jobs), "--out", str(out)),
                       work / f"{quantize}-j{jobs}.log", env={"GRAPHOPT_NET_CACHE": str(cache)})
    row = {"quantize": quantize, "jobs": jobs, "measured": measured}
    if measured.ok:
        report = json.loads((out / "report.json").read_text())
        target = json.loads((out / "bm1684x.json").read_text())
        row["stage_seconds"] = report["stage_seconds"]
        row["nets"] = {n["net"]: {"seconds": n["seconds"], "total_cycle": n["total_cycle"], "quantize": n["quantize"]}
                       for n in target["nets"]}
        row["bmodel_bytes"] = target["bmodel_bytes"]
    remove(out), remove(cache)
    return row


def net_seconds(net: dict) -> float:
    return sum(net["seconds"].values())


def full_model_estimate(row: dict, layers: int, total_layers: int, speedup: float, cores: int) -> dict:
    """Serial time of all layers from the per-net times (per-layer nets × total_layers / layers),
    then divided by the speed-up measured between --jobs 1 and --jobs `cores`."""
    nets = row["nets"]
    per_layer = sum(net_seconds(n) for name, n in nets.items() if name.startswith(PER_LAYER)) / layers
    shared = sum(net_seconds(n) for name, n in nets.items() if not name.startswith(PER_LAYER))
    serial = per_layer * total_layers + shared
    return {"per_layer_s": per_layer, "shared_s": shared, "serial_s": serial, "speedup": speedup,
            "cores": cores, "parallel_s": serial / speedup}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--total-layers", type=int, default=32, help="the full model's layers, for the estimate")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--quantize", default="w4bf16,w8bf16")
    parser.add_argument("--jobs", default=f"1,{os.cpu_count()}", help="--jobs values to run (first mode only "
                        "for values other than 1)")
    parser.add_argument("--work", help="scratch directory; logs stay there (default: a new temporary one)")
    parser.add_argument("--json", help="where to write the results (default bench/results/compile.json)")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="graphopt-bench-"))
    modes, jobs = args.quantize.split(","), [int(j) for j in args.jobs.split(",")]
    rows = [run(args.model, args.num_layers, args.seq_length, q, 1, work) for q in modes if 1 in jobs]
    rows += [run(args.model, args.num_layers, args.seq_length, modes[0], j, work) for j in jobs if j != 1]
    ok = [r for r in rows if r["measured"].ok]

    serial = {r["quantize"]: r for r in ok if r["jobs"] == 1}
    names = list(next(iter(serial.values()))["nets"]) if serial else []
    per_net = [[name, *[v for q in serial for v in (serial[q]["nets"][name]["seconds"].get("model_transform"),
                                                     serial[q]["nets"][name]["seconds"].get("model_deploy"),
                                                     serial[q]["nets"][name]["total_cycle"])]]
               for name in names]
    columns = ["net", *[f"{q} {c}" for q in serial for c in ("transform s", "deploy s", "total_cycle")]]
    text = f"Per network, --jobs 1 ({args.num_layers} layer(s)):\n\n" + markdown_table(columns, per_net)

    totals = [[r["quantize"], r["jobs"], round(r["stage_seconds"].get("bm1684x compile", 0), 1),
               r["measured"].wall_s, r["measured"].peak_rss_gb] for r in ok]
    text += "\n\nTotals:\n\n" + markdown_table(["mode", "--jobs", "compile s", "whole run s", "peak RSS GB"], totals)

    estimates = {}
    first = serial.get(modes[0])
    parallel = [r for r in ok if r["quantize"] == modes[0] and r["jobs"] != 1]
    if first and parallel:
        best = max(parallel, key=lambda r: r["jobs"])
        speedup = first["stage_seconds"]["bm1684x compile"] / best["stage_seconds"]["bm1684x compile"]
        for q, r in serial.items():
            estimates[q] = full_model_estimate(r, args.num_layers, args.total_layers, speedup, best["jobs"])
        text += "\n\nDerived, all {} layers (serial per-net time × layers, ÷ the measured {}-job speed-up {:.2f}):\n\n".format(
            args.total_layers, best["jobs"], speedup)
        text += markdown_table(["mode", "per layer s", "embedding + heads s", "serial min", f"{best['jobs']} jobs min"],
                               [[q, round(e["per_layer_s"], 1), round(e["shared_s"], 1), round(e["serial_s"] / 60, 1),
                                 round(e["parallel_s"] / 60, 1)] for q, e in estimates.items()])
    publish("compile", f"bm1684x compile: {args.model}, seq {args.seq_length}", text,
            {"model": args.model, "num_layers": args.num_layers, "seq_length": args.seq_length, "rows": rows,
             "estimates": estimates}, args.json)
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
