"""Exporting networks: for each, trace → FX passes → ONNX → ONNX passes → save, each stage checked
against the one before on the same seeded inputs, and each decode block against its prefill block.

One process exports one network at a time, so only that network's weights are alive. Networks are
exported by weight group (a layer's block and decode block share a weights file; the embedding and
the head another): `export_pool.py` spreads the groups over processes. `export_networks` is the
entry point for exporting some networks of a model without the rest of a compile (tests, benches).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from graphopt import contract as c
from graphopt.checkpoint_codes import SUFFIX as CODES_SUFFIX, network_codes, write_codes
from graphopt.checks import Check, check_inputs, compare, decode_check, history_check
from graphopt.errors import GraphoptError
from graphopt.export_reuse import ExportedGraphs
from graphopt.ir import TensorSpec
from graphopt.models.source import ModelSource
from graphopt.networks import NetworkPlan, plan_networks, trace_plan
from graphopt.onnx_ir import SharedData, export_onnx, save_onnx
from graphopt.pass_manager import PassManager, PassRecord
from graphopt.plugins import PassPlugins
from graphopt.runtime import ort_session

# Networks whose rewritten form has other inputs than the traced one (decode blocks gain the cache,
# decoder blocks trade encoder_hidden_states for cross_k/cross_v): no "fx-rewritten vs traced" check.
INPUTS_REWRITTEN = c.HISTORY_BLOCKS | {c.DECODER_BLOCK}


@dataclass
class PrefillRun:
    """A prefill block's check inputs and onnxruntime outputs, by name: what its decode twin is held to."""

    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass
class NetworkResult:
    name: str
    kind: str
    files: list[Path]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_axes: dict
    passes: list[PassRecord]
    seconds: dict[str, float]
    checks: list[Check] = field(default_factory=list)
    sha256: str = ""  # over the file's and its external data's sha256s (SharedData.digest), taken where written
    prefill_run: PrefillRun | None = field(default=None, repr=False)  # a prefill block's, until its decode twin is checked
    codes: Path | None = None  # a pre-quantized checkpoint's codes of its Linears (checkpoint_codes.py)
    onnx_from: str | None = None  # the network of the same graph whose exported model it took (export_reuse.py)


@dataclass
class ExportJob:
    """Everything a process needs to export networks of one run (picklable: workers get a copy)."""

    source: ModelSource
    fx_pipeline: list[str]
    onnx_pipeline: list[str]
    seq_length: int
    folder: Path
    layers: list[int] | None
    check: bool
    dump_dir: Path | None
    dump_after: frozenset[str] | None = None
    plugins: PassPlugins | None = None  # user passes, loaded again by each worker
    contract: str | None = None  # a decoder-only model's --contract (graphopt/contract.py CONTRACTS)
    max_input_length: int | None = None  # the prefill's rows, where fewer than SEQ (--max-input-length)
    contract_options: tuple[str, ...] = ()  # --dynamic, --history-kv (contract.CONTRACT_OPTIONS)

    @property
    def runtime_contract(self) -> c.Contract:
        return c.contract_for(self.source.is_encoder_decoder, self.contract, self.contract_options)

    def plans(self) -> list[NetworkPlan]:
        return plan_networks(self.source, self.seq_length, self.layers, self.runtime_contract, self.max_input_length)

    def exported_graphs(self) -> ExportedGraphs:
        """What one process keeps of the models it exported, for the networks of the same graph after them."""
        return ExportedGraphs(self.onnx_pipeline, dumping=self.dump_dir is not None)


def weight_group(plan: NetworkPlan) -> str:
    """Networks whose external data may be shared: block_i with block_cache_i (the same weights),
    the embedding with the head (tied in small models). Not across layers: block_5 reading
    block_0's data (for norm weights that are all ones) would tie the layers' files, cache keys
    and memory estimates together."""
    return plan.name.rsplit("_", 1)[-1] if plan.kind in c.BLOCKS else "embedding and head"


