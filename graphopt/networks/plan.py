"""What to trace for one network: a contract network's names, and how to build its wrapper lazily."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from graphopt.contract import NetworkSpec


@dataclass
class NetworkPlan:
    """`make()` builds the wrapper and its example inputs (positional, in the contract's order) only
    when the network is traced, so only one network's weights are live; `weights_of()` names the
    skeleton modules to materialise for it."""

    name: str
    kind: str
    make: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    weights_of: Callable[[], tuple[nn.Module, ...]]
    input_names: list[str]  # as traced
    output_names: list[str]
    contract_inputs: list[str]  # after the passes: the contract's
    contract_outputs: list[str]
    launch_length: tuple[str, ...] = ()  # inputs whose length the runtime sets per launch (NetworkSpec.launch_length)

    @classmethod
    def of(cls, spec: NetworkSpec, make, weights_of, layer: int | None = None, layers: int = 0) -> "NetworkPlan":
        """The plan of contract network `spec` (for `layer`); `layers`: the model's decoder layers, for
        outputs named per layer."""
        return cls(spec.network(layer), spec.kind, make, weights_of, spec.traced_inputs, spec.traced_outputs(layers),
                   list(spec.inputs), spec.output_names(layers), spec.launch_length)
