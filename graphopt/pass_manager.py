"""Passes, their registry, and the manager that runs a pipeline of them over a network.

A pass is a class with a `name`, a one-line docstring, the network kinds it `applies_to`,
the properties it `requires` (established by earlier passes) and the ones it `ensures`.
Its `run(net)` rewrites `net` in place and returns a short note of what it did; when it
cannot find what it rewrites it raises `PassMatchError` saying what was missing. Built-in
passes and user passes register the same way, with `@register_pass`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from graphopt.errors import GraphoptError
from graphopt.ir import NetworkGraph

# Network kinds. An encoder-decoder model's decoder blocks have a cross-attention besides the
# self-attention, and no rotary embedding; they are blocks for every pass that is not about rope.
PREFILL_BLOCKS = frozenset({"block", "decoder_block"})
DECODE_BLOCKS = frozenset({"block_cache", "decoder_block_cache"})
BLOCKS = PREFILL_BLOCKS | DECODE_BLOCKS
ALL_KINDS = BLOCKS | frozenset({"embedding", "lm_head", "greedy_head", "penalty_sample_head", "encoder", "cross_kv"})


class Pass:
    name: ClassVar[str]
    level: ClassVar[str] = "fx"  # "fx": runs on a NetworkGraph; "onnx": on an OnnxNetwork after export
    applies_to: ClassVar[frozenset[str]] = ALL_KINDS
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    # Where a user pass goes in a target's pipeline: after or before the pass of that name (one of
    # the two; --insert-after/--insert-before override it). Built-in passes are placed by the targets.
    insert_after: ClassVar[str | None] = None
    insert_before: ClassVar[str | None] = None

    def run(self, net: NetworkGraph) -> str:
        """Rewrite `net` in place; return a one-line note of what changed."""
        raise NotImplementedError

    @classmethod
    def doc(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} needs a `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise GraphoptError(f"two passes are registered under the name '{cls.name}': "
                            f"{_REGISTRY[cls.name].__module__} and {cls.__module__}; rename one of them.")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    import graphopt.passes  # noqa: F401  (importing the package registers the built-ins)

    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise GraphoptError(f"no pass is named '{name}'. Known passes: {', '.join(sorted(passes))}.")
    return passes[name]


@dataclass
class PassRecord:
    network: str
    pass_name: str
    note: str
    seconds: float


class PassManager:
    """Runs an ordered list of passes over one network at a time.

    After each pass the network is finalized (dead code removed, shapes re-propagated), the
    pass's `ensures` are added to the network's properties, and, when `dump_dir` is set,
    the graph is written to `dump_dir/<network>/<phase>-<NN>-<pass>.py|.txt` for reading (after the
    passes named in `dump_after` only, when it is given; the input is always written).
    """

    def __init__(self, pass_names: list[str], dump_dir: Path | None = None, phase: str = "fx",
                 dump_after: frozenset[str] | None = None):
        self.passes = [get_pass(n)() for n in pass_names]
        self.dump_dir, self.phase = dump_dir, phase
        self.dump_after = dump_after  # the passes after which to dump; None: every pass

    def run(self, net: NetworkGraph) -> list[PassRecord]:
        records = []
        self._dump(net, 0, "input")
        for index, p in enumerate(self.passes, start=1):
            if net.kind not in p.applies_to:
                continue
            missing = [r for r in p.requires if r not in net.properties]
            if missing:
                raise GraphoptError(
                    f"pipeline order: pass '{p.name}' needs {', '.join(missing)} on network '{net.name}', "
                    "which no earlier pass established. Put the pass that ensures it earlier in the pipeline "
                    "(`graphopt passes --target T` shows what each pass needs and ensures)."
                )
            start = time.perf_counter()
            note = p.run(net)
            net.finalize()
            net.properties.update(p.ensures)
            records.append(PassRecord(net.name, p.name, note, time.perf_counter() - start))
            self._dump(net, index, p.name)
        return records

    def _dump(self, net: NetworkGraph, index: int, label: str) -> None:
        if self.dump_dir is None or (index and self.dump_after is not None and label not in self.dump_after):
            return
        folder = self.dump_dir / net.name
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".py" if self.phase == "fx" else ".txt"
        (folder / f"{self.phase}-{index:02d}-{label}{suffix}").write_text(net.readable())
