"""Runs jobs in threads by their own memory: as many at once as `parallel` allows and as their estimated
peaks fit in a memory budget. Biggest first; a job that does not fit waits for running ones to finish,
and one bigger than the whole budget runs alone. (Sizing every job for the biggest one, as a fixed
pool must, ran an 8B build's 64 block nets one at a time because lm_head needs 11 GB.)
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Job:
    name: str
    memory: int  # bytes: the job's estimated peak, its own processes included
    run: Callable[[], Any]


@dataclass
class Schedule:
    """What the scheduler did: the most jobs that ran at once and the most memory they were planned to hold."""

    parallel: int
    budget: int
    most_at_once: int = 0
    most_memory: int = 0
    results: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"up to {self.most_at_once} at once (of {self.parallel}), planned peak "
                f"{self.most_memory / 2**30:.1f} GiB of a {self.budget / 2**30:.1f} GiB budget")


def fits(running: list[Job], job: Job, parallel: int, budget: int) -> bool:
    """`job` may start beside `running`: a free slot, and its memory fits (or nothing else is running)."""
    if len(running) >= parallel:
        return False
    return not running or sum(j.memory for j in running) + job.memory <= budget


def run_jobs(jobs: list[Job], parallel: int, budget: int, done: Callable[[Job, Any], None] | None = None) -> Schedule:
    """Runs every job; `done(job, result)` is called (in the caller's thread) as each finishes. The first error stops
    new jobs from starting; the running ones finish, then it is raised."""
    schedule = Schedule(parallel, budget)
    pending = sorted(jobs, key=lambda j: -j.memory)
    running: dict[Future, Job] = {}
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        while pending or running:
            for job in list(pending):
                if fits(list(running.values()), job, parallel, budget):
                    pending.remove(job)
                    running[pool.submit(job.run)] = job
            schedule.most_at_once = max(schedule.most_at_once, len(running))
            schedule.most_memory = max(schedule.most_memory, sum(j.memory for j in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                if future.exception() is not None:
                    wait(running)
                    raise future.exception()
                schedule.results[job.name] = future.result()
                if done is not None:
                    done(job, future.result())
    return schedule
