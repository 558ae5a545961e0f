"""The compile driver, in pipeline order: check the options, export every network (export.py, in
processes by weight group: export_pool.py), write the manifest, check the result end to end against
the model's own generation, hand the networks to the target's build, and replace `--out` with the
staged directory only when everything is done. It drives; the stages live in their own modules.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from graphopt import contract as c
from graphopt import ray_executor
from graphopt.checks import end_to_end_check
from graphopt.config_folder import ConfigFolder, write_config_folder
from graphopt.disk import DiskNeed, DiskUse, onnx_bytes
from graphopt.disk import check as check_disk
from graphopt.disk import describe as describe_disk
from graphopt.errors import GraphoptError
from graphopt.export import ExportJob, NetworkResult, export_serially, weight_groups
from graphopt.export_pool import export_in_parallel, export_jobs, export_on_ray
from graphopt.ir import NetworkGraph
from graphopt.manifest import build_manifest, write_manifest
from graphopt.models.source import ModelSource
from graphopt.output import StagedDirectory
from graphopt.plugins import PassPlugins, with_plugins
from graphopt.progress import Progress

if TYPE_CHECKING:
    from graphopt.targets.base import Target


@dataclass
class CompileResult:
    out_dir: Path
    manifest: dict
    networks: list[NetworkResult]
    seconds: dict[str, float]
    end_to_end: dict | None = None
    fx_networks: dict[str, NetworkGraph] | None = None  # kept only when asked (tests)
    target: object | None = None  # the target build's result (a TargetResult), for hardware targets
    export: dict = field(default_factory=dict)  # processes and wall seconds of the export stage
    config_folder: ConfigFolder | None = None  # config/ for the runtime's demo (tokenizer, generation config)
    disk: DiskUse | None = None  # what the run planned to write, and what it wrote

    @property
    def ok(self) -> bool:
        return (all(c.ok for n in self.networks for c in n.checks) and (self.end_to_end or {}).get("ok", True)
                and (self.target is None or self.target.ok))


def prepare(source: ModelSource, target: Target, seq_length: int, options: dict,
            plugins: PassPlugins | None = None, dump_after: frozenset[str] | None = None,
            contract: str | None = None, max_input_length: int | None = None,
            contract_options: tuple[str, ...] = (), ray_address: str | None = None) -> Target:
    """Everything the user can get wrong, checked before any work: the target with the user passes placed."""
    source.check_structure()
    source.check_seq_length(seq_length)
    check_contract(source, contract, contract_options)
    check_max_input_length(source, contract, seq_length, max_input_length)
    if plugins is not None:
        target = with_plugins(target, plugins)
    target.check_dump_after(dump_after)
    if target.build:  # the target's options, with the run's SEQ and contract they depend on
        runtime = c.contract_for(source.is_encoder_decoder, contract, contract_options)
        target.build.validate(source, {**options, "seq_length": seq_length, "contract": runtime.key})
    if ray_address is not None:
        ray_executor.connect(ray_address)  # no cluster: said now, not after the export
    return target


def check_contract(source: ModelSource, contract: str | None, options: tuple[str, ...] = ()) -> None:
    if contract is not None and contract not in c.DECODER_CONTRACTS:
        raise GraphoptError(f"--contract {contract} is not a runtime contract graphopt knows; choose one of "
                            f"{', '.join(c.DECODER_CONTRACTS)} (README, \"Runtime contracts\").")
    if contract is not None and source.is_encoder_decoder:
        raise GraphoptError(f"--contract {contract} is for decoder-only models; {source.name} is an encoder-decoder "
                            "model, whose networks follow graphopt's own contract (docs/encoder-decoder-networks.md). "
                            "Leave --contract out.")
    runtime = c.contract_for(source.is_encoder_decoder, contract)
    for option in options:
        if runtime is not c.LLM_TPU:
            raise GraphoptError(f"--{option} is an option of --contract {c.LLM_TPU.key} (today's LLM-TPU demos and "
                                f"llm_convert); {source.name}'s networks follow the {runtime.name}, whose runtime has no "
                                f"such mode. Leave --{option} out" + (", or compile for --contract llm-tpu." if
                                                                      not source.is_encoder_decoder else "."))


def check_max_input_length(source: ModelSource, contract: str | None, seq_length: int,
                           max_input_length: int | None) -> None:
    if max_input_length is None:
        return
    runtime = c.contract_for(source.is_encoder_decoder, contract)
    if runtime is not c.LLM_TPU:
        raise GraphoptError(f"--max-input-length is for --contract {c.LLM_TPU.key}: the {runtime.name}'s runtime reads "
                            "SEQ from the prefill's length, so its prefill takes --seq-length rows. Leave "
                            f"--max-input-length out, or compile for --contract {c.LLM_TPU.key}.")
    if not 1 <= max_input_length <= seq_length:
        raise GraphoptError(f"--max-input-length {max_input_length} must be between 1 and --seq-length {seq_length}: "
                            "it is how many prompt tokens one prefill takes, of the SEQ the cache holds.")


def compile_model(source: ModelSource, target: Target, seq_length: int, out_dir: Path, *,
                  layers: list[int] | None = None, check: bool = True, keep_fx: bool = False,
                  dump_dir: Path | None = None, show_progress: bool = True,
                  target_options: dict | None = None, jobs: int | None = None,
                  plugins: PassPlugins | None = None, dump_after: frozenset[str] | None = None,
                  contract: str | None = None, max_input_length: int | None = None,
                  contract_options: tuple[str, ...] = (), ray_address: str | None = None) -> CompileResult:
    """Compile `source` for `target` into `out_dir`. `plugins` adds user passes to the target's
    pipelines; `dump_after` limits the `dump_dir` graphs to those passes (None: after every pass);
    `contract`: the runtime contract of a decoder-only model's networks (graphopt/contract.py);
    `max_input_length`: the prefill's rows, where fewer than SEQ; `contract_options`: --dynamic, --history-kv, --do-sample;
    `ray_address`: the export and the target build's compiles as tasks on that Ray cluster (graphopt.ray_executor)."""
    target_options = {**(target_options or {}), "ray_address": ray_address}
    target = prepare(source, target, seq_length, target_options, plugins, dump_after, contract, max_input_length,
                     contract_options, ray_address)
    runtime = c.contract_for(source.is_encoder_decoder, contract, contract_options)
    disk = DiskUse.start(disk_plan(source, target, {**target_options, "seq_length": seq_length}, runtime, out_dir,
                                   layers), out_dir)
    check_disk(disk.planned)
    staged = StagedDirectory(out_dir)
    if show_progress:
        detail = f", {target_options['quantize']}" if target.build and "quantize" in target_options else ""
        print(f"graphopt: {source.name} ({source.weights.describe()}) -> target {target.name}{detail}, "
              f"seq {seq_length}{f', max input {max_input_length}' if max_input_length else ''}, "
              f"contract {runtime.describe}; writes about {describe_disk(disk.planned)}", file=sys.stderr)
    try:
        job = ExportJob(source, list(target.fx_pipeline), list(target.onnx_pipeline), seq_length, staged.path, layers,
                        check, dump_dir, dump_after, plugins, contract, max_input_length, tuple(contract_options))
        result = _export(job, target, keep_fx, show_progress, jobs, ray_address)
        result.config_folder = write_config_folder(source, staged.path, sampling=c.DO_SAMPLE in contract_options)
        if target.build:
            result.target = target.build.build(staged.path, result.manifest, source, target_options, check,
                                               show_progress, target.top_pipeline)
            result.seconds.update(result.target.seconds)
        result.out_dir = staged.commit()
        disk.finish(result.out_dir)
        result.disk = disk
        return result
    except BaseException:
        staged.discard()
        raise


