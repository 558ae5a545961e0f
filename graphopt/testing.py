"""Helpers for testing passes: traced networks of the registry's tiny models and the inputs a runtime sends them.

Pass tests (ours, and users' own) compare a network before and after a pass on the same
inputs and check that the rewrite happened; these give them a real traced network fast.
"""

from __future__ import annotations

import copy
import functools

import torch

from graphopt.ir import NetworkGraph
from graphopt.models import ModelSource, open_model
from graphopt.networks import causal_mask, decode_mask, plan_networks, trace_plan  # noqa: F401 (decode_mask: for tests)
from graphopt.pass_manager import PassManager


@functools.cache
def registry_model(name: str) -> ModelSource:
    return open_model(name)


def tiny_llama() -> ModelSource:
    return registry_model("tiny-llama")


@functools.cache
def _traced(model: str, name: str, seq_length: int) -> NetworkGraph:
    source = registry_model(model)
    plan = next(p for p in plan_networks(source, seq_length, layers=[0]) if p.name == name)
    return trace_plan(source, plan, seq_length)


def traced(name: str = "block_0", seq_length: int = 16, model: str = "tiny-llama") -> NetworkGraph:
    """A fresh copy of a traced network of a registry model (tracing is cached, passes mutate)."""
    return copy.deepcopy(_traced(model, name, seq_length))


def run_passes(net: NetworkGraph, *names: str) -> NetworkGraph:
    PassManager(list(names)).run(net)
    return net


def prefill_inputs(seq_length: int, hidden: int = 128, length: int | None = None, seed: int = 0):
    """(input_states, position_ids, attention_mask) for a prompt of `length` padded to `seq_length`."""
    length = seq_length if length is None else length
    g = torch.Generator().manual_seed(seed)
    positions = torch.zeros(1, seq_length, dtype=torch.int64)
    positions[0, :length] = torch.arange(length)
    return (torch.randn(1, seq_length, hidden, generator=g), positions, causal_mask(seq_length, seq_length, length))


def count(net: NetworkGraph, *targets) -> int:
    return sum(1 for _ in net.calls(*targets))


def export_networks(source: ModelSource, names: list[str] | None, seq_length: int, folder, target=None,
                    layers=(0,)) -> dict:
    """Export (and check) only the named networks of `source` (None: all of `layers`'), e.g. one
    block of a full-size model, through `target`'s pipelines (default: the onnx target).
    Returns {name: NetworkResult}."""
    from pathlib import Path

    from graphopt.compiler import ExportJob, export_in_group
    from graphopt.onnx_ir import SharedData
    from graphopt.targets.onnx_target import ONNX_TARGET

    target = target or ONNX_TARGET
    Path(folder).mkdir(parents=True, exist_ok=True)
    job = ExportJob(source, list(target.fx_pipeline), list(target.onnx_pipeline), seq_length, Path(folder),
                    list(layers), check=True, dump_dir=None)
    shared, results, prefills = SharedData(Path(folder)), {}, {}
    for plan in job.plans():
        if names is None or plan.name in names:
            results[plan.name], _ = export_in_group(job, plan, shared, prefills)
    source.release()
    return results
