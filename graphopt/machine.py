"""What this machine can give a parallel stage: cores and available memory (capped by --max-memory); and
the environment of the processes graphopt starts."""

from __future__ import annotations

import os
from pathlib import Path

_memory_limit: int | None = None  # --max-memory, bytes: the run's share, whatever the machine has


def limit_memory(limit: int | None) -> None:
    """From now on this run plans its processes (export workers, compiles) to hold at most `limit` bytes at once."""
    global _memory_limit
    _memory_limit = limit


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable; 8 GiB if unknown), at most
    the run's --max-memory."""
    found = 8 << 30
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return min(found, _memory_limit) if _memory_limit else found


def memory_budget() -> int:
    """What the processes of a parallel stage (export workers, compiles) may hold together: available memory,
    less 1 GiB for graphopt's own process."""
    return max(1 << 30, available_memory() - (1 << 30))


def parallel_jobs(bytes_per_job: int) -> int:
    """As many jobs as cores, fewer when available memory would not hold `bytes_per_job` each."""
    return max(1, min(os.cpu_count() or 1, available_memory() // bytes_per_job))


# glibc's malloc backs its large (mmap'd) chunks with transparent huge pages when this tunable is set
# (glibc >= 2.35; older glibc ignores it; it takes effect where THP is "madvise" or "always", the
# distributions' default). Every stage here streams gigabytes of weights through fresh buffers: ONNX
# external data read into protobuf, numpy and npz copies, tpuc-opt's weight files. On the 2-core dev VM,
# faulting those in 4 KiB pages cost more than the copying (perf: clear_page under the page fault, half
# of model_transform's samples); with it the 1-layer Llama-3.1-8B build took 169 s instead of 234 s.
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


def with_huge_page_malloc(env: dict[str, str]) -> dict[str, str]:
    """`env` with HUGE_PAGE_MALLOC added to GLIBC_TUNABLES (a hugetlb setting of the caller's own is kept)."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith(HUGE_PAGE_MALLOC.split("=")[0] + "=") for t in tunables):
        tunables.append(HUGE_PAGE_MALLOC)
    return {**env, "GLIBC_TUNABLES": ":".join(tunables)}


def without_huge_page_malloc(env: dict[str, str]) -> dict[str, str]:
    """`env` without HUGE_PAGE_MALLOC (glibc's default malloc for the tools that do not get it)."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != HUGE_PAGE_MALLOC]
    env = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
    return {**env, "GLIBC_TUNABLES": ":".join(tunables)} if tunables else env


def huge_page_malloc_for_children() -> None:
    """Every process started from here on (export workers, TPU-MLIR's tools) gets HUGE_PAGE_MALLOC. This
    process's own malloc read GLIBC_TUNABLES when it started and is not changed."""
    os.environ["GLIBC_TUNABLES"] = with_huge_page_malloc(dict(os.environ))["GLIBC_TUNABLES"]
