"""The export spread over processes: one weight group (a layer's block and decode block; the embedding
and the heads) per task, so a group shares its external data file and each process holds one network's
weights at a time. Spawned, not forked: a fork of a process whose OpenMP pool has run can deadlock.
Every network's bytes are the same whichever process writes them (tests/test_determinism.py)."""

from __future__ import annotations

import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

from graphopt.export import ExportJob, NetworkResult, export_in_group
from graphopt.machine import parallel_jobs
from graphopt.models.source import ModelSource
from graphopt.onnx_ir import SharedData
from graphopt.plugins import reload_in_worker

_WORKER: dict = {}


def default_export_jobs(source: ModelSource) -> int:
    """1 for small models (starting a process costs more than it saves); otherwise as many as
    cores, fewer when memory would not hold them: an 8B export process peaked at 4.2 GB with
    its largest network's weights at 2.1 GB, so budget twice the largest network + 1 GB."""
    if source.is_small:
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
    import torch

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


def export_in_parallel(job: ExportJob, groups: list[list[str]], jobs: int, progress) -> dict[str, NetworkResult]:
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
