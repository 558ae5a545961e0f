"""User passes: loaded from a file (`--pass-file`) or from installed packages (the `graphopt.passes`
entry point group), then placed into a target's pipeline.

A user pass is a `Pass` registered with `@register_pass`, exactly like the built-in ones. It says
where it goes with the class attributes `insert_after` or `insert_before` (a pass name), or the
command line says it for every pass of a file (`--insert-after NAME` / `--insert-before NAME`).
Export workers are spawned processes: they load the same files and entry points again
(`load_passes`), so a user pass runs wherever the built-ins do.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, replace
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.pass_manager import Pass, check_order, registered_passes
from graphopt.user_files import import_user_file

ENTRY_POINT_GROUP = "graphopt.passes"


@dataclass(frozen=True)
class PassPlugins:
    """What a run loads besides the built-in passes (picklable: export workers load it again)."""

    files: tuple[str, ...] = ()
    insert_after: str | None = None  # for the passes of `files` that do not place themselves
    insert_before: str | None = None
    entry_points: bool = True


def load_passes(plugins: PassPlugins) -> list[type[Pass]]:
    """Import the pass files and entry points; the passes they register, in the order they are defined."""
    loaded: list[type[Pass]] = []
    for file in plugins.files:
        loaded += _passes_of(lambda: _import_file(Path(file)), f"--pass-file {file}")
    if plugins.entry_points:
        for entry in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            loaded += _passes_of(entry.load, f"entry point '{entry.name}' ({entry.value}) of group {ENTRY_POINT_GROUP}")
    return list(dict.fromkeys(loaded))


def _passes_of(load, what: str) -> list[type[Pass]]:
    """The passes a module registers (or the one pass class an entry point names)."""
    try:
        loaded = load()
    except GraphoptError:
        raise
    except Exception as error:  # the user's code: any error it raises is theirs to fix
        raise GraphoptError(f"{what} could not be loaded: {type(error).__name__}: {error}. Fix it (run the file with "
                            "`python FILE` to see the traceback) and try again.") from None
    if isinstance(loaded, type) and issubclass(loaded, Pass):
        passes = [loaded] if loaded.name in registered_passes() else []
    else:
        passes = [cls for cls in registered_passes().values() if cls.__module__ == getattr(loaded, "__name__", None)]
    if not passes:
        raise GraphoptError(f"{what} defines no pass: decorate each pass class with @register_pass "
                            "(from graphopt.pass_manager import Pass, register_pass).")
    return passes


USER_PASS_MODULES = "graphopt_user_passes_"


def _import_file(path: Path):
    if not path.is_file():
        raise GraphoptError(f"--pass-file {path} does not exist; give the path of a Python file that defines passes "
                            "with @register_pass (docs/writing-passes.md shows one).")
    return import_user_file(path, USER_PASS_MODULES)


def place_passes(fx_pipeline: tuple[str, ...], onnx_pipeline: tuple[str, ...], passes: list[type[Pass]],
                 plugins: PassPlugins) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The pipelines with each user pass inserted where it (or the command line) says."""
    pipelines = {"fx": list(fx_pipeline), "onnx": list(onnx_pipeline)}
    from_files = {p.name for p in passes if _from_file(p)}
    for cls in passes:
        after, before = cls.insert_after, cls.insert_before
        if cls.name in from_files and (plugins.insert_after or plugins.insert_before):
            after, before = plugins.insert_after, plugins.insert_before
        if (after is None) == (before is None):
            raise GraphoptError(f"pass '{cls.name}' does not say where it goes: give it `insert_after = \"NAME\"` or "
                                "`insert_before = \"NAME\"` (one of them), or run with --insert-after NAME / "
                                "--insert-before NAME. `graphopt passes --target T` lists the names.")
        pipeline = pipelines.get(cls.stage)
        if pipeline is None:
            raise GraphoptError(f"pass '{cls.name}' is a {cls.stage} pass; a user pass runs at stage 'fx' (on the traced "
                                "graph: subclass Pass) or 'onnx' (on the exported model: subclass OnnxPass).")
        anchor = after or before
        if anchor not in pipeline:
            raise GraphoptError(f"pass '{cls.name}' goes {'after' if after else 'before'} '{anchor}', which is not in "
                                f"this target's {cls.stage} pipeline ({', '.join(pipeline)}); name one of those.")
        index = pipeline.index(anchor) + (1 if after else 0)
        # Passes placed at the same anchor keep their load order.
        while after and index < len(pipeline) and pipeline[index] in {p.name for p in passes}:
            index += 1
        pipeline.insert(index, cls.name)
    for stage, pipeline in pipelines.items():
        check_order(pipeline, stage)
    return tuple(pipelines["fx"]), tuple(pipelines["onnx"])


def _from_file(cls: type[Pass]) -> bool:
    return cls.__module__.startswith(USER_PASS_MODULES)


def with_plugins(target, plugins: PassPlugins):
    """`target` with the user passes of `plugins` in its pipelines (the target itself when there are none)."""
    passes = load_passes(plugins)
    if not passes:
        if plugins.insert_after or plugins.insert_before:
            raise GraphoptError("--insert-after/--insert-before place the passes of --pass-file, but no --pass-file "
                                "defines a pass; give --pass-file FILE too.")
        return target
    fx, onnx = place_passes(target.fx_pipeline, target.onnx_pipeline, passes, plugins)
    return replace(target, fx_pipeline=fx, onnx_pipeline=onnx)


def reload_in_worker(plugins: PassPlugins | None) -> None:
    """In a spawned export worker: register the same user passes as the parent did."""
    if plugins is not None:
        load_passes(plugins)
