"""The bm1684x build, after the ONNX networks are written: compile each network of the
contract with TPU-MLIR, combine them into one bmodel, check the bmodel in the simulator."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt import contract as c
from graphopt.disk import DiskNeed
from graphopt.errors import GraphoptError
from graphopt.targets.bm1684x import codes_check, contract, deploy, fake_quant, inspect_bmodel, toolchain, verify
from graphopt.targets.bm1684x.simulator import Simulator
from graphopt.targets.bm1684x.top_passes import TOP_PIPELINE

REPORT = "bm1684x.json"


@dataclass
class Bm1684xResult:
    bmodel: str  # file name in the output directory
    bmodel_bytes: int
    quantize: str
    toolchain: str
    jobs: int | None
    nets: list[dict]
    seconds: dict[str, float]
    generation: dict | None = None
    sim_skipped: str = ""
    memory: dict[str, int] = field(default_factory=dict)  # the combined file's device bytes
    problems: list[str] = field(default_factory=list)  # contract problems of the combined file
    contract: str = ""  # the runtime contract the file is held to (its description)
    memory_checked: bool = False  # the runtime's copies were checked on the file's memory layout
    stages: list[dict] = field(default_factory=list)  # decode stages past stage 0: net, stage, rows, cycles
    checkpoint: dict | None = None  # a pre-quantized checkpoint: what of its codes the bmodel keeps (kept_codes)
    schedule: str = ""  # how the compiles were run together (scheduler.Schedule.describe); "" when all were cached
    transform_refusals: list[str] = field(default_factory=list)  # graphs whose nets each ran model_transform: why
    combined: dict = field(default_factory=dict)  # deploy.combine's account: by what, its inputs in order, ...

    @property
    def ok(self) -> bool:
        generation_ok = self.generation is None or self.generation["ok"]
        return (not self.problems and all(n.get("ok", True) for n in self.nets + self.stages) and generation_ok)

    def pass_changes(self) -> dict[str, list[int]]:
        """{top pass: what it changed on each net it ran on}."""
        changes: dict[str, list[int]] = {}
        for n in self.nets:
            for name, result in n.get("top_passes", {}).items():
                changes.setdefault(name, []).append(result["changed"])
        return changes

    def _top_pass_lines(self) -> list[str]:
        """One line per top pass: on how many of the nets it ran on it changed something, and why not elsewhere."""
        runs: dict[str, list] = {}
        for n in self.nets:
            for name, result in n.get("top_passes", {}).items():
                runs.setdefault(name, []).append((n["net"], result))
        lines = []
        for name, results in runs.items():
            changed = [net for net, r in results if r["changed"]]
            line = f"  top pass {name}: changed {len(changed)} of {len(results)} nets"
            skipped = [(net, reason) for net, r in results for reason in r["skipped"]]
            if skipped:
                line += f"; left {len(skipped)} candidate(s) as they were, e.g. {skipped[0][0]}: {skipped[0][1]}"
            lines.append(line)
        return lines

    def report_lines(self) -> list[str]:
        mem = self.memory
        kept = self.checkpoint or {}
        lines = ["", f"  bm1684x: {self.bmodel} ({self.bmodel_bytes / 1e6:.1f} MB, {self.quantize}, "
                     f"{self.toolchain})",
                 f"  device memory {mem.get('total', 0) / 1e6:.1f} MB: weight {mem.get('weight', 0) / 1e6:.1f}, "
                 f"runtime {mem.get('runtime', 0) / 1e6:.1f} (shared by the nets)"]
        if kept:
            lines.append(f"  checkpoint codes ({kept['scheme']}): {kept['summary']}")
        lines.append(f"  {'net':<22} {'mode':<7} {'compile':>9} {'cycles':>12} {'device MB':>10}  "
                     f"simulator vs onnxruntime{' on the dequantized checkpoint' if kept else ''}: worst output "
                     f"cosine (>= {contract.MIN_COSINE})")
        for n in self.nets:
            compile_s = "cached" if n["cached"] else f"{sum(n['seconds'].values()):.1f}s"
            cycles = f"{n['total_cycle']:,}" if n.get("total_cycle") else c.DYNAMIC if "--dynamic" in n["flags"] else "-"
            memory = f"{n['memory']['total'] / 1e6:.1f}" if n.get("memory") else "-"
            if "worst" in n:
                sim = f"{'ok  ' if n['ok'] else 'FAIL'} {n['worst']:.5f}"
                if n["precision"] in ("W4", "W8") and not n.get("kept_codes"):  # (a kept net's reference is fp32)
                    sim += f"   vs fp32 {n['worst_fp32']:.5f}" + (f" (>= {n['threshold_fp32']})" if n["threshold_fp32"] else "")
            else:
                sim = "-"
            lines.append(f"  {n['net']:<22} {n['quantize']:<7} {compile_s:>9} {cycles:>12} {memory:>10}  {sim}")
        t = time_estimate(self.nets)
        encode = f"encode {t['encode_ms']:.2f} ms per source, " if "encode_ms" in t else ""
        prefill = "prefill - (dynamic blocks have no cycle estimate)" if t["prefill_ms"] is None else \
            f"prefill {t['prefill_ms']:.2f} ms"
        lines.append(f"  estimated chip time (TPU-MLIR cycle model, 1 GHz): {encode}{prefill}, decode "
                     f"{t['decode_ms_per_token']:.3f} ms per token ({1000 / max(t['decode_ms_per_token'], 1e-9):,.0f} "
                     "tokens/s)")
        lines += self._schedule_lines()
        lines += self._transform_lines()
        lines += self._top_pass_lines()
        if self.stages:
            first = next(n for n in self.nets if n["net"] == self.stages[0]["net"])
            per = ", ".join(f"{s['cache_rows']}: {s['total_cycle']:,}" for s in self.stages if s["net"] == first["net"])
            lines.append(f"  decode stages, {first['net']} (cache rows: cycles): {first['cache_rows']}: "
                         f"{first['total_cycle']:,}, {per}; the runtime runs the smallest that holds the history")
            checked = [s for s in self.stages if "worst" in s]
            if checked:
                worst = min(checked, key=lambda s: s["worst"])
                lines.append(f"  decode stages in the simulator vs onnxruntime at their shapes: {len(checked)} stages, "
                             f"worst output cosine {worst['worst']:.5f} ({worst['net']}, {worst['cache_rows']} rows)"
                             + ("" if all(s["ok"] for s in checked) else "  FAIL"))
        if self.sim_skipped:
            lines.append(f"  simulator checks skipped: {self.sim_skipped}")
        for run in (self.generation or {}).get("runs", []):
            verdict = "identical" if run["tokens_identical"] else \
                (f"identical up to a near-tie at token {run['first_difference']} (reference top-2 margin "
                 f"{run['margin_at_difference']:.3f} < 2x logit error {run['max_abs_logit_err']:.3f})" if run["ok"] else
                 f"DIFFER from token {run['first_difference']} (margin {run['margin_at_difference']:.3f})")
            lines.append(f"  simulated greedy generation vs onnxruntime, {run['prompt_length']}-token prompt: "
                         f"{len(run['tokens'])} tokens {verdict}, min logit cosine {run['min_logit_cosine']:.5f}"
                         f"{'' if run['ok'] else '  FAIL'}"
                         + (f"; vs fp32 {run['fp32_agreement']:.0%} of tokens equal" if self.requantized else ""))
        chat = (self.generation or {}).get("chat")
        for turn in (chat or {}).get("turns", []):
            verdict = "identical" if turn["tokens_identical"] else "identical up to a near-tie" if turn["ok"] else "DIFFER"
            lines.append(f"  simulated history-KV chat vs onnxruntime, turn with {turn['prompt_length']} tokens in the "
                         f"session: {len(turn['tokens'])} tokens {verdict}, min logit cosine {turn['min_logit_cosine']:.5f}"
                         f"{'' if turn['ok'] else '  FAIL'}")
        if sampled := (self.generation or {}).get("sampled"):
            same = "identical" if sampled["tokens_identical"] else f"parting at token {sampled['first_difference']}"
            lines.append(f"  simulated sampled generation vs onnxruntime, same seed: {len(sampled['tokens'])} tokens "
                         f"{same} (draws within "
                         f"{sampled['max_draw_distance']:.3f} total variation, min logit cosine "
                         f"{sampled['min_logit_cosine']:.5f}); each simulated draw from transformers' distribution to "
                         f"{sampled['max_prob_err']:.1e}{'' if sampled['ok'] else '  FAIL'}")
        if self.problems:
            lines.append(f"  contract ({self.contract}): NOT MET: " + "; ".join(self.problems))
        else:
            lines.append(f"  contract ({self.contract}): met" + (
                "; the runtime's copies between nets and its mask bits checked on this file's memory layout"
                if self.memory_checked else ""))
        return lines

    def _schedule_lines(self) -> list[str]:
        """How the compiles ran together, and each compiled net's measured peak against the estimate it was planned by."""
        measured = [n for n in self.nets if n.get("peak_rss") and not n["cached"]]
        if not self.schedule or not measured:
            return []
        worst = max(measured, key=lambda n: max(n["peak_rss"].values()) / n["estimated_peak"])
        peak = max(worst["peak_rss"].values())
        return [f"  compile schedule: {self.schedule}; largest measured peak / estimate {peak / 2**30:.2f} / "
                f"{worst['estimated_peak'] / 2**30:.2f} GiB ({worst['net']})"]

    def _transform_lines(self) -> list[str]:
        """How many compiled nets ran model_transform, and how many had its output made from a net of their graph."""
        compiled = [n for n in self.nets if not n["cached"]]
        if not compiled:
            return []
        made = Counter(n["transform_from"] for n in compiled if n.get("transform_from"))
        line = f"  model_transform: ran for {len(compiled) - sum(made.values())} of {len(compiled)} compiled nets"
        kept = sum(bool(n.get("converter_weights")) for n in compiled)
        if kept:
            line += f" ({kept} of them with the converter's weights file: tpuc-opt wrote none)"
        if made:
            line += "; the others' output made from a net of the same graph (" + ", ".join(
                f"{reference}'s: {count}" for reference, count in made.items()) + ")"
        return [line] + [f"    each ran it for a graph: {why}" for why in self.transform_refusals]

    @property
    def requantized(self) -> bool:
        """Some net's weights were rounded by model_deploy (W4/W8 not from checkpoint codes): its reference is not fp32."""
        return any(n["quantize"].startswith("W") and not n.get("kept_codes") for n in self.nets)

    def to_json(self) -> dict:
        return {"bmodel": self.bmodel, "bmodel_bytes": self.bmodel_bytes, "quantize": self.quantize, "toolchain": self.toolchain, "jobs": self.jobs,
                "ok": self.ok, "seconds": self.seconds, "memory": self.memory, "estimate": time_estimate(self.nets),
                "nets": self.nets, "generation": self.generation,
                "sim_skipped": self.sim_skipped, "contract": self.contract, "contract_problems": self.problems,
                "memory_checked": self.memory_checked, "decode_stages": self.stages, "checkpoint": self.checkpoint,
                "schedule": self.schedule, "transform_refusals": self.transform_refusals, "combine": self.combined}


