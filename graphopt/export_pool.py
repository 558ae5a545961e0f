"""The export spread over processes, or over a Ray cluster's nodes: one weight group (a layer's block and
decode block; the embedding and the heads) per task, so a group shares its external data file and each
process holds one network's weights at a time. Spawned, not forked: a fork of a process whose OpenMP pool
has run can deadlock.
Every network's bytes are the same whichever process writes them (tests/test_determinism.py)."""

from __future__ import annotations

import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

from graphopt.errors import GraphoptError
from graphopt.export import ExportJob, NetworkResult, export_in_group
from graphopt.machine import parallel_jobs
from graphopt.models.source import ModelSource
from graphopt.onnx_ir import SharedData
from graphopt.plugins import reload_in_worker
from graphopt.ray_executor import RaySchedule, RemoteJob, node_name, run_on_ray

_WORKER: dict = {}


def export_peak(source: ModelSource) -> int:
    """An export process's peak: an 8B export process peaked at 4.2 GB with its largest network's weights at
    2.1 GB, so twice the largest network + 1 GB."""
    if source.is_encoder_decoder:
        parts = source.seq2seq_parts
        heaviest = (parts.encoder, parts.head, parts.layers[0])
    else:
        parts = source.parts
        heaviest = (parts.embed, parts.head, parts.layers[0])
    largest = max(sum(p.numel() * 4 for p in m.parameters()) for m in heaviest)
    return 2 * largest + (1 << 30)


def default_export_jobs(source: ModelSource) -> int:
    """1 for small models (starting a process costs more than it saves); otherwise as many as
    cores, fewer when memory would not hold them (export_peak each)."""
    return 1 if source.is_small else parallel_jobs(export_peak(source))


def export_jobs(source: ModelSource, jobs: int | None) -> int:
    """Export processes: `jobs` (--jobs; default: default_export_jobs), never more than the memory the run may
    hold has room for (export_peak each), as the compiles are planned: --jobs 2 --max-memory 8 on an 8B
    model exports with one process."""
    return min(jobs or default_export_jobs(source), parallel_jobs(export_peak(source)))


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


def export_in_parallel(job: ExportJob, groups: list[list[str]], jobs: int, progress) -> dict[str, NetworkResult]:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done: dict[str, NetworkResult] = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                             initargs=(job, threads)) as pool:
        futures = [pool.submit(_worker_export, group) for group in groups]
        try:
            for future in as_completed(futures):
                _finished(future.result(), done, progress)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return done


# ---- on a Ray cluster (--executor ray) ----------------------------------------------------------

def export_on_ray(job: ExportJob, groups: list[list[str]], address: str, progress
                  ) -> tuple[dict[str, NetworkResult], RaySchedule]:
    """Each weight group a Ray task (export_on_node) asking for an export process's peak; the nodes write
    into the run's staged folder, which every node sees at the same path. The bytes are a local run's."""
    peak = export_peak(job.source)
    done: dict[str, NetworkResult] = {}
    work = [RemoteJob("export " + "+".join(group), peak, export_on_node, (job, group)) for group in groups]
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
