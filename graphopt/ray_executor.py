"""Jobs on an existing Ray cluster (`--executor ray`): each job one Ray task that asks for its estimated peak
memory and one CPU, so Ray places them across the nodes by memory, as graphopt.scheduler does on one
machine. The driver keeps the results in the order they finish; the first failure cancels the rest.
Two kinds of job run there: a weight group's export (graphopt.export_pool.export_on_node) and a net's
compile (for bm1684x, deploy.compile_on_node).

Every node needs graphopt (the same version), the model's checkpoint at the same path (unless
--random-weights), what the compiles run (for bm1684x: the toolchain, from `graphopt toolchain install
bm1684x`, at the same path), and sees the driver's output folder at the same path (a shared filesystem).
Ray itself is optional: `pip install 'graphopt[ray]'`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from graphopt.errors import GraphoptError


@dataclass(frozen=True)
class RemoteJob:
    name: str
    memory: int  # bytes: the task's estimated peak (Ray's `memory` resource)
    function: Callable  # a module-level function, importable on the nodes
    args: tuple


@dataclass
class RaySchedule:
    address: str
    nodes: int  # alive nodes of the cluster
    ran_on: dict[str, str] = field(default_factory=dict)  # job -> the node (its IP) that ran it
    results: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        used = sorted(set(self.ran_on.values()))
        return f"on Ray at {self.address}: {len(self.ran_on)} tasks on {len(used)} of {self.nodes} nodes"


def address_of(executor: str | None, ray_address: str | None) -> str | None:
    """Where the run's tasks go: a Ray address ("auto": $RAY_ADDRESS or a node on this machine) for
    --executor ray; None for this machine."""
    if ray_address and executor != "ray":
        raise GraphoptError("--ray-address is where --executor ray sends the export and the compiles; give "
                            "--executor ray too, or leave --ray-address out to build on this machine.")
    return (ray_address or "auto") if executor == "ray" else None


def node_name() -> str:
    """The Ray node this task runs on: its IP and the start of its id (nodes on one machine share the IP)."""
    import ray

    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"


def connect(address: str | None):
    """The `ray` module, connected to the cluster at `address` ("auto": $RAY_ADDRESS or a node on this machine)."""
    try:
        import ray
    except ImportError:
        raise GraphoptError("--executor ray needs Ray installed beside graphopt: pip install 'graphopt[ray]' (or "
                            "pip install ray), then run again; or leave --executor out to build on this machine.") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address or "auto", log_to_driver=False, logging_level="ERROR",
                     configure_logging=False)
        except (ConnectionError, RuntimeError) as error:
            raise GraphoptError(f"--executor ray found no Ray cluster at {address or 'auto'} ({error}). Start one "
                                "(`ray start --head` on the first node, `ray start --address HEAD:6379` on the others), "
                                "then give its address with --ray-address HEAD:6379 or RAY_ADDRESS.") from None
    return ray


def _largest_node_memory(ray) -> int:
    return max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)


def run_on_ray(jobs: list[RemoteJob], address: str | None, done: Callable[[RemoteJob, Any], None] | None = None
               ) -> RaySchedule:
    """Runs every job as a Ray task; a job's result must be a dict with a "node" key (where it ran)."""
    ray = connect(address)
    schedule = RaySchedule(address or "auto", sum(1 for n in ray.nodes() if n["Alive"]))
    ceiling = _largest_node_memory(ray)  # a task asking more than any node has would wait forever
    refs = {}
    for job in jobs:
        task = ray.remote(job.function).options(num_cpus=1, memory=max(1, min(job.memory, ceiling)), max_retries=0,
                                                name=f"graphopt:{job.name}")
        refs[task.remote(*job.args)] = job
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        job = refs.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayTaskError as error:
            for ref in refs:
                ray.cancel(ref, force=True)
            cause = error.cause
            if isinstance(cause, GraphoptError):
                raise GraphoptError(str(cause)) from None
            raise
        schedule.ran_on[job.name] = result["node"]
        schedule.results[job.name] = result
        if done is not None:
            done(job, result)
    return schedule
