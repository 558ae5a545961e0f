"""Which transformers architectures graphopt compiles unchanged, and how the others are refused.

Each architecture is built from a tiny config (graphopt's mini sizes) with seeded random weights,
saved with `save_pretrained` and compiled with `graphopt run DIR --target onnx` in its own process,
checks included: every network stage by stage, then greedy generation against transformers.
An outcome is one of
  matches     exit 0: all checks pass, tokens identical to transformers' generate
  checks fail exit 1: graphopt wrote networks whose numbers differ (a bug to fix, or to refuse)
  refused     exit 2: a one-paragraph error (first words shown)
  crash       any other exit: a traceback, i.e. a graphopt bug
  no config   transformers itself cannot build the tiny config

    python bench/architectures.py                      # the default list
    python bench/architectures.py granite cohere       # some
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import graphopt_command, markdown_table, publish  # noqa: E402

ARCHITECTURES = [
    "llama", "qwen2", "qwen3", "mistral",  # the goldens' four
    "phi3", "stablelm", "olmo", "olmo2", "cohere", "granite", "starcoder2", "helium", "glm", "smollm3",
    "nemotron", "exaone4", "ernie4_5", "arcee", "bitnet", "seed_oss", "apertus",
    "gemma", "gemma2", "gemma3_text", "phi", "gpt_neox", "persimmon", "llama4_text", "mixtral", "qwen3_moe",
]
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=1024, max_position_embeddings=2048,
            initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save_tiny(model_type: str, directory: Path) -> str | None:
    """Save the tiny model; return why not when transformers cannot build it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type, **TINY)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    except Exception as error:  # noqa: BLE001 (reported, not raised: this is a survey)
        return f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
    return None


def survey(model_type: str, work: Path) -> dict:
    directory, out = work / model_type, work / f"{model_type}-out"
    why = save_tiny(model_type, directory)
    if why:
        return {"architecture": model_type, "outcome": "no config", "detail": why}
    start = time.perf_counter()
    proc = subprocess.run(graphopt_command("run", str(directory), "--target", "onnx", "--seq-length", "64",
                                           "--jobs", "1", "--out", str(out)), capture_output=True, text=True)
    row = {"architecture": model_type, "seconds": round(time.perf_counter() - start, 1), "exit": proc.returncode}
    if proc.returncode in (0, 1) and (out / "report.json").exists():  # (an uncaught exception also exits 1)
        report = json.loads((out / "report.json").read_text())
        end_to_end = report.get("end_to_end") or {}
        row.update(outcome="matches" if proc.returncode == 0 else "checks fail",
                   detail=f"tokens identical: {end_to_end.get('tokens_identical')}",
                   max_abs_logit_err=end_to_end.get("max_abs_logit_err"))
    elif proc.returncode == 2:
        message = proc.stderr.strip().splitlines()[-1].removeprefix("graphopt: error: ")
        row.update(outcome="refused", detail=message[:160])
    else:
        row.update(outcome="crash", detail=(proc.stderr.strip().splitlines() or [""])[-1][:160])
    return row


def table(rows: list[dict], counts: dict) -> str:
    def err(value):
        return None if value is None else f"{value:.1e}"

    text = markdown_table(["architecture", "outcome", "max logit err vs transformers", "s", "detail"],
                          [[r["architecture"], r["outcome"], err(r.get("max_abs_logit_err")), r.get("seconds"),
                            r["detail"]] for r in rows])
    return text + "\n\n" + ", ".join(f"{o}: {n}" for o, n in counts.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("architectures", nargs="*", default=ARCHITECTURES, help="transformers model_type names")
    parser.add_argument("--json", help="where to write the JSON (default: bench/results/architectures.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graphopt-arch-") as work:
        rows = []
        for model_type in args.architectures:
            rows.append(survey(model_type, Path(work)))
            print(f"{model_type}: {rows[-1]['outcome']}", file=sys.stderr, flush=True)
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("matches", "checks fail", "refused", "crash", "no config")}
    publish("architectures", "Architectures through graphopt's passes (tiny configs, onnx target)", table(rows, counts),
            {"rows": rows, "counts": counts}, args.json)
    return 1 if counts["checks fail"] or counts["crash"] else 0


if __name__ == "__main__":
    sys.exit(main())
