"""What this machine can give a parallel stage: cores and available memory."""

from __future__ import annotations

import os
from pathlib import Path


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable); 8 GiB if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def parallel_jobs(bytes_per_job: int) -> int:
    """As many jobs as cores, fewer when available memory would not hold `bytes_per_job` each."""
    return max(1, min(os.cpu_count() or 1, available_memory() // bytes_per_job))
