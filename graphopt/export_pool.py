"""The export spread over processes, or over a Ray cluster's nodes: one weight group (a layer's block and
decode block; the embedding and the heads) per task, so a group shares its external data file and each
process holds one network's weights at a time. Spawned, not forked: a fork of a process whose OpenMP pool
has run can deadlock.
Every network's bytes are the same whichever process writes them (tests/test_determinism.py)."""

from __future__ import annotations

import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from graphopt import contract as c
from graphopt.errors import GraphoptError
from graphopt.export import ExportJob, NetworkResult, export_in_group
from graphopt.machine import memory_budget, parallel_jobs
from graphopt.models.source import ModelSource
from graphopt.onnx_ir import SharedData
from graphopt.plugins import reload_in_worker
from graphopt.ray_executor import RaySchedule, RemoteJob, node_name, run_on_ray
from graphopt.scheduler import Job, run_jobs

_WORKER: dict = {}


def _fp32_bytes(module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())


def group_peaks(source: ModelSource) -> tuple[int, int]:
    """(a layer's weight group, the other group's) export process peak: 2.5 x the group's largest network's fp32
    weights + 1 GiB. Measured on Llama-3.1-8B, eight layers, checks on: a layer's group (0.87 GB) 2.9 GiB, the
    embedding and heads' (2.1 GB each) 5.37 GiB."""
    if source.is_encoder_decoder:
        parts = source.seq2seq_parts
        rest = max(_fp32_bytes(parts.encoder), _fp32_bytes(parts.head))
    else:
        parts = source.parts
        rest = max(_fp32_bytes(parts.embed), _fp32_bytes(parts.head))
    return tuple(5 * weights // 2 + (1 << 30) for weights in (_fp32_bytes(parts.layers[0]), rest))


def default_export_jobs(source: ModelSource) -> int:
    """1 for small models (starting a process costs more than it saves); otherwise as many as
    cores, fewer when memory would not hold two layers' groups at once."""
    return 1 if source.is_small else parallel_jobs(group_peaks(source)[0])


def export_jobs(source: ModelSource, jobs: int | None) -> int:
    """Export processes: `jobs` (--jobs; default: default_export_jobs), never more than the memory the run may
    hold has room for with a layer's group in each; the larger group then runs with as many beside it as fit
    (export_in_parallel): --jobs 2 --max-memory 8 on an 8B model exports the layers two at a time and the
    embedding and heads alone."""
    return min(jobs or default_export_jobs(source), parallel_jobs(group_peaks(source)[0]))


def _worker_start(job: ExportJob, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    reload_in_worker(job.plugins)  # a spawned process has only the built-in passes registered
    _WORKER["job"], _WORKER["plans"] = job, {p.name: p for p in job.plans()}
    _WORKER["graphs"] = job.exported_graphs()


def _worker_export(group: list[str]) -> list[NetworkResult]:
    job, plans = _WORKER["job"], _WORKER["plans"]
    shared, results, prefills = SharedData(job.folder), [], {}
    for name in group:
        result, net = export_in_group(job, plans[name], shared, prefills, _WORKER["graphs"])
        results.append(result)
        del net
        gc.collect()
    job.source.release()
    return results


def _finished(results: list[NetworkResult], done: dict[str, NetworkResult], progress) -> None:
    for result in results:
        done[result.name] = result
        progress.finish(result.name, ok=all(c.ok for c in result.checks), took=sum(result.seconds.values()))


def _planned_peaks(job: ExportJob, groups: list[list[str]]) -> list[int]:
    layer, rest = group_peaks(job.source)
    layers = {p.name for p in job.plans() if p.kind in c.BLOCKS}
    return [layer if set(group) <= layers else rest for group in groups]


def export_in_parallel(job: ExportJob, groups: list[list[str]], jobs: int, progress
                       ) -> tuple[dict[str, NetworkResult], str]:
    """The groups over `jobs` processes, each group started when its planned peak (group_peaks) fits beside the
    running ones in the memory the run may hold (scheduler.run_jobs, biggest first). Returns the networks' results
    and how the groups ran together."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done: dict[str, NetworkResult] = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                             initargs=(job, threads)) as pool:
        work = [Job("+".join(group), peak, lambda group=group: pool.submit(_worker_export, group).result())
                for group, peak in zip(groups, _planned_peaks(job, groups))]
        try:
            schedule = run_jobs(work, jobs, memory_budget(), lambda _, results: _finished(results, done, progress))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return done, schedule.describe()


# ---- on a Ray cluster (--executor ray) ----------------------------------------------------------

def export_on_ray(job: ExportJob, groups: list[list[str]], address: str, progress
                  ) -> tuple[dict[str, NetworkResult], RaySchedule]:
    """Each weight group a Ray task (export_on_node) asking for an export process's peak; the nodes write
    into the run's staged folder, which every node sees at the same path. The bytes are a local run's."""
    done: dict[str, NetworkResult] = {}
    work = [RemoteJob("export " + "+".join(group), peak, export_on_node, (job, group))
            for group, peak in zip(groups, _planned_peaks(job, groups))]
    schedule = run_on_ray(work, address, lambda _, result: _finished(result["networks"], done, progress))
    return done, schedule


def export_on_node(job: ExportJob, group: list[str]) -> dict:
    """A Ray task: one weight group exported on this node, into the run's folder."""
    node = node_name()
    if not job.folder.is_dir():
        raise GraphoptError(f"Ray node {node} cannot see the run's folder {job.folder}. --executor ray needs --out's "
                            "folder at the same path on every node: a shared filesystem (README, \"Building on a Ray "
                            "cluster\").")
    try:
        _worker_start(job, 1)  # one thread: the task asked Ray for one CPU
        return {"networks": _worker_export(group), "node": node}
    except GraphoptError as error:
        raise GraphoptError(f"on Ray node {node}: {error}") from None
