"""graphopt.scheduler: jobs planned by their own memory (issue 22). Real threads; each job records who ran beside it."""

import threading
import time

import pytest

from graphopt.scheduler import Job, fits, run_jobs

GB = 1 << 30


class Recorder:
    """Each job, while it runs, notes the jobs running with it."""

    def __init__(self):
        self.lock, self.running, self.beside, self.order, self.ended = threading.Lock(), set(), {}, [], []
        self.started: dict[str, threading.Event] = {}

    def job(self, name: str, memory: int, seconds: float = 0.05, after: tuple[str, ...] = (),
            until: str = "") -> Job:
        """`until`: the job runs until that job has started (then `seconds` more)."""
        for n in (name, until):
            self.started.setdefault(n, threading.Event())

        def run():
            with self.lock:
                self.running.add(name)
                self.order.append(name)
            self.started[name].set()
            if until:
                assert self.started[until].wait(10)
            time.sleep(seconds)
            with self.lock:
                self.beside[name] = set(self.running) - {name}
                self.running.discard(name)
                self.ended.append(name)
            return name.upper()
        return Job(name, memory, run, after)


def test_small_jobs_run_together_and_a_big_one_runs_where_it_fits():
    # The 8B build's shape: lm_head and embedding need 11.5 GB each, blocks 5.4 GB, 20 GB to spend, 2 cores.
    rec = Recorder()
    jobs = [rec.job("embedding", int(11.5 * GB)), rec.job("lm_head", int(11.5 * GB))]
    jobs += [rec.job(f"block_{i}", int(5.4 * GB)) for i in range(4)]
    schedule = run_jobs(jobs, parallel=2, budget=20 * GB)
    assert schedule.results == {j.name: j.name.upper() for j in jobs}
    assert rec.order[0] in ("embedding", "lm_head")  # biggest first
    assert "lm_head" not in rec.beside["embedding"] and "embedding" not in rec.beside["lm_head"]
    assert any(rec.beside[f"block_{i}"] & {f"block_{j}" for j in range(4)} for i in range(4))
    assert schedule.most_at_once == 2 and schedule.most_memory <= 20 * GB


def test_a_job_bigger_than_the_budget_runs_alone():
    rec = Recorder()
    schedule = run_jobs([rec.job("huge", 30 * GB), rec.job("small", GB)], parallel=2, budget=20 * GB)
    assert rec.beside["huge"] == set() and rec.order == ["huge", "small"]
    assert schedule.most_memory == 30 * GB


def test_parallel_bounds_the_jobs_at_once():
    rec = Recorder()
    schedule = run_jobs([rec.job(f"n{i}", GB) for i in range(5)], parallel=1, budget=100 * GB)
    assert all(not beside for beside in rec.beside.values()) and schedule.most_at_once == 1


def test_the_first_error_stops_new_jobs_and_is_raised():
    started = []

    def failing():
        raise RuntimeError("model_deploy failed for block_0")

    jobs = [Job("block_0", 2 * GB, failing)] + [Job(f"later_{i}", GB, lambda i=i: started.append(i)) for i in range(3)]
    with pytest.raises(RuntimeError, match="block_0"):
        run_jobs(jobs, parallel=1, budget=10 * GB)
    assert started == []


def test_a_job_waits_for_the_jobs_it_is_after_while_others_can_start():
    # An 8B build's blocks: block_2..4 take their model_transform output from a recipe block_0 and block_1 teach, so
    # those two start first (though the decode blocks are bigger) and the others once both have finished; the
    # decode blocks, which wait for nothing, fill the slots meanwhile.
    rec = Recorder()
    teachers = ("block_0", "block_1")
    jobs = [rec.job("block_0", GB), rec.job("block_1", GB, seconds=0, until="block_cache_2")]
    jobs += [rec.job(f"block_{i}", GB, after=teachers) for i in (2, 3, 4)]
    # block_cache_2 holds its slot until block_2 has started: no slot falls idle, whatever the machine's speed
    jobs += [rec.job(f"block_cache_{i}", 2 * GB, **({"seconds": 0, "until": "block_2"} if i == 2 else {}))
             for i in range(3)]
    schedule = run_jobs(jobs, parallel=2, budget=100 * GB)
    assert schedule.early == [] and "started before" not in schedule.describe()
    for i in (2, 3, 4):
        assert rec.order.index(f"block_{i}") > max(rec.ended.index(t) for t in teachers), (rec.order, rec.ended)
    assert rec.order[:5] == ["block_0", "block_1", "block_cache_0", "block_cache_1", "block_cache_2"], rec.order


def test_a_waiting_job_starts_early_rather_than_leave_a_slot_idle():
    rec = Recorder()
    jobs = [rec.job("block_0", GB, seconds=0.3), rec.job("block_2", GB, after=("block_0", "block_1"))]
    schedule = run_jobs(jobs, parallel=2, budget=100 * GB)  # block_1 is not in the run (cached): not waited for
    assert rec.beside["block_2"] == {"block_0"} and schedule.early == ["block_2"]
    assert "started before the jobs they wait for: block_2" in schedule.describe()
    rec = Recorder()
    run_jobs([rec.job("block_0", GB), rec.job("block_2", GB, after=("block_0",))], parallel=1, budget=100 * GB)
    assert rec.order == ["block_0", "block_2"]


def test_fits():
    small, big = Job("s", GB, None), Job("b", 15 * GB, None)
    assert fits([], big, 1, GB)  # nothing running: even a job over budget starts
    assert fits([small], small, 2, 2 * GB) and not fits([small], big, 2, 10 * GB) and not fits([small], small, 1, 99 * GB)
