"""model_transform for many nets in one process: a transform_server.py per compile thread, started on first
use, that runs TPU-MLIR's own model_transform.py for each net without paying its imports again and without
the copies graphopt's ONNX never needs (transform_server.py says which, with the measurements). One
Llama-3.1-8B block: 19.7 s as a command, 5.5 s here; the MLIR and weights are the same bytes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
from pathlib import Path

from graphopt.targets.bm1684x.toolchain import Toolchain

SERVER = Path(__file__).with_name("transform_server.py")


class TransformServers:
    """One server per thread (a compile job runs one net at a time); `close` stops them all."""

    def __init__(self):
        self._local = threading.local()
        self._all: list[subprocess.Popen] = []
        self._busy: set[int] = set()  # pids of the servers transforming a net now
        self._lock = threading.Lock()

    def run(self, toolchain: Toolchain, args: list[str], cwd: Path, log: Path, threads: int | None = None,
            peak_rss: dict[str, int] | None = None, keep_converter_weights: bool = False,
            kept: list[bool] | None = None) -> int:
        """model_transform with `args` in `cwd`, its output appended to `log`: the exit status (negative: the
        server was killed by that signal, as Popen reports a command's). `keep_converter_weights`: the top MLIR
        names the converter's weights file instead of one tpuc-opt writes (transform_server.py); `kept` gets
        whether it did."""
        with open(log, "a") as handle:
            handle.write(f"$ model_transform {shlex.join(args)}"
                         + (" (the top MLIR naming the converter's weights file)\n" if keep_converter_weights else "\n"))
        with self._lock:
            server = self._server(toolchain, threads)
            self._busy.add(server.pid)
        try:
            server.stdin.write(json.dumps({"args": args, "cwd": str(cwd), "log": str(log),
                                           "keep_converter_weights": keep_converter_weights}) + "\n")
            server.stdin.flush()
            answer = server.stdout.readline()
        except BrokenPipeError:
            answer = ""
        finally:
            with self._lock:
                self._busy.discard(server.pid)
        if not answer:  # the server died with the net (killed for memory, most likely): the next net starts another
            self._local.server = None
            return server.wait() or 1
        result = json.loads(answer)
        if peak_rss is not None:
            peak_rss["model_transform"] = max(peak_rss.get("model_transform", 0), result["peak_rss"])
        if kept is not None:
            kept.append(result.get("kept_converter_weights", False))
        return result["status"]

    def _server(self, toolchain: Toolchain, threads: int | None) -> subprocess.Popen:
        """This thread's server, started if it has none (called with `_lock` held, as make_room reads `_all`)."""
        server = getattr(self._local, "server", None)
        if server is None or server.poll() is not None or server not in self._all:  # (make_room stops idle ones)
            server = subprocess.Popen([str(toolchain.python), str(SERVER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      env=toolchain.environ(threads, huge_pages=True), text=True)
            self._local.server = server
            self._all.append(server)
        return server

    def make_room(self, planned: int, budget: int) -> int:
        """Stops the idle servers when `planned` bytes (a net's model_deploy, its own server counted) and what
        they hold would not fit in `budget` together; they start again when a net wants one (3.4 s of imports).
        With --max-memory 8, an 8B head's model_deploy (5.9 GiB) runs alone, and the two idle servers' 1.16 GiB
        took the run past 7.5 GiB. Returns how many it stopped."""
        with self._lock:
            idle = [s for s in self._all if s.poll() is None and s.pid not in self._busy]
            if planned + sum(_resident(s.pid) for s in idle) <= budget:
                return 0
            self._all = [s for s in self._all if s not in idle]
        for server in idle:
            _stop(server)
        return len(idle)

    def close(self) -> None:
        with self._lock:
            servers, self._all = self._all, []
        for server in servers:
            _stop(server)
        self._local = threading.local()


def _stop(server: subprocess.Popen) -> None:
    """A server ends when its input does (a stopped one is started again by the next `run` of its thread)."""
    if server.poll() is None:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _resident(pid: int) -> int:
    """A process's resident bytes (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
