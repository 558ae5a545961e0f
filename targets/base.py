"""What a target is: its ordered pass pipelines per stage, and what it does with the emitted networks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class TargetBuild(Protocol):
    """What a hardware target does after the ONNX networks are written (vendor compiler, checks)."""

    def validate(self, source, options: dict[str, Any]) -> None:
        """Raise GraphoptError for anything wrong with the options or the set-up, before any work."""

    def disk_needs(self, source, options: dict[str, Any], runtime, out: Path) -> list:
        """What the build writes (graphopt.disk.DiskNeed), beyond the export's ONNX, for the refusal up front."""

    def build(self, folder: Path, manifest: dict, source, options: dict[str, Any], check: bool,
              show_progress: bool, top_pipeline: tuple[str, ...] = ()) -> "TargetResult": ...


class TargetResult(Protocol):
    ok: bool
    seconds: dict[str, float]  # per stage, merged into the run's stage times

    def report_lines(self) -> list[str]: ...

    def to_json(self) -> dict: ...


@dataclass(frozen=True)
class Target:
    """A target's pipelines, in the order a network goes through them: FX passes on the traced graph,
    ONNX passes on the exported model, then (for a hardware target) top passes on its own IR."""

    name: str
    description: str
    fx_pipeline: tuple[str, ...]
    onnx_pipeline: tuple[str, ...]
    build: TargetBuild | None = None  # None: the ONNX files are the product
    top_pipeline: tuple[str, ...] = ()

    def pipeline(self, stage: str) -> tuple[str, ...]:
        return {"fx": self.fx_pipeline, "onnx": self.onnx_pipeline, "top": self.top_pipeline}[stage]

    def check_dump_after(self, dump_after: frozenset[str] | None) -> None:
        """--dump-after names passes of the FX or ONNX stage (the top stage keeps its own MLIR files)."""
        from graphopt.errors import GraphoptError

        dumpable = [*self.fx_pipeline, *self.onnx_pipeline]
        unknown = sorted(set(dump_after or ()) - set(dumpable))
        if unknown:
            raise GraphoptError(f"--dump-after {', '.join(unknown)}: no such pass in the {self.name} pipeline "
                                f"({', '.join(dumpable)}); name one of those, or 'all'.")