def _read_back_codes(result: Bm1684xResult, compiled, folder: Path) -> None:
    """Every net's checkpoint codes, scales and zero points found in its compiled bmodel (codes_check.py); a
    missing one is a problem of the file."""
    missing, checked = [], 0
    for net in compiled:
        if net.spec.codes and "keep-checkpoint-codes" in net.spec.top_passes:
            missing += [f"{net.spec.name} {m}" for m in
                        codes_check.missing_codes(net.bmodel, folder / net.spec.codes, net.spec.quantize[2:])]
            checked += 1
    result.checkpoint["read_back"] = {"nets": checked, "missing": missing}
    result.checkpoint["summary"] += (f"; read back from the {checked} nets' bmodels: " +
                                     ("all there" if not missing else f"{len(missing)} missing"))
    result.problems += [f"the bmodel does not hold the checkpoint's {m}" for m in missing[:5]]


def kept_codes(source, specs, nets: list[dict]) -> dict | None:
    """What a pre-quantized checkpoint's codes became: how many of its Linears compute from them (each counted in
    one net, its prefill block's), and its scales' fate: a mode of their own float keeps them exactly (W4F16 for
    float16 scales), another rounds them (W4BF16 rounds float16 to bfloat16); a float mode dequantizes everything."""
    scheme = source.quantization
    if scheme is None:
        return None
    prefixes = source.weights.quantized_prefixes()
    runtime = c.contract_of_nets({n["net"]: None for n in nets})
    kept = sum(n["kept_codes"] for n in nets if runtime.spec(n["net"]).kind not in c.DECODE_BLOCKS | {c.BLOCK_KV})
    modes = sorted({s.quantize for s in specs if s.codes})
    stored = source.weights.dtype(f"{prefixes[0]}.{scheme.scales_suffix}")
    if not modes:
        summary = f"dequantized into {specs[0].quantize} nets (a float mode): the codes are not kept"
    else:
        half = modes[0][2:]
        fate = "kept exactly" if stored == half else f"rounded to {half.lower()} by {modes[0]}"
        summary = (f"{kept} of {len(prefixes)} Linears compute from the checkpoint's own codes and zero points, bit "
                   f"for bit (A16MatMul); its {stored.lower()} scales {fate}")
    return {"scheme": scheme.describe(), "linears": len(prefixes), "kept": kept, "modes": modes,
            "scales": stored, "summary": summary}


