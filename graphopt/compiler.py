"""The compile driver: for each network, trace → FX passes → ONNX → ONNX passes → check.

Each process builds one network at a time (only that network's weights are alive); big models
export in several spawned processes, one weight group per task (`--jobs`). Every stage is
checked against the one before on the same seeded inputs, and everything is written into a
staged output directory that replaces `--out` only when everything is done.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import graphopt
from graphopt.checks import Check, check_inputs, compare, decode_check, end_to_end_prompt
from graphopt.errors import GraphoptError
from graphopt.ir import NetworkGraph, TensorSpec
from graphopt.machine import parallel_jobs
from graphopt.models.decoder import sliding_window
from graphopt.models.source import ModelSource
from graphopt.networks import plan_networks, trace_plan
from graphopt.onnx_ir import SharedData, export_onnx, save_onnx
from graphopt.output import MANIFEST, StagedDirectory
from graphopt.pass_manager import BLOCKS, DECODE_BLOCKS, PREFILL_BLOCKS, PassManager, PassRecord
from graphopt.plugins import PassPlugins, reload_in_worker, with_plugins
from graphopt.progress import Progress
from graphopt.runtime import ort_session

if TYPE_CHECKING:  # the targets package imports the compiler's checks
    from graphopt.targets.onnx_target import Target

INPUTS_REWRITTEN = DECODE_BLOCKS | {"decoder_block"}
# Models up to this many parameters are also checked end to end against transformers.
END_TO_END_CHECK_MAX_PARAMS = 200_000_000


@dataclass
class NetworkResult:
    name: str
    kind: str
    files: list[Path]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_axes: dict
    passes: list[PassRecord]
    seconds: dict[str, float]
    checks: list[Check] = field(default_factory=list)
    sha256: str = ""  # over the file's and its external data's sha256s (SharedData.digest), taken where written
    prefill_run: PrefillRun | None = field(default=None, repr=False)  # a prefill block's, until its decode twin is checked


@dataclass
class PrefillRun:
    """A prefill block's check inputs and onnxruntime outputs, by name: what its decode twin is held to."""

    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


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

    @property
    def ok(self) -> bool:
        return (all(c.ok for n in self.networks for c in n.checks) and (self.end_to_end or {}).get("ok", True)
                and (self.target is None or self.target.ok))


def validate_seq_length(source: ModelSource, seq_length: int) -> None:
    if not 2 <= seq_length <= source.max_positions:
        raise GraphoptError(f"--seq-length {seq_length} is outside what {source.name} supports: give a value from 2 to "
                            f"its max_position_embeddings, {source.max_positions}.")
    # The runtime's fixed causal mask lets a token see every earlier one. A model attending within
    # a window behaves the same only while the whole sequence fits in the window.
    window = sliding_window(source.config)
    if window is not None and seq_length > window:
        raise GraphoptError(f"{source.name} attends within a sliding window of {window} tokens (config sliding_window), "
                            f"but the runtime's fixed causal mask lets each token see all {seq_length} positions, so "
                            f"networks for --seq-length {seq_length} would compute something else than the model. "
                            f"Give --seq-length {window} or less.")


def compile_model(source: ModelSource, target: Target, seq_length: int, out_dir: Path, *,
                  layers: list[int] | None = None, check: bool = True, keep_fx: bool = False,
                  dump_dir: Path | None = None, show_progress: bool = True,
                  target_options: dict | None = None, jobs: int | None = None,
                  plugins: PassPlugins | None = None, dump_after: frozenset[str] | None = None) -> CompileResult:
    """Compile `source` for `target` into `out_dir`. `plugins` adds user passes to the target's
    pipelines; `dump_after` limits the `dump_dir` graphs to those passes (None: after every pass)."""
    validate_seq_length(source, seq_length)
    if plugins is not None:
        target = with_plugins(target, plugins)
    check_dump_after(target, dump_after)
    target_options = target_options or {}
    if target.build:
        target.build.validate(source, target_options)
    staged = StagedDirectory(out_dir)
    try:
        job = ExportJob(source, list(target.fx_pipeline), list(target.onnx_pipeline), seq_length, staged.path, layers,
                        check, dump_dir, dump_after, plugins)
        result = _compile(job, target, keep_fx, show_progress, jobs)
        if target.build:
            result.target = target.build.build(staged.path, result.manifest, source, target_options, check,
                                               show_progress)
            result.seconds.update(result.target.seconds)
        result.out_dir = staged.commit()
        return result
    except BaseException:
        staged.discard()
        raise


