"""Build speed side by side (issue 22): graphopt and TPU-MLIR's own llm_convert on the same checkpoint, on
this machine, with the same number of compile jobs, in one run: wall time, CPU seconds (user, and system: the
kernel's, mostly zeroing fresh memory on the dev VM), per-net seconds, peak memory of the process tree, disk
written.

The checkpoint is Llama-3.1-8B's shape with --num-layers layers and seeded random weights (N(0, 0.02), norms
1), saved in bf16 with transformers' save_pretrained; config.json gets the legacy `torch_dtype`, `rope_theta`
and `rope_scaling` keys Meta's file has, which llm_convert reads.

llm_convert comes with the toolchain graphopt installs (its venv's bin first on PATH, as its deploy scripts'
`#!/usr/bin/env python3` need). It runs its model_deploy calls through GNU parallel (`apt-get install
parallel`) with a hard-coded `-j max(cpu_count, 4)`; this bench puts a `parallel` of its own first on PATH
that replaces that -j with --jobs and adds a --joblog (each net's seconds). llm_convert itself is not changed.
graphopt runs with `--jobs` alike, with a fresh net cache, and with its checks (as a user runs it).

    python bench/build_vs_llm_convert.py                      # 1 layer, seq 512, w4bf16, 1 job each
    python bench/build_vs_llm_convert.py --num-layers 32 --jobs 2 --tools graphopt --random-weights \
        --json bench/results/build_full_8b.json                # the full model, graphopt alone
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graphopt.machine import HUGE_PAGE_MALLOC  # noqa: E402
from harness import directory_bytes, graphopt_command, markdown_table, measure, publish, remove  # noqa: E402

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                   num_key_value_heads=8, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}

# GNU parallel with llm_convert's -j and --joblog replaced: -j $BENCH_JOBS, a joblog per call in $BENCH_JOBLOG_DIR
# (llm_convert's own task.txt.log is overwritten by its second, empty, call).
PARALLEL_WRAPPER = """#!/usr/bin/env bash
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--joblog) shift; [ "$1" = "${1#-}" ] || continue ;;  # llm_convert's -j N and --joblog F: ours below
    -j*|--jobs=*) ;;
    *) args+=("$1") ;;
  esac
  shift
