"""Runs jobs in threads by their own memory: as many at once as `parallel` allows and as their estimated
peaks fit in a memory budget. Biggest first; a job that does not fit waits for running ones to finish,
and one bigger than the whole budget runs alone. (Sizing every job for the biggest one, as a fixed
pool must, ran an 8B build's 64 block nets one at a time because lm_head needs 11 GB.)

A job may name jobs it would rather start after (`Job.after`: their results make it cheaper, as a block's
model_transform recipe, learned from its graph's first two nets, does the third). It waits for them while any
other job can start, and starts before them only rather than leave a slot idle; and jobs others wait for start
before the rest, so that what they make is there when it is wanted.
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
    after: tuple[str, ...] = ()  # jobs it would rather start after (a soft dependency: see the module's doc)


@dataclass
class Schedule:
    """What the scheduler did: the most jobs that ran at once and the most memory they were planned to hold."""

    parallel: int
    budget: int
    most_at_once: int = 0
    most_memory: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    early: list[str] = field(default_factory=list)  # jobs started before their `after`, rather than leave a slot idle

    def describe(self) -> str:
        early = f"; started before the jobs they wait for: {', '.join(self.early)}" if self.early else ""
        return (f"up to {self.most_at_once} at once (of {self.parallel}), planned peak "
                f"{self.most_memory / 2**30:.1f} GiB of a {self.budget / 2**30:.1f} GiB budget{early}")


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
    unfinished = {j.name for j in jobs}
    waited_for = {name for j in jobs for name in j.after}
    running: dict[Future, Job] = {}

    def waits(job: Job) -> bool:
        return any(name in unfinished for name in job.after)

    def order(job: Job) -> tuple[bool, bool]:  # sorted stably: each group biggest first
        return waits(job), job.name not in waited_for

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        while pending or running:
            for job in sorted(pending, key=order):
                if fits(list(running.values()), job, parallel, budget):
                    if waits(job):
                        schedule.early.append(job.name)
                    pending.remove(job)
                    running[pool.submit(job.run)] = job
            schedule.most_at_once = max(schedule.most_at_once, len(running))
            schedule.most_memory = max(schedule.most_memory, sum(j.memory for j in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                unfinished.discard(job.name)
                if future.exception() is not None:
                    wait(running)
                    raise future.exception()
                schedule.results[job.name] = future.result()
                if done is not None:
                    done(job, future.result())
    return schedule