@dataclass
class ExportJob:
    """Everything a process needs to export networks of one run (picklable: workers get a copy)."""

    source: ModelSource
    fx_pipeline: list[str]
    onnx_pipeline: list[str]
    seq_length: int
    folder: Path
    layers: list[int] | None
    check: bool
    dump_dir: Path | None
    dump_after: frozenset[str] | None = None
    plugins: PassPlugins | None = None  # user passes, loaded again by each worker

    def plans(self) -> list:
        return plan_networks(self.source, self.seq_length, self.layers)


def check_dump_after(target: Target, dump_after: frozenset[str] | None) -> None:
    unknown = sorted(set(dump_after or ()) - {*target.fx_pipeline, *target.onnx_pipeline})
    if unknown:
        raise GraphoptError(f"--dump-after {', '.join(unknown)}: no such pass in the {target.name} pipeline "
                            f"({', '.join([*target.fx_pipeline, *target.onnx_pipeline])}); name one of those, or 'all'.")


def _compile(job: ExportJob, target: Target, keep_fx: bool, show_progress: bool, jobs: int | None) -> CompileResult:
    source, seq_length, folder, layers, check = job.source, job.seq_length, job.folder, job.layers, job.check
    plans = job.plans()
    groups = _weight_groups(plans)
    jobs = 1 if keep_fx else min(jobs or default_export_jobs(source), len(groups))
    progress = Progress(len(plans), enabled=show_progress, workers=jobs)
    started = time.perf_counter()
    if jobs == 1:
        results, kept = _export_serially(job, plans, keep_fx, progress)
    else:
        done = _export_in_parallel(job, groups, jobs, progress)
        results, kept = [done[plan.name] for plan in plans], {}
    totals: dict[str, float] = {}
    for r in results:
        for stage, s in r.seconds.items():
            totals[stage] = totals.get(stage, 0.0) + s
    manifest = _manifest(source, target, seq_length, results)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    result = CompileResult(folder, manifest, results, totals, fx_networks=kept if keep_fx else None,
                           export={"processes": jobs, "wall_seconds": round(time.perf_counter() - started, 2)})
    if check and layers is None and _parameter_count(source) <= END_TO_END_CHECK_MAX_PARAMS:
        start = time.perf_counter()
        result.end_to_end = end_to_end_check(source, folder, manifest)
        totals["end-to-end check"] = time.perf_counter() - start
    progress.close()
    return result


def _export_serially(job: ExportJob, plans, keep_fx: bool, progress: Progress):
    results, kept, shared, prefills = [], {}, {}, {}
    for plan in plans:
        progress.start(plan.name)
        group = shared.setdefault(_weight_group(plan), SharedData(job.folder))
        result, net = export_in_group(job, plan, group, prefills, progress.stage)
        results.append(result)
        if keep_fx:
            kept[plan.name] = net
        progress.finish(plan.name, ok=all(c.ok for c in result.checks))
        # FX graphs hold reference cycles, which Python frees only when its collector runs:
        # collect now, or a network's weights outlive it (8B: gigabytes per network).
        del net
        gc.collect()
    job.source.release()
    return results, kept


def export_in_group(job: ExportJob, plan, shared: SharedData, prefills: dict, on_stage=lambda stage: None):
    """export_network, handing a layer's prefill run (kept in `prefills` by weight group) to its decode twin,
    which comes after it in the same group."""
    prefill = prefills.pop(_weight_group(plan), None) if plan.kind in DECODE_BLOCKS else None
    result, net = export_network(job, plan, shared, on_stage, prefill)
    if result.prefill_run is not None:
        prefills[_weight_group(plan)], result.prefill_run = result.prefill_run, None
    return result, net


