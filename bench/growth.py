"""Cost growth: graphopt's export time and peak RSS against the number of layers and the seq length.

Each point is one `graphopt run MODEL --target onnx --random-weights --no-check` in its own
process (so its peak RSS is its own). Layers sweep at seq 512; seq sweep at --seq-sweep-layers
layers. A least-squares line through the layer sweep gives seconds per layer and its fit.

    python bench/growth.py                                  # llama3.1-8b: layers 2..32, seq 256..2048
    python bench/growth.py --layers 1,2 --seqs 128,256      # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import directory_bytes, graphopt_command, markdown_table, measure, publish, remove  # noqa: E402


def point(model: str, layers: int, seq: int, work: Path, jobs: int) -> dict:
    out = work / f"l{layers}-s{seq}"
    measured = measure(graphopt_command("run", model, "--target", "onnx", "--random-weights", "--no-check",
                                        "--num-layers", str(layers), "--seq-length", str(seq), "--jobs", str(jobs),
                                        "--out", str(out)),
                       work / f"l{layers}-s{seq}.log")
    row = {"layers": layers, "seq": seq, "measured": measured}
    if measured.ok:
        report = json.loads((out / "report.json").read_text())
        row["stage_seconds"] = report["stage_seconds"]
        row["networks"] = len(report["networks"])
        row["onnx_bytes"] = directory_bytes(out)
    remove(out)
    return row


def linear_fit(x: list[float], y: list[float]) -> dict:
    slope, intercept = np.polyfit(x, y, 1)
    predicted = slope * np.asarray(x) + intercept
    total = float(np.sum((np.asarray(y) - np.mean(y)) ** 2))
    r2 = 1.0 - float(np.sum((np.asarray(y) - predicted) ** 2)) / total if total else 1.0
    return {"per_unit": float(slope), "intercept": float(intercept), "r2": r2}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--layers", type=_ints, default=[2, 4, 8, 16, 32])
    parser.add_argument("--seqs", type=_ints, default=[256, 512, 1024, 2048])
    parser.add_argument("--seq-sweep-layers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="graphopt's --jobs (default 1: the cost of the work "
                        "itself, not of the machine's parallelism)")
    parser.add_argument("--work", help="scratch directory; logs stay there (default: a new temporary one)")
    parser.add_argument("--json", help="where to write the results (default bench/results/growth.json)")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="graphopt-bench-"))
    by_layers = [point(args.model, n, 512, work, args.jobs) for n in args.layers]
    by_seq = [point(args.model, args.seq_sweep_layers, s, work, args.jobs) for s in args.seqs]
    ok = [r for r in by_layers if r["measured"].ok]
    fits = {}
    if len(ok) >= 2:
        fits["wall_s_vs_layers"] = linear_fit([r["layers"] for r in ok], [r["measured"].wall_s for r in ok])
        fits["rss_gb_vs_layers"] = linear_fit([r["layers"] for r in ok], [r["measured"].peak_rss_gb for r in ok])

    def rows(points, key):
        first = points[0]["measured"].wall_s
        return [[p[key], p["measured"].wall_s if p["measured"].ok else "failed", round(p["measured"].wall_s / first, 2),
                 round(p["measured"].wall_s / p["networks"], 2) if "networks" in p else None, p["measured"].peak_rss_gb,
                 round(p.get("onnx_bytes", 0) / 1e9, 2)] for p in points]

    columns = ["wall s", "× first", "s per network", "peak memory GB", "ONNX GB"]
    text = markdown_table(["layers (seq 512)", *columns], rows(by_layers, "layers"))
    if fits:
        w, r = fits["wall_s_vs_layers"], fits["rss_gb_vs_layers"]
        text += (f"\n\nLeast squares: wall = {w['per_unit']:.2f} s/layer × layers + {w['intercept']:.1f} s "
                 f"(R² {w['r2']:.4f}); peak RSS = {r['per_unit']:.3f} GB/layer × layers + {r['intercept']:.2f} GB "
                 f"(R² {r['r2']:.4f}).")
    text += "\n\n" + markdown_table([f"seq ({args.seq_sweep_layers} layers)", *columns], rows(by_seq, "seq"))
    publish("growth", f"Cost growth: {args.model}, --jobs {args.jobs}", text,
            {"model": args.model, "jobs": args.jobs, "by_layers": by_layers, "by_seq": by_seq, "fits": fits}, args.json)
    return 0 if all(p["measured"].ok for p in by_layers + by_seq) else 1


if __name__ == "__main__":
    sys.exit(main())
