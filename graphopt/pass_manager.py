"""Passes, their registry, and the manager that runs a pipeline of them over a network.

One pass model serves the three stages a network goes through:
  fx    `Pass`, on the traced graph (a NetworkGraph);
  onnx  `OnnxPass`, on the exported model (an OnnxNetwork);
  top   `TopPass`, on a hardware target's own IR (declared here so pipelines can list and order it;
        the target runs it, as targets/bm1684x/top_passes/ does with TPU-MLIR's top MLIR).

A pass is a class with a `name`, a one-line docstring, the network kinds it `applies_to`, the
properties it `requires` (established by earlier passes of its stage) and the ones it `ensures`.
`run(net)` rewrites `net` in place and returns a `PassResult`: how many things it changed and a
note (a pass that returns its note alone gets 1 or 0, by whether the network changed). The manager checks what the pass says against what it did (a pass that reports changes
must have changed the network, one that reports none must not have), and runs the pass's
`verify(net)`, the executable half of what it ensures. When a pass cannot find what it rewrites
it raises `PassMatchError`, saying what was missing. Pipelines are ordered lists of names; the
manager checks their order (every `requires` ensured by an earlier pass) before it runs any.
Built-in passes and user passes register the same way, with `@register_pass`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from graphopt.contract import ALL_KINDS, BLOCKS, DECODE_BLOCKS, HISTORY_BLOCKS, PREFILL_BLOCKS  # noqa: F401 (the pass API's kinds)
from graphopt.errors import GraphoptError

STAGES = ("fx", "onnx", "top")


@dataclass(frozen=True)
class PassResult:
    """What a pass did to one network: how many things it rewrote (0: nothing) and a one-line note."""

    changed: int
    note: str


class Pass:
    name: ClassVar[str]
    stage: ClassVar[str] = "fx"
    applies_to: ClassVar[frozenset[str]] = ALL_KINDS
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    # Where a user pass goes in a target's pipeline: after or before the pass of that name (one of
    # the two; --insert-after/--insert-before override it). Built-in passes are placed by the targets.
    insert_after: ClassVar[str | None] = None
    insert_before: ClassVar[str | None] = None
    # Appended to a PassMatchError: what to check when this pass cannot find what it rewrites.
    hint: ClassVar[str] = ""

    def run(self, net) -> PassResult:
        """Rewrite `net` in place; return what changed."""
        raise NotImplementedError

    def cannot(self, net, missing: str) -> Exception:
        """The error to raise when the pass cannot find what it rewrites in `net` (`missing` says what)."""
        from graphopt.errors import PassMatchError

        return PassMatchError(self.name, net.name, missing, self.hint)

    def verify(self, net) -> str | None:
        """After the pass: what is wrong with `net` against what the pass ensures, or None."""
        return None

    @classmethod
    def doc(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]


class OnnxPass(Pass):
    """A pass over the exported ONNX model (an OnnxNetwork), after the FX passes."""

    stage = "onnx"


class TopPass(Pass):
    """A pass over a target's own IR, run by the target (e.g. between TPU-MLIR's model_transform and
    model_deploy). Declared here so that pipelines list and order it; `target` says whose it is."""

    stage = "top"
    target: ClassVar[str]


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} needs a `name`")
    if cls.stage not in STAGES:
        raise GraphoptError(f"pass '{cls.name}' has stage '{cls.stage}'; a pass runs at stage 'fx' (on the traced "
                            "graph: subclass Pass) or 'onnx' (on the exported model: subclass OnnxPass).")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls and not _same_source(_REGISTRY[cls.name], cls):
        raise GraphoptError(f"two passes are registered under the name '{cls.name}': "
                            f"{_REGISTRY[cls.name].__module__} and {cls.__module__}; rename one of them.")
    _REGISTRY[cls.name] = cls
    return cls


def _same_source(a: type, b: type) -> bool:
    """One class loaded twice under two module names (pytest imports targets/... as `targets.…` too)."""
    import inspect

    try:
        return a.__qualname__ == b.__qualname__ and inspect.getfile(a) == inspect.getfile(b)
    except TypeError:
        return False


def registered_passes() -> dict[str, type[Pass]]:
    import graphopt.passes  # noqa: F401  (importing the package registers the built-ins)
    from graphopt.targets import register_top_passes

    register_top_passes()  # and each target's top passes
    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise GraphoptError(f"no pass is named '{name}'. Known passes: {', '.join(sorted(passes))}.")
    return passes[name]


def check_order(pipeline: list[str] | tuple[str, ...], stage: str, assume: frozenset[str] = frozenset()) -> None:
    """Every pass's `requires` must be ensured by a pass before it in its stage's pipeline (or be in
    `assume`: what a test that runs a few passes on a graph it built vouches for)."""
    ensured: set[str] = set(assume)
    for name in pipeline:
        cls = get_pass(name)
        if cls.stage != stage:
            raise GraphoptError(f"pass '{name}' is a {cls.stage} pass and cannot run in the {stage} pipeline "
                                f"({', '.join(pipeline)}).")
        missing = [r for r in cls.requires if r not in ensured]
        if missing:
            raise GraphoptError(f"pipeline order: pass '{name}' needs {', '.join(missing)}, which no pass before it "
                                f"in the {stage} pipeline ensures ({', '.join(pipeline)}). Place it after the pass "
                                "that ensures it (`graphopt passes --target T` shows what each pass needs and ensures).")
        ensured.update(cls.ensures)


@dataclass
class PassRecord:
    network: str
    pass_name: str
    changed: int
    note: str
    seconds: float


class PassManager:
    """Runs one stage's ordered list of passes over one network at a time.

    The order is checked before the passes run (against what the network already holds). After each FX pass the network is finalized (dead code
    removed, shapes re-propagated); after each pass its result is held to what it did and its `verify`
    runs, and, when `dump_dir` is set, the network is written to
    `dump_dir/<network>/<stage>-<NN>-<pass>.py|.txt` (after the passes named in `dump_after` only,
    when it is given; the input is always written)."""

    def __init__(self, pass_names: list[str], dump_dir: Path | None = None, stage: str = "fx",
                 dump_after: frozenset[str] | None = None, assume: frozenset[str] = frozenset()):
        self.names, self.assume = list(pass_names), assume
        self.passes = [get_pass(n)() for n in pass_names]
        self.dump_dir, self.stage = dump_dir, stage
        self.dump_after = dump_after  # the passes after which to dump; None: every pass

    def run(self, net) -> list[PassRecord]:
        # What the network was given by the passes before this pipeline (a test's), and what the caller vouches for.
        check_order(self.names, self.stage, self.assume | frozenset(net.properties))
        records = []
        self._dump(net, 0, "input")
        for index, p in enumerate(self.passes, start=1):
            net.properties.update(p.ensures)  # passed in the pipeline, whether or not it applies here
            if net.kind not in p.applies_to:
                continue
            before = net.fingerprint()
            start = time.perf_counter()
            result = p.run(net)
            if self.stage == "fx":
                net.finalize()
            modified = net.fingerprint() != before
            if isinstance(result, str):  # a note alone (graphopt < 0.2 passes): the manager counts the change
                result = PassResult(int(modified), result)
            if not isinstance(result, PassResult):
                raise GraphoptError(f"pass '{p.name}' returned {type(result).__name__}, not a PassResult: return "
                                    "PassResult(changed, note), with how many things it rewrote in the network.")
            if modified != (result.changed > 0):
                raise GraphoptError(f"pass '{p.name}' reported {result.changed} change(s) on network '{net.name}' but "
                                    f"{'rewrote' if modified else 'did not change'} it ({result.note}). A pass must "
                                    "report what it changed.")
            problem = p.verify(net)
            if problem:
                raise GraphoptError(f"pass '{p.name}' left network '{net.name}' without what it ensures "
                                    f"({', '.join(p.ensures)}): {problem}.")
            records.append(PassRecord(net.name, p.name, result.changed, result.note, time.perf_counter() - start))
            self._dump(net, index, p.name)
        return records

    def _dump(self, net, index: int, label: str) -> None:
        if self.dump_dir is None or (index and self.dump_after is not None and label not in self.dump_after):
            return
        folder = self.dump_dir / net.name
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".py" if self.stage == "fx" else ".txt"
        (folder / f"{self.stage}-{index:02d}-{label}{suffix}").write_text(net.readable())