def export_network(job: ExportJob, plan, shared: SharedData, on_stage=lambda stage: None,
                   prefill: PrefillRun | None = None):
    """trace → FX passes → ONNX → ONNX passes → save, each stage checked against the one before. A prefill
    block's result keeps its onnxruntime run (`prefill_run`); given to its decode twin as `prefill`, the
    decode block is checked against it (checks.decode_check)."""
    seconds: dict[str, float] = {}

    def timed(stage, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
        on_stage(stage)
        return value

    vocab = int(job.source.config.vocab_size)
    net = timed("trace", trace_plan, job.source, plan, job.seq_length)
    checks = []
    args = check_inputs(net, vocab)
    # Decode networks gain history inputs and encoder-decoder blocks trade encoder_hidden_states for
    # cross_k/cross_v: their rewritten form has other inputs than the traced one to compare with.
    traced_out = net.run(*args) if job.check and plan.kind not in INPUTS_REWRITTEN else None
    records = timed("fx passes", PassManager(job.fx_pipeline, job.dump_dir, dump_after=job.dump_after).run, net)
    rewritten_out = None
    if job.check:
        args = check_inputs(net, vocab)  # decode networks gained inputs
        rewritten_out = net.run(*args)
        if traced_out is not None:
            checks.append(compare("fx-rewritten vs traced", traced_out, rewritten_out))
    # The embedding serves prefill ([1,SEQ]) and decode ([1,1]): its seq axis stays dynamic.
    dynamic_axes = ({name: {1: "seq"} for name in ("input_ids", "position_ids", "input_embed")
                     if name in net.output_names or net.input(name) is not None} if plan.kind == "embedding" else {})
    onnx_net = timed("onnx export", export_onnx, net, dynamic_axes or None)
    records += timed("onnx passes", PassManager(job.onnx_pipeline, job.dump_dir, phase="onnx",
                                                dump_after=job.dump_after).run, onnx_net)
    files = timed("save", save_onnx, onnx_net.model, job.folder / f"{plan.name}.onnx", onnx_net.weights, shared)
    del onnx_net
    prefill_run = None
    if job.check:
        session = timed("check", ort_session, files[0])
        feeds = {spec.name: a.numpy() for spec, a in zip(net.inputs, args)}
        onnx_out = timed("check", session.run, list(net.output_names), feeds)
        checks.append(compare("onnxruntime vs fx-rewritten", rewritten_out, onnx_out))
        if plan.kind in PREFILL_BLOCKS:
            prefill_run = PrefillRun(feeds, dict(zip(net.output_names, onnx_out)))
        elif plan.kind in DECODE_BLOCKS and prefill is not None:
            checks.append(timed("decode check", decode_check, lambda f: session.run(list(net.output_names), f),
                                net.inputs, net.output_names, prefill.feeds, prefill.outputs, job.seq_length))
        del session
    digest = timed("hash", shared.digest, files)
    result = NetworkResult(plan.name, plan.kind, files, net.inputs, net.outputs, dynamic_axes, records, seconds,
                           checks, digest, prefill_run)
    return result, net


# ---- parallel export --------------------------------------------------------------------
# Networks are independent, so they export in parallel processes, one weight group (a layer's
# block and block_cache; the embedding; the heads) per task: a group shares its external data
# file, and each process holds one network's weights at a time. Spawned, not forked: a fork of
# a process whose OpenMP pool has run can deadlock. Every network's bytes are the same whichever
# process writes them (tests/test_determinism.py).

_WORKER: dict = {}


def default_export_jobs(source: ModelSource) -> int:
    """1 for small models (starting a process costs more than it saves); otherwise as many as
    cores, fewer when memory would not hold them: an 8B export process peaked at 4.2 GB with
    its largest network's weights at 2.1 GB, so budget twice the largest network + 1 GB."""
    if _parameter_count(source) <= END_TO_END_CHECK_MAX_PARAMS:
        return 1
    if source.is_encoder_decoder:
        parts = source.seq2seq_parts
        heaviest = (parts.encoder, parts.head, parts.layers[0])
    else:
        parts = source.parts
        heaviest = (parts.embed, parts.head, parts.layers[0])
    largest = max(sum(p.numel() * 4 for p in m.parameters()) for m in heaviest)
    return parallel_jobs(2 * largest + (1 << 30))


def _worker_start(job: ExportJob, threads: int) -> None:
    torch.set_num_threads(threads)
    reload_in_worker(job.plugins)  # a spawned process has only the built-in passes registered
    _WORKER["job"], _WORKER["plans"] = job, {p.name: p for p in job.plans()}


def _worker_export(group: list[str]) -> list[NetworkResult]:
    job, plans = _WORKER["job"], _WORKER["plans"]
    shared, results, prefills = SharedData(job.folder), [], {}
    for name in group:
        result, net = export_in_group(job, plans[name], shared, prefills)
        results.append(result)
        del net
        gc.collect()
    job.source.release()
    return results


def _export_in_parallel(job: ExportJob, groups: list[list[str]], jobs: int,
                        progress: Progress) -> dict[str, NetworkResult]:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done: dict[str, NetworkResult] = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                             initargs=(job, threads)) as pool:
        futures = [pool.submit(_worker_export, group) for group in groups]
        try:
            for future in as_completed(futures):
                for result in future.result():
                    done[result.name] = result
                    progress.finish(result.name, ok=all(c.ok for c in result.checks), took=sum(result.seconds.values()))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return done


