"""The end-of-run report: what was produced, where, how long each stage took, the checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from graphopt.compiler import CompileResult


def _size(files: list[Path]) -> str:
    total = sum(f.stat().st_size for f in files)
    return f"{total / 1e6:.1f} MB" if total >= 1e6 else f"{total / 1e3:.0f} kB"


def pass_changes(result: CompileResult) -> dict[str, dict[str, list[int]]]:
    """{stage: {pass: what it changed on each network it ran on}}, in pipeline order (the target's top
    passes from its own result)."""
    pipeline = result.manifest.get("pipeline", {})
    changes = {stage: {name: [] for name in names} for stage, names in pipeline.items()}
    for net in result.networks:
        for record in net.passes:
            for stage in changes:
                if record.pass_name in changes[stage]:
                    changes[stage][record.pass_name].append(record.changed)
    target_changes = getattr(result.target, "pass_changes", None)
    if target_changes:
        for name, counts in target_changes().items():
            changes.setdefault("top", {})[name] = counts
    return changes


def _pass_lines(result: CompileResult) -> list[str]:
    lines, idle = ["  passes: changes per pass (networks it changed / networks it ran on)"], []
    for stage, passes in pass_changes(result).items():
        cells = []
        for name, counts in passes.items():
            cells.append(f"{name} {sum(counts)} ({sum(1 for n in counts if n)}/{len(counts)})" if counts else
                         f"{name} (no network of its kinds)")
            if counts and not any(counts):
                idle.append(name)
        if cells:
            lines.append(f"    {stage + ':':<5} " + ", ".join(cells))
    if idle:
        lines.append(f"    changed nothing on any network: {', '.join(idle)}")
    return lines


def _export_reuse_lines(result: CompileResult) -> list[str]:
    """How many networks were exported, and whose model the others took (export_reuse.py)."""
    taken = Counter(net.onnx_from for net in result.networks if net.onnx_from)
    if not taken:
        return []
    exported = len(result.networks) - sum(taken.values())
    return [f"  onnx export: ran for {exported} of {len(result.networks)} networks; the others' model taken from a "
            "network of the same graph (" + ", ".join(f"{name}'s: {n}" for name, n in taken.items()) + ")"]


def render(result: CompileResult, wall_seconds: float) -> str:
    out = result.out_dir
    lines = [f"graphopt: {len(result.networks)} networks of {result.manifest['model']['name']} "
             f"(seq {result.manifest['seq_length']}) in {out}", ""]
    lines.append(f"  {'network':<22} {'file size':>10} {'seconds':>8}  {'check (max abs err)':<40}")
    for net in result.networks:
        files = [out / f.name for f in net.files]
        checks = ", ".join(f"{'ok' if c.ok else 'FAIL'} {c.max_abs_err:.1e}" for c in net.checks) or "-"
        lines.append(f"  {net.name:<22} {_size(files):>10} {sum(net.seconds.values()):8.1f}  {checks:<40}")
    lines.append("")
    if "ray" in result.export:
        lines.append(f"  export: {result.export['ray']}, {result.export['wall_seconds']:.1f}s wall "
                     "(the per-network and per-stage seconds are each task's own, summed)")
    elif result.export.get("processes", 1) > 1:
        lines.append(f"  export: {result.export['processes']} processes, {result.export['wall_seconds']:.1f}s wall "
                     "(the per-network and per-stage seconds are each process's own, summed)")
        if "schedule" in result.export:  # the weight groups, run together as their planned peaks fit
            lines.append(f"    weight groups: {result.export['schedule']}")
    lines += _export_reuse_lines(result)
    lines += _pass_lines(result)
    lines.append("  stages: " + ", ".join(f"{stage} {s:.1f}s" for stage, s in result.seconds.items())
                 + f"; total {wall_seconds:.1f}s")
    if result.disk is not None:
        lines.append(result.disk.report_line())
    for prefix, what in (("decode vs prefill (", "decode blocks vs their prefill blocks, same weights"),
                         ("history chunk vs prefill (", "history-KV chunks (block_kv_i) vs their prefill blocks")):
        checked = [(net.name, c) for net in result.networks for c in net.checks if c.stage.startswith(prefix)]
        if checked:
            worst_name, worst = max(checked, key=lambda nc: (not nc[1].ok, nc[1].max_abs_err))
            failed = [name for name, c in checked if not c.ok]
            lines.append(f"  {what}, {worst.stage[len(prefix):-1]}: {len(checked) - len(failed)} of {len(checked)} ok, "
                         f"max abs err {worst.max_abs_err:.1e} ({worst_name})" + (f"; FAIL: {', '.join(failed)}" if failed else ""))
    if result.end_to_end:
        e2e = result.end_to_end
        lines.append(f"  end to end vs the reference (transformers generate, or your model's forward): {len(e2e['tokens'])} greedy tokens "
                     f"{'identical' if e2e['tokens_identical'] else 'DIFFER'}, "
                     f"max logit error {e2e['max_abs_logit_err']:.1e}")
        if chat := e2e.get("chat"):
            turns = chat["turns"]
            lines.append(f"  three-turn chat (history-KV) vs a full prefill of the conversation at each turn: "
                         f"{sum(t['tokens_identical'] for t in turns)} of {len(turns)} turns' tokens identical "
                         f"(conversation {', '.join(str(t['prompt_length']) for t in turns)} tokens), max logit error "
                         f"{max(t['max_abs_logit_err'] for t in turns):.1e}")
        if sampled := e2e.get("sampled"):
            lines.append(f"  sampled (sample_head, {sampled['sampling']}): {len(sampled['tokens'])} draws "
                         f"from transformers' distribution: probability error {sampled['max_prob_err']:.1e}, logit "
                         f"error {sampled['max_abs_logit_err']:.1e}" + ("" if sampled["ok"] else "  FAIL"))
    if result.config_folder is not None:
        lines.append(result.config_folder.report_line())
    if result.target is not None:
        lines += result.target.report_lines()
        lines.append("")
    if not any(net.checks for net in result.networks):
        lines.append("  checks: skipped (--no-check)")
    else:
        lines.append(f"  checks: {'all passed' if result.ok else 'SOME FAILED'}   "
                     f"(stage-by-stage errors: {out / 'report.json'})")
    return "\n".join(lines)


def write_json(result: CompileResult, wall_seconds: float) -> Path:
    data = {
        "out_dir": str(result.out_dir),
        "wall_seconds": wall_seconds,
        "stage_seconds": result.seconds,
        "ok": result.ok,
        "networks": [{"name": n.name, "seconds": n.seconds, "onnx_from": n.onnx_from,
                      "checks": [c.to_json() for c in n.checks],
                      "passes": [{"pass": p.pass_name, "changed": p.changed, "note": p.note, "seconds": p.seconds}
                                 for p in n.passes]}
                     for n in result.networks],
        "pass_changes": pass_changes(result),
        "end_to_end": result.end_to_end,
        "export": result.export,
        "disk": result.disk.to_json() if result.disk is not None else None,
        "config_folder": result.config_folder.to_json() if result.config_folder is not None else None,
        "target": result.target.to_json() if result.target is not None else None,
    }
    path = result.out_dir / "report.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path

