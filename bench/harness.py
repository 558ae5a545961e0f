"""What every bench script shares: run a command and measure it, describe the machine, print a
markdown table, write JSON.

A measured command runs as a child process, so its memory is its own, not the bench script's.
Two figures: the peak of the whole process tree's memory (summed PSS, sampled every 0.2 s
from /proc: what a machine must hold when graphopt exports with several processes) and the
largest single process's peak RSS (exact, from wait4). And the CPU seconds of the tree, in user
space and in the kernel (wait4: the command and every descendant it waited for): on a VM that
gives freed memory back to its host, the kernel's share is mostly zeroing memory touched for the
first time, and it can exceed the tools' own work.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@dataclass
class Measured:
    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_gb: float  # the process tree's summed PSS, sampled (at least the largest process's RSS)
    log: str  # where stdout and stderr went
    peak_process_rss_gb: float = 0.0  # the largest single process, exact
    cpu_user_s: float = 0.0  # the tree's CPU time in user space (0 in results written before it was measured)
    cpu_system_s: float = 0.0  # ... and in the kernel on its behalf

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def measure(command: list[str], log: Path, env: dict[str, str] | None = None) -> Measured:
    """Run `command` to completion (output to `log`); wall time and peak RSS of its process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        peak_tree = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_tree = max(peak_tree, tree_rss(proc.pid))
            time.sleep(0.2)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_process = usage.ru_maxrss * 1024
    result = Measured(command, proc.returncode, round(wall, 1), round(max(peak_tree, peak_process) / 2**30, 2),
                      str(log), round(peak_process / 2**30, 2), round(usage.ru_utime, 1), round(usage.ru_stime, 1))
    verdict = "ok" if result.ok else f"FAILED (exit {result.returncode}, log {log})"
    print(f"  {wall:7.1f} s, peak RSS {result.peak_rss_gb:.2f} GB, CPU {result.cpu_user_s:.0f} s user + "
          f"{result.cpu_system_s:.0f} s system, {verdict}", file=sys.stderr, flush=True)
    return result


def tree_rss(root: int) -> int:
    """Memory of `root` and all its descendants, from /proc: the sum of their PSS (each shared
    page divided among the processes that map it), so N processes that each map the same
    libtorch are not counted N times, as summed RSS would."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _pss(pid)
        stack += children.get(pid, [])
    return total


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def graphopt_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "graphopt", *args]


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def machine() -> dict:
    """The machine the numbers were taken on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal"))
    versions = {}
    for module in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_kb / 2**20, 1),
            "python": platform.python_version(), **versions}


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return "–" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(name: str, title: str, table: str, data: dict, json_path: str | None) -> Path:
    """Print the table (with the machine) and write the JSON next to the other results."""
    path = Path(json_path) if json_path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"bench": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(), **data}  # data may bring its own
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=_plain) + "\n")
    tmp.rename(path)
    m = data["machine"]
    print(f"\n### {title}\n\nMachine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; "
          f"Python {m['python']}, torch {m.get('torch')}, transformers {m.get('transformers')}.\n")
    print(table)
    print(f"\n(JSON: {path})")
    return path


def _plain(value):
    if isinstance(value, Measured):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)