def _weight_groups(plans) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for plan in plans:
        groups.setdefault(_weight_group(plan), []).append(plan.name)
    return list(groups.values())


def _weight_group(plan) -> str:
    """Networks whose external data may be shared: block_i with block_cache_i (the same weights),
    the embedding with the head (tied in small models). Not across layers: block_5 reading
    block_0's data (for norm weights that are all ones) would tie the layers' files, cache keys
    and memory estimates together."""
    return plan.name.rsplit("_", 1)[-1] if plan.kind in BLOCKS else "embedding and head"


def _parameter_count(source: ModelSource) -> int:
    return sum(p.numel() for p in source.skeleton.parameters())


def end_to_end_check(source: ModelSource, folder: Path, manifest: dict, new_tokens: int = 8) -> dict:
    """Greedy tokens of the ONNX networks (driven like the chip) against the reference (transformers' generate)."""
    from graphopt.runtime import OrtBackend, run_prompt, runtime_for

    prompt = end_to_end_prompt(source.config.vocab_size, manifest["seq_length"])
    runtime = runtime_for(OrtBackend(folder, manifest), manifest)
    new_tokens = min(new_tokens, runtime.room(prompt))
    reference = source.greedy(prompt, new_tokens)
    ours = run_prompt(runtime, prompt, new_tokens)
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(reference["logits"], ours.logits))
    same = reference["tokens"] == ours.tokens
    return {"prompt": prompt, "tokens": ours.tokens, "reference_tokens": reference["tokens"],
            "tokens_identical": same, "max_abs_logit_err": err, "ok": same and err <= 1e-3}


def hf_greedy(model, prompt: list[int], new_tokens: int) -> dict:
    """transformers' own greedy generation, EOS ignored, with the logits of every step.

    For an encoder-decoder model the prompt is the source, and the target starts with the decoder
    start token. Its generation config is replaced by a plain greedy one: translation models ship
    logits processors (forced EOS at the length limit, banned pad tokens) that the networks,
    which output raw logits, leave to the runtime."""
    if model.config.is_encoder_decoder:
        from transformers import GenerationConfig

        start = model.generation_config.decoder_start_token_id
        model.generation_config = GenerationConfig(decoder_start_token_id=start, pad_token_id=0)
        skip = 1
    else:
        skip = len(prompt)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             output_logits=True, return_dict_in_generate=True)
    return {"tokens": out.sequences[0, skip:].tolist(), "logits": [l[0].numpy() for l in out.logits]}


def _manifest(source: ModelSource, target: Target, seq_length: int, results: list[NetworkResult]) -> dict:
    import transformers

    return {
        "format": "graphopt-networks/1",
        "graphopt": graphopt.__version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": source.describe(),
        "target": target.name,
        "seq_length": seq_length,
        "pipeline": {"fx": list(target.fx_pipeline), "onnx": list(target.onnx_pipeline)},
        "networks": [
            {
                "name": r.name,
                "kind": r.kind,
                "file": r.files[0].name,
                "external_data": [f.name for f in r.files[1:]],
                "sha256": r.sha256,
                "inputs": [s.to_json() for s in r.inputs],
                "outputs": [s.to_json() for s in r.outputs],
                "dynamic_axes": r.dynamic_axes,
                "passes": [{"pass": p.pass_name, "note": p.note} for p in r.passes],
            }
            for r in results
        ],
    }
