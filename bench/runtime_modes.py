"""Every --quantize mode, driven the way the contract's LLM-TPU demo drives the bmodel (issue 17): the
legacy Llama3_1 demo (`--contract llama3_1`, the default here: the figures in RESULTS.md) or today's
Qwen3 demo (`--contract llm-tpu`, mask bits by dtype).

For each mode: `graphopt run MODEL --target bm1684x --quantize MODE`, whose build runs the demo's
programs on the bmodel's own device memory in TPU-MLIR's cmodel (fp16 mask bits 0xF0E2 whatever
the nets' dtype, int32 ids, the demo's copies between nets) for a short prompt and one of 3/4 SEQ,
against onnxruntime under the same driver, and checks the runtime's copies on the file's memory
layout. The table gives, per mode and prompt: whether the greedy tokens are onnxruntime's, where
they first differ and by what margin (a near-tie is allowed), and the memory check's verdict.

    python bench/runtime_modes.py                          # tiny-llama, SEQ 512 (the README's default)
    python bench/runtime_modes.py --contract llm-tpu
    python bench/runtime_modes.py --seq-length 64 --modes w4bf16,bf16 --keep /tmp/modes   # keep the bmodels
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import graphopt_command, markdown_table, measure, publish  # noqa: E402

MODES = ("w4bf16", "w8bf16", "w4f16", "w8f16", "bf16", "f16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--contract", default="llama3_1", choices=("llama3_1", "llm-tpu"))
    parser.add_argument("--keep", help="write the builds into this directory (one per mode) and keep them")
    parser.add_argument("--json", help="where to write the results (default bench/results/runtime_modes.json)")
    args = parser.parse_args()

    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="graphopt-runtime-modes-") as scratch:
        for mode in args.modes.split(","):
            out = Path(args.keep or scratch) / mode
            run = measure(graphopt_command("run", args.model, "--target", "bm1684x", "--quantize", mode,
                                           "--seq-length", str(args.seq_length), "--contract", args.contract,
                                           "--out", str(out)),
                          Path(scratch) / f"{mode}.log")
            report = json.loads((out / "bm1684x.json").read_text()) if (out / "bm1684x.json").is_file() else {}
            problems = report.get("contract_problems", ["no report"])
            for generation in (report.get("generation") or {}).get("runs", []):
                same = "identical" if generation["tokens_identical"] else (
                    f"near-tie at {generation['first_difference']}" if generation["ok"]
                    else f"DIFFER at {generation['first_difference']}")
                margin = generation.get("margin_at_difference")
                rows.append([mode, generation["prompt_length"], len(generation["tokens"]), same,
                             None if margin is None else f"{margin:.3f}", f"{generation['min_logit_cosine']:.5f}",
                             "ok" if not problems else f"{len(problems)} hazard(s)", "ok" if run.ok else "FAIL"])
            results.append({"mode": mode, "run": run, "contract_problems": problems,
                            "generation": report.get("generation")})
    columns = ["mode", "prompt tokens", "new tokens", "simulated demo vs onnxruntime", "top-2 margin",
               "min logit cosine", "memory check", "run"]
    publish("runtime_modes", f"{args.model}, SEQ {args.seq_length}: every mode as the {args.contract} demo drives it",
            markdown_table(columns, rows), {"model": args.model, "seq_length": args.seq_length,
                                            "contract": args.contract, "results": results},
            args.json)
    return 0 if all(r["run"].ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
