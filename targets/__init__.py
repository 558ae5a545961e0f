"""Targets: for each, the ordered pass pipelines and what to do with the emitted networks."""

from __future__ import annotations

from graphopt.errors import GraphoptError
from graphopt.targets.bm1684x import BM1684X_TARGET
from graphopt.targets.onnx_target import ONNX_TARGET, Target

TARGETS: dict[str, Target] = {t.name: t for t in (ONNX_TARGET, BM1684X_TARGET)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise GraphoptError(f"unknown target '{name}'. Known targets: {', '.join(sorted(TARGETS))}.")
    return TARGETS[name]
