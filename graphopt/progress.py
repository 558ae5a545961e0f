"""Progress on stderr: a bar over the networks (on a terminal) and one line per finished network."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, enabled: bool = True, workers: int = 1):
        self.enabled = enabled
        self.started = time.perf_counter()
        self._net_started = self.started
        self.bar = tqdm(total=total, unit="net", file=sys.stderr, dynamic_ncols=True, leave=False,
                        disable=None if enabled else True)
        if workers > 1:  # networks finish out of order: the bar says how many are in flight
            self.bar.set_description(f"{workers} processes")

    def start(self, name: str) -> None:
        self._net_started = time.perf_counter()
        self.bar.set_description(name)

    def stage(self, stage: str) -> None:
        self.bar.set_postfix_str(stage)

    def finish(self, name: str, ok: bool, took: float | None = None) -> None:
        self.bar.update(1)
        if self.enabled:
            took = time.perf_counter() - self._net_started if took is None else took
            total = time.perf_counter() - self.started
            mark = "ok" if ok else "CHECK FAILED"
            self.bar.write(f"  {name:<22} {took:6.1f}s  (elapsed {total:6.1f}s)  {mark}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
