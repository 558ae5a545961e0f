"""lm_head's precision (issue 21, `--lm-head {bf16,w8,w4}`): what quantizing the head costs in accuracy and gains
in chip cycles, beside the anchor's choice (today's llm_convert keeps lm_head in 16-bit float: the bf16 row).

For each model, `graphopt run MODEL --target bm1684x --do-sample --lm-head MODE` builds the bmodel (the other
nets are the same in every mode and come from the net cache after the first). With --do-sample lm_head answers
the logits (not the token), so the report's per-net cosine of lm_head against the fp32 ONNX is the logits'
cosine. The blocks are bf16 by default, so the greedy tokens' agreement with fp32 measures the head alone.
The report also gives lm_head's TPU-MLIR cycle estimate and its device memory.

    python bench/lm_head.py                                   # tiny-llama, seq 64, bf16 blocks
    python bench/lm_head.py --model llama3.1-8b --random-weights --num-layers 1 --seq-length 512
        (the 8B head: cycles only; 8B is past what the simulator runs)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import graphopt_command, markdown_table, measure, publish  # noqa: E402

MODES = ("bf16", "w8", "w4")


def run_mode(model: str, mode: str, args, folder: Path) -> dict:
    out = folder / f"{model}-{mode}"
    extra = [*(["--random-weights"] if args.random_weights else []),
             *(["--num-layers", str(args.num_layers)] if args.num_layers else [])]
    measured = measure(graphopt_command("run", model, "--target", "bm1684x", "--quantize", args.quantize,
                                        "--do-sample", "--lm-head", mode, "--seq-length", str(args.seq_length), *extra,
                                        "--out", str(out)), folder / f"{model}-{mode}.log")
    report = json.loads((out / "bm1684x.json").read_text())
    head = next(n for n in report["nets"] if n["net"] == "lm_head")
    runs = (report.get("generation") or {}).get("runs", [])
    return {"model": model, "lm_head": mode, "anchor": mode == "bf16", "quantize": head["quantize"],
            "cycles": head["total_cycle"], "device_mb": round(head["memory"]["total"] / 1e6, 2),
            "logits_cosine_vs_fp32": head.get("worst_fp32", head.get("worst")),
            "greedy_tokens_equal_fp32": (sum(r["fp32_agreement"] for r in runs) / len(runs)) if runs and
            "fp32_agreement" in runs[0] else None,
            "decode_ms_per_token": report["estimate"]["decode_ms_per_token"], "wall_s": measured.wall_s,
            "ok": report["ok"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="registry name (repeatable; default tiny-llama)")
    parser.add_argument("--quantize", default="bf16", help="the blocks' mode (default bf16: the head's loss alone)")
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--json", help="where to write the results (default bench/results/lm_head.json)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-lm-head-") as tmp:
        for model in args.model or ["tiny-llama"]:
            rows += [run_mode(model, mode, args, Path(tmp)) for mode in MODES]
    bf16 = {r["model"]: r["cycles"] for r in rows if r["lm_head"] == "bf16"}
    table = markdown_table(
        ["model", "--lm-head", "lm_head mode", "cycles", "vs bf16 (llm_convert)", "device MB", "logits cosine vs fp32",
         "greedy tokens = fp32", "decode ms/token"],
        [[r["model"], r["lm_head"] + (" (anchor: llm_convert)" if r["anchor"] else ""), r["quantize"],
          f"{r['cycles']:,}", f"{r['cycles'] / bf16[r['model']]:.2f}x", r["device_mb"],
          "-" if r["logits_cosine_vs_fp32"] is None else f"{r['logits_cosine_vs_fp32']:.5f}",
          "-" if r["greedy_tokens_equal_fp32"] is None else f"{r['greedy_tokens_equal_fp32']:.0%}",
          f"{r['decode_ms_per_token']:.3f}"] for r in rows])
    publish("lm_head", "lm_head precision: cycles and accuracy", table, {"rows": rows, "seq_length": args.seq_length,
                                                                        "quantize": args.quantize}, args.json)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