# TPU-MLIR's profile converts cycles to time at 1 GHz (`total_cycle` 12,784 -> `runtime: 0.012784ms`).
CYCLES_PER_MS = 1_000_000


def time_estimate(nets: list[dict]) -> dict:
    """Chip time by TPU-MLIR's cycle model: what one prompt (or source) and one new token pass through.

    Prefill: embedding, every prefill block, lm_head (and greedy_head, where the contract has one).
    Decode, per token: embedding_cache, every decode block, the heads. An encoder-decoder model also
    encodes once per source (encoder, cross_kv). Nets without a cycle count (greedy_head) add nothing;
    dynamic prefill blocks have none (TPU-MLIR profiles static nets only), so then there is no prefill
    estimate (bench/history_kv.py compiles them statically for theirs)."""
    cycles = {n["net"]: n.get("total_cycle") or 0 for n in nets}
    runtime = c.contract_of_nets(cycles)
    kinds = {name: runtime.spec(name).kind for name in cycles}
    prefill = [k for k in cycles if kinds[k] in c.PREFILL_BLOCKS]
    dynamic = any("--dynamic" in n.get("flags", ()) for n in nets if n["net"] in prefill)
    decode = [k for k in cycles if kinds[k] in c.DECODE_BLOCKS]
    head = [runtime.network(k) for k in (c.LM_HEAD, c.GREEDY_HEAD) if runtime.has(k)]

    def ms(names) -> float:
        return sum(cycles.get(n, 0) for n in names) / CYCLES_PER_MS

    estimate = {"prefill_ms": None if dynamic else ms([runtime.network(c.EMBEDDING), *prefill, *head]),
                "decode_ms_per_token": ms([runtime.one_token(c.EMBEDDING), *decode, *head])}
    if runtime is c.ENCODER_DECODER:
        estimate["encode_ms"] = ms([runtime.network(c.ENCODER), runtime.network(c.CROSS_KV)])
    return estimate