def weight_groups(plans: list[NetworkPlan]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for plan in plans:
        groups.setdefault(weight_group(plan), []).append(plan.name)
    return list(groups.values())


def export_in_group(job: ExportJob, plan: NetworkPlan, shared: SharedData, prefills: dict,
                    graphs: ExportedGraphs, on_stage=lambda stage: None):
    """export_network, handing a layer's prefill run (kept in `prefills` by weight group) to its decode
    twin, which comes after it in the same group."""
    # block_kv_i comes after block_cache_i and is checked against the same prefill run: that one keeps it.
    keep = plan.kind == c.BLOCK_CACHE and job.runtime_contract.has(c.BLOCK_KV)
    group = weight_group(plan)
    prefill = (prefills.get(group) if keep else prefills.pop(group, None)) if plan.kind in c.HISTORY_BLOCKS else None
    result, net = export_network(job, plan, shared, on_stage, prefill, graphs)
    if result.prefill_run is not None:
        prefills[weight_group(plan)], result.prefill_run = result.prefill_run, None
    return result, net


def export_network(job: ExportJob, plan: NetworkPlan, shared: SharedData, on_stage=lambda stage: None,
                   prefill: PrefillRun | None = None, graphs: ExportedGraphs | None = None):
    """trace → FX passes → ONNX → ONNX passes → save, each stage checked against the one before. A prefill
    block's result keeps its onnxruntime run (`prefill_run`); given to its decode twin as `prefill`, the
    decode block is checked against it (checks.decode_check). A network whose graph `graphs` holds takes its
    model instead of exporting and running the ONNX passes again (export_reuse.py); it is checked the same."""
    seconds: dict[str, float] = {}

    def timed(stage, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
        on_stage(stage)
        return value

    vocab = int(job.source.config.vocab_size)
    net = timed("trace", trace_plan, job.source, plan, job.seq_length)
    checks = []
    args = check_inputs(net, vocab)
    # The checks' reference runs count as "check": with the onnxruntime runs, half the 8B export's time.
    traced_out = timed("check", net.run, *args) if job.check and plan.kind not in INPUTS_REWRITTEN else None
    records = timed("fx passes", PassManager(job.fx_pipeline, job.dump_dir, dump_after=job.dump_after).run, net)
    _check_contract_io(net, plan)
    rewritten_out = None
    if job.check:
        args = check_inputs(net, vocab)  # decode networks gained inputs
        rewritten_out = timed("check", net.run, *args)
        if traced_out is not None:
            checks.append(compare("fx-rewritten vs traced", traced_out, rewritten_out))
    # The embedding serves prefill ([1,SEQ]) and decode ([1,1]): its seq axis stays dynamic. So do the inputs
    # a runtime launches at a length of its choosing (sample_head's ids), which onnxruntime then runs at it.
    dynamic_axes = ({name: {1: "seq"} for name in (c.INPUT_IDS, c.POSITION_IDS, c.INPUT_EMBED)
                     if name in net.output_names or net.input(name) is not None} if plan.kind == c.EMBEDDING else {})
    dynamic_axes.update({name: {1: "length"} for name in plan.launch_length})
    graphs = graphs or job.exported_graphs()
    key = timed("onnx export", graphs.key, net, dynamic_axes or None)
    found = graphs.find(key, net)
    if found is not None:
        onnx_net, onnx_records, onnx_from = found
    else:
        onnx_net, onnx_from = timed("onnx export", export_onnx, net, dynamic_axes or None), None
        exported_weights = dict(onnx_net.weights)
        onnx_records = timed("onnx passes", PassManager(job.onnx_pipeline, job.dump_dir, stage="onnx",
                                                        dump_after=job.dump_after).run, onnx_net)
        graphs.add(key, onnx_net, onnx_records, exported_weights)
    records += onnx_records
    codes = timed("save", _save_codes, job, plan, onnx_net)
    files = timed("save", save_onnx, onnx_net.model, job.folder / f"{plan.name}.onnx", onnx_net.weights, shared)
    del onnx_net
    prefill_run = None
    if job.check:
        # prepack off: the checks run it a few times; torch's threads: the export process's share of the cores
        session = timed("check", ort_session, files[0], False, torch.get_num_threads())
        feeds = {spec.name: a.numpy() for spec, a in zip(net.inputs, args)}
        onnx_out = timed("check", session.run, list(net.output_names), feeds)
        checks.append(compare("onnxruntime vs fx-rewritten", rewritten_out, onnx_out))
        if plan.kind in c.PREFILL_BLOCKS:
            prefill_run = PrefillRun(feeds, dict(zip(net.output_names, onnx_out)))
        elif plan.kind in c.DECODE_BLOCKS and prefill is not None:
            checks.append(timed("decode check", decode_check, lambda f: session.run(list(net.output_names), f),
                                net.inputs, net.output_names, prefill.feeds, prefill.outputs, job.seq_length))
        elif plan.kind == c.BLOCK_KV and prefill is not None:
            checks.append(timed("history check", history_check, lambda f: session.run(list(net.output_names), f),
                                net.inputs, net.output_names, prefill.feeds, prefill.outputs))
        del session
    digest = timed("hash", shared.digest, [*files, *([codes] if codes else [])])
    result = NetworkResult(plan.name, plan.kind, files, net.inputs, net.outputs, dynamic_axes, records, seconds,
                           checks, digest, prefill_run, codes, onnx_from)
    return result, net


def _save_codes(job: ExportJob, plan: NetworkPlan, onnx_net) -> Path | None:
    """A pre-quantized checkpoint's codes of the network's Linears, beside its ONNX (checkpoint_codes.py)."""
    linears = job.source.quantized_linears(plan.weights_of())
    if not linears:
        return None
    codes = network_codes(linears, onnx_net.model, onnx_net.weights, plan.name)
    return write_codes(job.folder / f"{plan.name}{CODES_SUFFIX}", codes)


def _check_contract_io(net, plan: NetworkPlan) -> None:
    """After the FX passes a network takes and returns exactly what the contract names, in its order."""
    inputs, outputs = [s.name for s in net.inputs], list(net.output_names)
    if inputs != plan.contract_inputs or outputs != plan.contract_outputs:
        raise GraphoptError(f"after the FX passes, network '{plan.name}' takes {inputs} and returns {outputs}, but its "
                            f"contract (graphopt/contract.py) says {plan.contract_inputs} and {plan.contract_outputs}: "
                            "a pass changed the network's inputs or outputs (--dump-after all shows which).")


def export_serially(job: ExportJob, plans: list[NetworkPlan], keep_fx: bool = False, progress=None):
    """The plans' networks in this process, in order; ({name: result} in order, {name: FX graph} if kept)."""
    results, kept, shared, prefills, graphs = {}, {}, {}, {}, job.exported_graphs()
    for plan in plans:
        if progress:
            progress.start(plan.name)
        group = shared.setdefault(weight_group(plan), SharedData(job.folder))
        result, net = export_in_group(job, plan, group, prefills, graphs, progress.stage if progress else lambda s: None)
        results[plan.name] = result
        if keep_fx:
            kept[plan.name] = net
        if progress:
            progress.finish(plan.name, ok=all(c.ok for c in result.checks))
        # FX graphs hold reference cycles, which Python frees only when its collector runs:
        # collect now, or a network's weights outlive it (8B: gigabytes per network).
        del net
        gc.collect()
    job.source.release()
    return results, kept


def export_networks(source: ModelSource, names: list[str] | None, seq_length: int, folder: Path, target=None,
                    layers=(0,), check: bool = True, contract: str | None = None, contract_options: tuple[str, ...] = (),
                    max_input_length: int | None = None) -> dict[str, NetworkResult]:
    """Export (and check) the named networks of `source` (None: all of `layers`') into `folder`, through
    `target`'s pipelines (default: the onnx target); e.g. one block of a full-size model. A decode block
    is checked against its prefill block when both are named. Returns {name: NetworkResult}."""
    from graphopt.targets import get_target

    target = target or get_target("onnx")
    Path(folder).mkdir(parents=True, exist_ok=True)
    job = ExportJob(source, list(target.fx_pipeline), list(target.onnx_pipeline), seq_length, Path(folder),
                    list(layers), check=check, dump_dir=None, contract=contract, max_input_length=max_input_length,
                    contract_options=tuple(contract_options))
    plans = [p for p in job.plans() if names is None or p.name in names]
    return export_serially(job, plans)[0]