done
exec /usr/bin/parallel -j "$BENCH_JOBS" --joblog "$BENCH_JOBLOG_DIR/joblog-$$-$RANDOM" "${args[@]}"
"""


def write_checkpoint(folder: Path, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(**LLAMA_31_8B, num_hidden_layers=layers, rope_theta=500000.0, rope_scaling=ROPE)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: the full model's fp32 copy (32 GB) would not fit
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02)
    model.save_pretrained(folder, max_shard_size="1GB")
    values = json.loads((folder / "config.json").read_text())
    values.update(torch_dtype="bfloat16", rope_theta=500000.0, rope_scaling=ROPE)
    (folder / "config.json").write_text(json.dumps(values, indent=2) + "\n")
    return folder


def toolchain_bin() -> Path:
    from graphopt.targets.bm1684x import toolchain

    return toolchain.require().python.parent


def run_llm_convert(checkpoint: Path, seq: int, quantize: str, jobs: int, work: Path, huge_pages: bool = False) -> dict:
    """`huge_pages`: with the glibc tunable graphopt gives its own tools (graphopt.machine.HUGE_PAGE_MALLOC)."""
    out, wrap, joblogs = work / "llm_convert", work / "wrap", work / "joblogs"
    remove(out), remove(joblogs)
    wrap.mkdir(parents=True, exist_ok=True)
    joblogs.mkdir(parents=True)
    (wrap / "parallel").write_text(PARALLEL_WRAPPER)
    (wrap / "parallel").chmod(0o755 | stat.S_IXUSR)
    venv_bin = toolchain_bin()
    env = {"PATH": f"{wrap}:{venv_bin}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv_bin.parent),
           "BENCH_JOBS": str(jobs), "BENCH_JOBLOG_DIR": str(joblogs)}
    if huge_pages:
        env["GLIBC_TUNABLES"] = HUGE_PAGE_MALLOC
    measured = measure([str(venv_bin / "llm_convert.py"), "-m", str(checkpoint), "-s", str(seq), "-q", quantize,
                        "-g", "64", "-c", "bm1684x", "-o", str(out)], work / "llm_convert.log", env=env)
    bmodels = sorted(out.rglob("*.bmodel"))
    final = [b for b in bmodels if b.parent == out or "_1dev" in b.name]
    row = {"tool": "llm_convert" + (" (huge-page malloc)" if huge_pages else ""), "measured": measured, "disk_bytes": directory_bytes(out),
           "bmodel_bytes": final[0].stat().st_size if final else None, "nets": joblog_seconds(joblogs)}
    remove(out)
    return row


def joblog_seconds(folder: Path) -> dict[str, float]:
    """{net: model_deploy seconds} from GNU parallel's joblogs (JobRuntime, and the command's --model N.bmodel)."""
    seconds = {}
    for log in folder.glob("joblog-*"):
        for line in log.read_text().splitlines()[1:]:
            fields = line.split("\t")
            found = re.search(r"--model\s+(\S+?)\.bmodel", fields[-1]) if len(fields) > 8 else None
            if found:
                seconds[Path(found.group(1)).name] = float(fields[3])
    return seconds


def run_graphopt(checkpoint: Path | str, seq: int, quantize: str, jobs: int, work: Path,
                 max_memory: float | None = None, keep: bool = False) -> dict:
    out, cache = work / "graphopt", work / "graphopt-nets"
    remove(out), remove(cache)
    model = ["llama3.1-8b", "--random-weights", "--num-layers", checkpoint.split(":")[1]] \
        if isinstance(checkpoint, str) else [str(checkpoint)]
    cap = ["--max-memory", f"{max_memory:g}"] if max_memory else []
    measured = measure(graphopt_command("run", *model, "--target", "bm1684x", "--quantize", quantize,
                                        "--seq-length", str(seq), "--jobs", str(jobs), *cap, "--out", str(out)),
                       work / "graphopt.log", env={"GRAPHOPT_NET_CACHE": str(cache)})
    row = {"tool": f"graphopt {' '.join(cap)}".strip(), "measured": measured,
           "disk_bytes": directory_bytes(out) + directory_bytes(cache)}
    if measured.ok:
        report, target = (json.loads((out / f).read_text()) for f in ("report.json", "bm1684x.json"))
        row.update(bmodel_bytes=target["bmodel_bytes"], stage_seconds=report["stage_seconds"],
                   nets={n["net"]: sum(n["seconds"].values()) for n in target["nets"]},
                   schedule=target.get("schedule"), disk=report.get("disk"), checks_ok=report["ok"])
    if not keep:
        remove(out), remove(cache)
    return row


def _net_order(name: str):
    """embedding, the blocks by layer, then the heads."""
    layer = re.search(r"_(\d+)$", name)
    return (0 if name.startswith("embedding") else 2 if layer is None else 1, int(layer.group(1)) if layer else 0, name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--quantize", default="w4bf16")
    parser.add_argument("--jobs", type=int, default=1, help="compile jobs, the same for both (llm_convert's -j)")
    parser.add_argument("--tools", default="llm_convert,llm_convert_huge_pages,graphopt",
                        help="which to run, in order: llm_convert as a user runs it, llm_convert_huge_pages (with the "
                        "malloc setting graphopt gives its own tools), graphopt")
    parser.add_argument("--random-weights", action="store_true", help="graphopt runs the registry's llama3.1-8b "
                        "with --random-weights (same shape and distribution, no checkpoint read) instead of the "
                        "checkpoint llm_convert reads")
    parser.add_argument("--max-memory", type=float, metavar="GIB", help="graphopt's --max-memory (default: none)")
    parser.add_argument("--keep-output", action="store_true", help="leave graphopt's --out and net cache in --work "
                        "(to measure its stages again by hand: model_tool --combine, the memory check's load)")
    parser.add_argument("--work", help="scratch directory; the checkpoint and logs stay there (default: a new one)")
    parser.add_argument("--json", help="where to write the results (default bench/results/build_vs_llm_convert.json)")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="graphopt-bench-build-"))
    tools = args.tools.split(",")
    checkpoint = write_checkpoint(work / f"llama3.1-8b-shape-{args.num_layers}l", args.num_layers) \
        if any(t.startswith("llm_convert") for t in tools) or not args.random_weights else None
    random = f"random:{args.num_layers}"
    runners = {"llm_convert": run_llm_convert,
               "llm_convert_huge_pages": lambda *a: run_llm_convert(*a, huge_pages=True),
               "graphopt": lambda *a: run_graphopt(*a, max_memory=args.max_memory, keep=args.keep_output)}
    rows = [runners[tool](random if tool == "graphopt" and args.random_weights else checkpoint, args.seq_length,
                          args.quantize, args.jobs, work) for tool in tools]
    by_tool = {r["tool"]: r for r in rows}

    table = markdown_table(
        ["tool", "wall s", "CPU s, user", "CPU s, system", "peak memory GiB (tree)", "largest process GiB",
         "disk written GB", "bmodel MB", "ok"],
        [[r["tool"], r["measured"].wall_s, r["measured"].cpu_user_s, r["measured"].cpu_system_s,
          r["measured"].peak_rss_gb, r["measured"].peak_process_rss_gb,
          round(r["disk_bytes"] / 1e9, 2), round((r.get("bmodel_bytes") or 0) / 1e6, 1), r["measured"].ok]
         for r in rows])
    names = sorted({n for r in rows for n in r.get("nets", {})}, key=_net_order)
    table += "\n\nPer net, seconds (llm_convert: model_deploy; graphopt: model_transform + model_deploy):\n\n"
    table += markdown_table(["net", *by_tool], [[n, *[round(r.get("nets", {}).get(n, 0), 1) or None
                                                      for r in by_tool.values()]] for n in names])
    graphopt = next((r for r in rows if r["tool"].startswith("graphopt")), {})
    if "stage_seconds" in graphopt:
        table += "\n\ngraphopt's stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in graphopt["stage_seconds"].items())
        table += f"\n\ngraphopt's compile schedule: {graphopt.get('schedule')}"
    publish("build_vs_llm_convert", f"Build, llm_convert vs graphopt: Llama-3.1-8B shape, {args.num_layers} layer(s), "
            f"seq {args.seq_length}, {args.quantize}, {args.jobs} job(s) each", table,
            {"num_layers": args.num_layers, "seq_length": args.seq_length, "quantize": args.quantize,
             "jobs": args.jobs, "rows": rows, "work": str(work)}, args.json)
    return 0 if all(r["measured"].ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
