"""Export benchmark: graphopt against the whole-model baseline, in the same run.

graphopt: `graphopt run MODEL --target onnx --random-weights --no-check` (weights made per
network, one network's weights in memory at a time). Baseline: `baseline_whole_model.py`
(the whole model in fp32, then torch.onnx.export per network, as LLM-TPU does). Both write every
network of the model; the table gives wall time, peak RSS and the ONNX bytes written.

    python bench/export.py                         # llama3.1-8b, all 32 layers, seq 512
    python bench/export.py --num-layers 2 --work /tmp/bench

The full 8B baseline needs over 32 GB of RAM; the 8B ONNX needs about 32 GB of disk for
graphopt's output (block_cache_i reads block_i's weight file) and the baseline deletes each
file after writing it (`--discard`) to fit next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO, Measured, directory_bytes, graphopt_command, markdown_table, measure, publish, remove  # noqa: E402


def run_graphopt(model: str, layers: int | None, seq: int, work: Path, jobs: int | None = None) -> dict:
    out = work / "graphopt"
    remove(out)
    extra = ["--num-layers", str(layers)] if layers else []
    extra += ["--jobs", str(jobs)] if jobs else []
    measured = measure(graphopt_command("run", model, "--target", "onnx", "--random-weights", "--no-check",
                                        "--seq-length", str(seq), "--out", str(out), *extra),
                       work / "graphopt.log")
    row = {"flow": "graphopt", "measured": measured}
    if measured.ok:
        report = json.loads((out / "report.json").read_text())
        row["stage_seconds"] = report["stage_seconds"]
        row["networks"] = len(report["networks"])
        row["export"] = report["export"]
        row["flow"] = f"graphopt ({report['export']['processes']} process{'es' if report['export']['processes'] > 1 else ''})"
        row["onnx_bytes"] = directory_bytes(out)
    remove(out)
    return row


def run_baseline(model: str, layers: int | None, seq: int, work: Path, networks: int | None = None) -> dict:
    out, stats = work / "baseline", work / "baseline-stats.json"
    remove(out)
    extra = ["--num-layers", str(layers)] if layers else []
    extra += ["--networks", str(networks)] if networks else []
    measured = measure([sys.executable, str(REPO / "bench" / "baseline_whole_model.py"), model, "--out", str(out),
                        "--seq-length", str(seq), "--discard", "--stats", str(stats), *extra],
                       work / "baseline.log", env={"PYTHONPATH": str(REPO)})
    row = {"flow": "whole-model baseline", "measured": measured}
    if measured.ok:
        data = json.loads(stats.read_text())
        row["stage_seconds"] = data["seconds"]
        row["onnx_bytes"] = data["onnx_bytes"]
        row["networks"] = data["networks"]
        missing = data["networks_total"] - len(data["networks"])
        if missing:  # stopped early: the rest at the mean of the measured networks (blocks dominate both)
            mean = sum(data["networks"].values()) / len(data["networks"])
            row["extrapolated_wall_s"] = round(measured.wall_s + missing * mean, 1)
            row["extrapolated_onnx_bytes"] = data["onnx_bytes"] / len(data["networks"]) * data["networks_total"]
    remove(out)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--num-layers", type=int, help="first N layers only (default: all)")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--work", help="scratch directory; logs stay there (default: a new temporary one)")
    parser.add_argument("--flows", default="graphopt,baseline", help="which flows to run (comma-separated)")
    parser.add_argument("--graphopt-jobs", type=int, help="graphopt's --jobs (default: its own choice)")
    parser.add_argument("--baseline-networks", type=int, help="stop the baseline after this many networks and "
                        "extrapolate the rest (for machines that cap one command's time)")
    parser.add_argument("--merge", nargs="*", default=[], help="earlier export JSONs whose rows join the table "
                        "(for machines that cap one command's time: run each flow on its own, then merge)")
    parser.add_argument("--json", help="where to write the results (default bench/results/export.json)")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="graphopt-bench-"))  # keeps the logs; outputs are removed
    flows = {"graphopt": lambda *a: run_graphopt(*a, jobs=args.graphopt_jobs),
             "baseline": lambda *a: run_baseline(*a, networks=args.baseline_networks)}
    rows = [flows[name](args.model, args.num_layers, args.seq_length, work) for name in args.flows.split(",") if name]
    machines = []
    for earlier in args.merge:
        data = json.loads(Path(earlier).read_text())
        rows += [dict(row, measured=Measured(**row["measured"])) for row in data["rows"]]
        machines.append(data["machine"])
    if not rows:
        parser.error("nothing to show: run a flow or --merge earlier results")

    def wall(row) -> float:
        return row.get("extrapolated_wall_s", row["measured"].wall_s)

    baseline = next((row for row in rows if row["flow"] == "whole-model baseline"), None)
    table = []
    for row in rows:
        m, stages = row["measured"], row.get("stage_seconds", {})
        how = (f"{m.wall_s:,.0f} for {len(row['networks'])} of the networks; all: {wall(row):,.0f} (extrapolated)"
               if "extrapolated_wall_s" in row else m.wall_s if m.ok else f"failed ({m.returncode})")
        table.append([row["flow"], how, m.peak_rss_gb, round(stages["load"], 1) if "load" in stages else None,
                      round(row.get("extrapolated_onnx_bytes", row.get("onnx_bytes", 0)) / 1e9, 2),
                      round(wall(baseline) / wall(row), 1) if baseline else None])
    columns = ["flow", "wall s", "peak memory GB (all processes, PSS)", "of which load s", "ONNX GB", "× faster than baseline"]
    layers = f"{args.num_layers} layers" if args.num_layers else "all layers"
    publish("export", f"Export: {args.model}, {layers}, seq {args.seq_length}", markdown_table(columns, table),
            {"model": args.model, "num_layers": args.num_layers, "seq_length": args.seq_length, "rows": rows,
             **({"machine": machines[0]} if machines and not args.flows else {})},
            args.json)
    return 0 if all(r["measured"].ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