def simulator_log() -> Path:
    return toolchain.cache_root() / "bm1684x" / f"simulator-{os.getpid()}.log"


def validate(source, options: dict[str, Any]) -> None:
    contract.check_experts(source)
    contract.check_quantizable(source.config, options["quantize"], options["group_size"])
    contract.check_checkpoint_codes(source, options["quantize"])
    contract.check_chunk_length(options.get("chunk_length"), options["seq_length"], options["contract"])
    toolchain.require()


# What every bmodel carries besides weights, measured at TPU-MLIR 1.30.2: the kernel module
# (libbm1684x_kernel_module.so, 5.6 MB), instructions and, in the cache, the MLIR text and logs.
NET_OVERHEAD = 6_500_000


def disk_needs(source, options: dict[str, Any], runtime: c.Contract, out: Path) -> list[DiskNeed]:
    """What the build writes beside the export's ONNX: the bmodel in --out, each net's bmodel in the net cache
    (a block's weights once per block network: block_i, block_cache_i, ...; each decode stage again), and
    while a net compiles, model_transform's fp32 weight copies (about twice its ONNX) for each job at once."""
    if source.is_encoder_decoder:
        layers, count, embed, head = source.parameter_count, 1, 0, 0
    else:
        parts = source.parts
        count = len(parts.layers)
        layers, embed, head = (sum(p.numel() for p in m.parameters()) for m in (parts.layers, parts.embed, parts.head))
    quantize, group = options["quantize"], options["group_size"]
    per_weight = {"W4": 0.5 + 4 / group, "W8": 1 + 4 / group}  # codes, then a scale and a zero point per group
    block_bytes = layers * per_weight.get(contract.QUANT_MODES[quantize][0][:2], 2)
    head_mode = contract.lm_head_mode(quantize, options.get("head_weights", "bf16"))
    head_bytes = embed * 2 + head * per_weight.get(head_mode[:2], 2)
    stages = len(contract.decode_stage_rows(options["seq_length"], options.get("chunk_length"))) - 1
    copies = sum(1 for n in runtime.networks if n.kind in c.BLOCKS) + stages
    nets = copies * count + sum(1 for n in runtime.networks if n.kind not in c.BLOCKS)
    largest = 4 * max(layers // max(1, count), embed, head)
    parallel = options.get("jobs") or os.cpu_count() or 1
    cache = deploy.nets_cache()
    return [DiskNeed("bmodel", out, int(block_bytes + head_bytes) + NET_OVERHEAD),
            DiskNeed("net cache", cache, int(block_bytes * copies + head_bytes) + nets * NET_OVERHEAD),
            DiskNeed("compile work (while it runs)", cache, 2 * largest * parallel)]


def build(folder: Path, manifest: dict, source, options: dict[str, Any], check: bool, show_progress: bool,
          top_pipeline: tuple[str, ...] = TOP_PIPELINE) -> Bm1684xResult:
    """Compile every net of the contract (with the target's top passes), combine them into one bmodel,
    check its memory layout against the runtime's copies, and simulate it when the model is small."""
    tools = toolchain.require()
    quantize, seconds = options["quantize"], {}
    runtime = c.contract_of_manifest(manifest)
    stage_rows = contract.decode_stage_rows(manifest["seq_length"], options.get("chunk_length"))
    specs = contract.deploy_specs(manifest, quantize, options["group_size"], top_pipeline, len(stage_rows) > 1,
                                  options.get("head_weights", "bf16"))
    onnx_files = {}
    for net in manifest["networks"]:
        files = [folder / net["file"], *(folder / f for f in net["external_data"])]
        onnx_files[net["name"]] = deploy.OnnxFile(files[0], net["sha256"], sum(f.stat().st_size for f in files),
                                                  tuple(files[1:]))

    start = time.perf_counter()
    # ray_address: --executor ray's cluster (None: this machine), connected to by compiler.prepare
    deployed = deploy.deploy_all(tools, specs, onnx_files, options.get("jobs"), show_progress, options.get("ray_address"))
    compiled = deployed.nets
    staged = _compile_decode_stages(tools, compiled, manifest, runtime, stage_rows, onnx_files, options, show_progress)
    seconds["bm1684x compile"] = time.perf_counter() - start

    start = time.perf_counter()
    # Each decode block's further stages right after it: the combine makes them stages of that net.
    order = [d for net in compiled for d in (net, *staged.get(net.spec.name, ()))]
    bmodel = folder / contract.bmodel_name(source.name, quantize, manifest["seq_length"])
    combined = deploy.combine(tools, order, bmodel, show_progress)
    header, infos = inspect_bmodel.read_info(tools, bmodel)
    seconds["combine"] = time.perf_counter() - start
    nets = [{"net": d.spec.name, "quantize": d.spec.quantize, "flags": list(d.spec.flags), "cached": d.cached,
             "seconds": d.seconds, "total_cycle": d.total_cycle, "memory": d.memory,
             "peak_rss": d.peak_rss, "node": d.node, "estimated_peak": deploy.estimated_peak(onnx_files[d.spec.onnx_network].size),
             "top_passes": {r["pass"]: {k: r[k] for k in ("changed", "summary", "skipped")} for r in d.top_passes},
             "transform_from": d.transform_from, "converter_weights": d.converter_weights,
             "cache_dir": str(d.directory)} for d in compiled]
    for n in nets:
        if n["net"] in staged:
            n["cache_rows"] = stage_rows[0]
        n["kept_codes"] = n["top_passes"].get("keep-checkpoint-codes", {}).get("changed", 0)
    result = Bm1684xResult(bmodel.name, bmodel.stat().st_size, quantize, tools.describe(), options.get("jobs"), nets,
                           seconds, memory=header.get("memory", {}),
                           problems=inspect_bmodel.contract_problems(infos, runtime),
                           contract=f"{runtime.describe}: {runtime.name}",
                           stages=[{"net": d.spec.name, "stage": d.spec.stage, "cache_rows": d.spec.input_shapes[-1][1],
                                    "total_cycle": d.total_cycle, "cached": d.cached, "seconds": d.seconds}
                                   for ds in staged.values() for d in ds],
                           checkpoint=kept_codes(source, specs, nets),
                           schedule=deployed.schedule.describe() if deployed.schedule else "",
                           transform_refusals=deployed.transform_refusals, combined=combined)
    if result.checkpoint and result.checkpoint["modes"]:
        start = time.perf_counter()
        _read_back_codes(result, compiled, folder)
        seconds["codes read back"] = time.perf_counter() - start

    with Simulator(tools, simulator_log(), result.memory.get("total", 0)) as sim:
        # Whatever the model's size: where the runtime's copies land in the combined file's memory,
        # and what its mask bits mean to the nets (inspect_bmodel.runtime_problems).
        if not result.problems:
            start = time.perf_counter()
            result.problems = inspect_bmodel.runtime_problems(sim.layout(bmodel), infos, manifest)
            result.memory_checked = True
            seconds["memory check"] = time.perf_counter() - start
        if not check:
            result.sim_skipped = "--no-check"
        elif not source.is_small:
            result.sim_skipped = (f"{source.parameter_count / 1e9:.1f}B parameters is too large for the cmodel "
                                  "simulator; verify small shapes of the same architecture instead")
        else:
            _simulate(sim, bmodel, specs, manifest, folder, result, options["group_size"], show_progress,
                      [d.spec for ds in staged.values() for d in ds])
    (folder / REPORT).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _compile_decode_stages(tools, compiled, manifest: dict, runtime, stage_rows: list[int], onnx_files, options,
                           show_progress: bool) -> dict[str, list]:
    """{decode block: its further stages, compiled} (--chunk-length): each stage gets the io_alone addresses
    its stage 0 saved, so all stages of a net read and write the same cache."""
    if len(stage_rows) < 2:
        return {}
    inputs = {n["name"]: [i["name"] for i in n["inputs"]] for n in manifest["networks"]}
    specs = [s for d in compiled if runtime.spec(d.spec.name).kind in c.DECODE_BLOCKS
             for s in contract.stage_specs(d.spec, inputs[d.spec.onnx_network], stage_rows,
                                           str(d.directory / contract.IO_ALONE_CONFIG))]
    done = deploy.deploy_all(tools, specs, onnx_files, options.get("jobs"), show_progress,
                             options.get("ray_address")).nets
    staged: dict[str, list] = {}
    for d in done:
        staged.setdefault(d.spec.name, []).append(d)
    return staged


def _simulate(sim, bmodel, specs, manifest, folder, result, group_size, show_progress, stage_specs=()) -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphopt-quantized-reference-") as quantized:
        quantized = fake_quant.quantized_reference(folder, manifest, specs, group_size, Path(quantized))
        by_name = {n["net"]: n for n in result.nets}
        for spec in specs:
            by_name[spec.name].update(verify.network_similarity(sim, bmodel, spec, manifest, folder, quantized))
        by_stage = {(s["net"], s["stage"]): s for s in result.stages}
        for spec in stage_specs:  # every decode stage against onnxruntime at the stage's shapes
            similarity = verify.network_similarity(sim, bmodel, spec, manifest, folder, quantized)
            by_stage[(spec.name, spec.stage)].update({k: similarity[k] for k in ("worst", "ok")})
        result.seconds["simulator nets"] = time.perf_counter() - start
        if show_progress:
            print(f"  simulator: {len(specs)} nets checked against onnxruntime in "
                  f"{result.seconds['simulator nets']:.1f}s; generating ...", file=sys.stderr)
        start = time.perf_counter()
        generation = verify.generation_check(sim, bmodel, manifest, folder, quantized)
    result.generation = generation
    result.seconds["simulator generation"] = time.perf_counter() - start
