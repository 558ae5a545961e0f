"""Helpers for testing passes: traced networks of the registry's tiny models, the inputs a runtime sends
them, and pipeline prefixes taken from the reference pipeline (so a test cannot drift from it).

Pass tests (ours, and users' own) compare a network before and after a pass on the same inputs and
check that the rewrite happened; these give them a real traced network fast.
"""

from __future__ import annotations

import copy
import functools

import torch

from graphopt import contract as c
from graphopt.export import export_networks  # noqa: F401 (for tests: export some networks of a model)
from graphopt.ir import NetworkGraph
from graphopt.models import ModelSource, open_model
from graphopt.networks import plan_networks, trace_plan
from graphopt.pass_manager import PassManager, get_pass
from graphopt.targets.pipeline import FX_PIPELINE


@functools.cache
def registry_model(name: str) -> ModelSource:
    return open_model(name)


def tiny_llama() -> ModelSource:
    return registry_model("tiny-llama")


def tiny_llama_checkpoint(folder, layers: int):
    """tiny-llama with `layers` decoder layers and seeded random weights, saved as transformers saves a checkpoint
    (blocks of one graph, for the tests of work done once per graph)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, LlamaConfig

    from graphopt.models.configs import TINY_LLAMA

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": layers})).save_pretrained(folder)
    return Path(folder)


@functools.cache
def _traced(model: str, name: str, seq_length: int) -> NetworkGraph:
    source = registry_model(model)
    plan = next(p for p in plan_networks(source, seq_length, layers=[0]) if p.name == name)
    return trace_plan(source, plan, seq_length)


def traced(name: str = "block_0", seq_length: int = 16, model: str = "tiny-llama") -> NetworkGraph:
    """A fresh copy of a traced network of a registry model (tracing is cached, passes mutate)."""
    return copy.deepcopy(_traced(model, name, seq_length))


def run_passes(net: NetworkGraph, *names: str) -> NetworkGraph:
    """Run these passes, in this order, on `net`. What they require and no pass among them ensures, the
    test vouches for (a pass test builds that state itself, by hand or with `run_until`)."""
    ensured, assumed = set(net.properties), set()
    for name in names:
        cls = get_pass(name)
        assumed.update(r for r in cls.requires if r not in ensured)
        ensured.update(cls.ensures)
    PassManager(list(names), assume=frozenset(net.properties | assumed)).run(net)
    return net


def pipeline_before(name: str) -> tuple[str, ...]:
    """The reference FX pipeline up to, not including, pass `name`."""
    return FX_PIPELINE[:FX_PIPELINE.index(name)]


def run_until(net: NetworkGraph, name: str) -> NetworkGraph:
    """Run the reference FX pipeline on `net` up to, not including, pass `name`: the state it meets in a run."""
    return run_passes(net, *pipeline_before(name))


def causal_mask(steps: int, keys: int, length: int) -> torch.Tensor:
    """The runtime's prefill mask (graphopt.contract.causal_mask) as a tensor."""
    return torch.from_numpy(c.causal_mask(steps, keys, length))


def decode_mask(seq_length: int, row: int) -> torch.Tensor:
    """The runtime's decode mask (graphopt.contract.decode_mask) as a tensor."""
    return torch.from_numpy(c.decode_mask(seq_length, row))


def prefill_inputs(seq_length: int, hidden: int = 128, length: int | None = None, seed: int = 0):
    """(input_states, position_ids, attention_mask) for a prompt of `length` padded to `seq_length`."""
    length = seq_length if length is None else length
    g = torch.Generator().manual_seed(seed)
    positions = torch.zeros(1, seq_length, dtype=torch.int64)
    positions[0, :length] = torch.arange(length)
    return (torch.randn(1, seq_length, hidden, generator=g), positions, causal_mask(seq_length, seq_length, length))


def count(net: NetworkGraph, *targets) -> int:
    return sum(1 for _ in net.calls(*targets))
