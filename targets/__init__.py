"""Targets: for each, its pass pipelines per stage and what it does with the emitted networks.

  base.py        Target (pipelines, build step) and the build protocols
  pipeline.py    the reference FX and ONNX pipelines every target starts from
  onnx_target.py the generic target: the ONNX files are the product
  bm1684x/       Sophgo BM1684X through TPU-MLIR: top passes, compile, simulator, inspect

Targets load on first use: listing or ordering passes does not import a vendor toolchain's code.
"""

from __future__ import annotations

import importlib

from graphopt.errors import GraphoptError
from graphopt.targets.base import Target

# name -> (module, attribute) of each built-in target
_TARGETS = {"onnx": ("graphopt.targets.onnx_target", "ONNX_TARGET"),
            "bm1684x": ("graphopt.targets.bm1684x", "BM1684X_TARGET")}
TARGET_NAMES = tuple(_TARGETS)


def get_target(name: str) -> Target:
    if name not in _TARGETS:
        raise GraphoptError(f"unknown target '{name}'. Known targets: {', '.join(sorted(_TARGETS))}.")
    module, attribute = _TARGETS[name]
    return getattr(importlib.import_module(module), attribute)


def register_top_passes() -> None:
    """Import every target's top-pass declarations (they register with the pass registry)."""
    for name in _TARGETS:
        get_target(name)
