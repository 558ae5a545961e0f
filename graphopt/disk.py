"""Disk stated before a run and measured after it: what the run will write and where, refused up front when
a filesystem cannot hold it (an 8B build writes 32 GB of ONNX, 11 GB of net cache and a 6 GB bmodel; a run
that fills the disk half-way loses the hour it took to get there).

The export's part is here (fp32 ONNX: four bytes per weight of each network); a target build adds its own
(TargetBuild.disk_needs).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from graphopt.errors import GraphoptError

MARGIN = 1 << 30  # left free on every filesystem: logs, MLIR text, the filesystem's own needs


@dataclass(frozen=True)
class DiskNeed:
    what: str  # "ONNX networks", "net cache", ...
    path: Path  # where it is written (the filesystem is that of its nearest existing folder)
    bytes: int


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (links not followed)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root, name)
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def onnx_bytes(source, runtime) -> int:
    """The export's ONNX: each network's weights in fp32. Past EXTERNAL_DATA_BYTES a network's weights go to a
    data file the networks with the same weights share (block_i and block_cache_i); below it each file holds
    its own copy. (Tables and masks are left out: small beside the weights of any model that fills a disk.)"""
    from graphopt import contract as c
    from graphopt.onnx_ir import EXTERNAL_DATA_BYTES

    if source.is_encoder_decoder:
        return 4 * source.parameter_count
    parts = source.parts
    per_layer = 4 * sum(p.numel() for p in parts.layers[0].parameters()) if len(parts.layers) else 0
    copies = sum(1 for n in runtime.networks if n.kind in c.BLOCKS)
    blocks = per_layer * len(parts.layers) * (copies if per_layer <= EXTERNAL_DATA_BYTES else 1)
    return blocks + 4 * sum(p.numel() for m in (parts.embed, parts.norm, parts.head) for p in m.parameters())


def describe(needs: list[DiskNeed]) -> str:
    return ", ".join(f"{n.what} {_gb(n.bytes)}" for n in needs)


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


@dataclass
class DiskUse:
    """A run's disk: what was planned, then (`finish`) what it wrote: --out's files, and what each other place
    grew by."""

    planned: list[DiskNeed]
    before: dict[str, int]  # bytes under each place outside --out, at the start
    written: dict[str, int] | None = None  # place -> bytes, --out first; set by finish

    @classmethod
    def start(cls, planned: list[DiskNeed], out: Path) -> "DiskUse":
        places = {str(n.path) for n in planned if not _inside(n.path, out)}
        return cls(planned, {p: tree_bytes(Path(p)) if Path(p).exists() else 0 for p in sorted(places)})

    def finish(self, out: Path) -> None:
        grown = {p: (tree_bytes(Path(p)) if Path(p).exists() else 0) - b for p, b in self.before.items()}
        self.written = {str(out): tree_bytes(out), **grown}

    def to_json(self) -> dict:
        return {"planned": {n.what: n.bytes for n in self.planned}, "written": self.written}

    def report_line(self) -> str:
        (out, in_out), *others = self.written.items()
        grown = "".join(f", {p} {'+' if b >= 0 else ''}{_gb(b)}" for p, b in others)
        return f"  disk: planned {describe(self.planned)}; written {_gb(in_out)} to {out}{grown}"


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(path).absolute(), Path(folder).absolute()
    return path == folder or folder in path.parents


def check(needs: list[DiskNeed]) -> None:
    """Refuses (GraphoptError) when some filesystem has less free space than what the run writes to it."""
    by_device: dict[int, list[DiskNeed]] = {}
    for need in needs:
        by_device.setdefault(os.stat(_existing(need.path)).st_dev, []).append(need)
    for group in by_device.values():
        wanted, free = sum(n.bytes for n in group) + MARGIN, free_bytes(group[0].path)
        if wanted > free:
            where = "; ".join(f"{n.what} {n.bytes / 1e9:.1f} GB in {_existing(n.path)}" for n in group)
            raise GraphoptError(
                f"Not enough disk: this run writes about {wanted / 1e9:.1f} GB ({where}, and {MARGIN / 1e9:.1f} GB "
                f"to spare) to a filesystem with {free / 1e9:.1f} GB free. Nothing was written. Free some space, or "
                "put --out (and the net cache, GRAPHOPT_NET_CACHE) on a larger disk; a net cache that already holds "
                "this model's nets needs less than stated.")