def disk_plan(source: ModelSource, target: Target, options: dict, runtime: c.Contract, out: Path,
              layers: list[int] | None) -> list[DiskNeed]:
    """What the run writes: the export's ONNX (all of it, or the `layers` asked for), then the target build's part."""
    onnx = onnx_bytes(source, runtime)
    if layers is not None and not source.is_encoder_decoder:  # (an estimate: the layers asked for, of all of them)
        onnx = onnx * len(layers) // max(1, len(source.parts.layers))
    needs = [DiskNeed("ONNX", out, onnx)]
    if target.build is not None:
        needs += target.build.disk_needs(source, options, runtime, out)
    return needs


def _export(job: ExportJob, target: Target, keep_fx: bool, show_progress: bool, jobs: int | None,
            ray_address: str | None = None) -> CompileResult:
    source = job.source
    plans = job.plans()
    groups = weight_groups(plans)
    on_ray = ray_address is not None and not keep_fx  # (keep_fx: the graphs stay in this process)
    jobs = 1 if keep_fx else len(groups) if on_ray else min(export_jobs(source, jobs), len(groups))
    progress = Progress(len(plans), enabled=show_progress, workers=jobs)
    started = time.perf_counter()
    where: dict = {"processes": jobs}
    # A large model's weights stay in the process that exported them (the allocator keeps freed memory): in a
    # worker, they go with it, and the target's compiles get the memory (8B, --jobs 1: 7 GB held otherwise).
    if on_ray:
        (done, schedule), kept = export_on_ray(job, groups, ray_address, progress), {}
        where = {"tasks": len(groups), "ray": schedule.describe(), "nodes": schedule.ran_on}
    elif jobs == 1 and (keep_fx or source.is_small or target.build is None):
        done, kept = export_serially(job, plans, keep_fx, progress)
    else:
        (done, where["schedule"]), kept = export_in_parallel(job, groups, jobs, progress), {}
    results = [done[plan.name] for plan in plans]
    totals: dict[str, float] = {}
    for r in results:
        for stage, s in r.seconds.items():
            totals[stage] = totals.get(stage, 0.0) + s
    manifest = build_manifest(source, target, job.seq_length, results, job.runtime_contract)
    write_manifest(job.folder, manifest)
    result = CompileResult(job.folder, manifest, results, totals, fx_networks=kept if keep_fx else None,
                           export={**where, "wall_seconds": round(time.perf_counter() - started, 2)})
    if job.check and job.layers is None and source.is_small:
        start = time.perf_counter()
        result.end_to_end = end_to_end_check(source, job.folder, manifest)
        totals["end-to-end check"] = time.perf_counter() - start
    progress.close()
    return result
