"""model_transform + model_deploy per network, in parallel, cached; then one bmodel of them (combine.py).

Each network's bmodel is cached under ~/.cache/graphopt/bm1684x/nets/<key>/ (or
$GRAPHOPT_NET_CACHE/<key>/), where the key hashes its ONNX, its shapes and flags, the toolchain
version and its top passes (names and source). A job works in
`<key>.partial-*` and renames it to `<key>` only when the bmodel is complete, so a run that
was killed half-way and started again redoes only the networks that had not finished. A
failed job's directory is kept as `<key>.failed` with its log.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from graphopt import contract as c
from graphopt.errors import GraphoptError
from graphopt.machine import memory_budget
from graphopt.ray_executor import RaySchedule, RemoteJob, node_name, run_on_ray
from graphopt.scheduler import Job, Schedule, run_jobs
from graphopt.targets.bm1684x.contract import TRANSFORM_FLAGS, DeploySpec
from graphopt.targets.bm1684x.inspect_bmodel import read_info
from graphopt.targets.bm1684x.model_transform import TransformServers
from graphopt.targets.bm1684x.toolchain import Toolchain, cache_root, log_tail
from graphopt.targets.bm1684x.transform_reuse import NoRecipe, TransformReuse, graph_key
from graphopt.targets.bm1684x import combine as combine_bmodels
from graphopt.targets.bm1684x import top_passes

CACHE_FORMAT = 2  # bump when what a cache entry holds changes
BAKED_FORMAT = 1  # bump when what _with_baked_inputs writes changes
RESULT = "result.json"
# model_transform in a server leaves the top weights in the converter's file where they are its (transform_server.py).
# Tests turn it off to compare the bytes with a build where tpuc-opt wrote every weights file.
KEEP_CONVERTER_WEIGHTS = True


@dataclass
class DeployedNet:
    spec: DeploySpec
    bmodel: Path
    cached: bool  # found in the cache, not compiled by this run
    seconds: dict[str, float]  # model_transform / model_deploy wall time (of the run that compiled it)
    total_cycle: int | None  # model_deploy's own cycle estimate (compiler_profile_0.txt)
    memory: dict[str, int] | None  # device bytes of the net alone: total, weight, instruct, runtime
    directory: Path
    top_passes: list[dict] = field(default_factory=list)  # what each top pass changed (top_passes/run.py's reports)
    peak_rss: dict[str, int] = field(default_factory=dict)  # per tool, its largest process's resident bytes
    node: str = ""  # the Ray node that compiled it (--executor ray)
    transform_from: str = ""  # the net of the same graph whose model_transform output was its recipe (transform_reuse.py)
    converter_weights: bool = False  # model_transform ran, its top MLIR naming the converter's weights file


class DeployError(GraphoptError):
    def __init__(self, net: str, tool: str, log: Path, status: int = 1):
        if status < 0:
            how = f"was killed by signal {-status}" + (" (most likely out of memory: use a smaller --jobs, or a "
                                                      "machine with more RAM)" if status == -9 else "")
        else:
            how = f"failed (exit status {status})" if status else "exited without writing its output"
        super().__init__(f"{tool} {how} for network '{net}'. Its full log is {log}; the last lines:\n{log_tail(log, 20)}\n"
                         "If the log names an unsupported op or shape, the network needs a pass that rewrites it; "
                         "otherwise fix what it reports and run the same command again (finished networks are "
                         "cached and not compiled again).")


def nets_cache() -> Path:
    """$GRAPHOPT_NET_CACHE (tests point it at a fresh directory to compile for real), else
    ~/.cache/graphopt/bm1684x/nets."""
    return Path(os.environ.get("GRAPHOPT_NET_CACHE") or cache_root() / "bm1684x" / "nets")


def cache_key(spec: DeploySpec, onnx_sha256: str, toolchain: Toolchain) -> str:
    identity = {"format": CACHE_FORMAT, "onnx": onnx_sha256, "net": spec.name, "shapes": spec.input_shapes,
                "quantize": spec.quantize, "flags": spec.flags, "transform": TRANSFORM_FLAGS, "tpu_mlir": [toolchain.version, str(toolchain.root)]}
    if spec.baked:
        identity["baked"] = [spec.baked, BAKED_FORMAT]
    if spec.top_passes:
        identity["top_passes"] = [*spec.top_passes, top_passes.digest()]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def read_total_cycle(profile: Path) -> int | None:
    if not profile.is_file():
        return None
    # The last line reads `API_END total_cycle:N` (some versions append `|b:..|g:..`).
    found = re.findall(r"total_cycle:(\d+)", profile.read_text(errors="replace"))
    return int(found[-1]) if found else None


def cached(toolchain: Toolchain, spec: DeploySpec, onnx_sha256: str) -> DeployedNet | None:
    """The net's cache entry, if a run compiled it already."""
    final = nets_cache() / cache_key(spec, onnx_sha256, toolchain)
    if not (final / RESULT).is_file():
        return None
    data = json.loads((final / RESULT).read_text())
    return DeployedNet(spec, final / f"{spec.name}.bmodel", True, data["seconds"], data["total_cycle"],
                       data["memory"], final, data.get("top_passes", []), data.get("peak_rss", {}),
                       transform_from=data.get("transform_from", ""),
                       converter_weights=data.get("converter_weights", False))


def deploy_network(toolchain: Toolchain, spec: DeploySpec, onnx: Path, onnx_sha256: str,
                   threads: int | None = None, transform: TransformServers | None = None,
                   reuse: TransformReuse | None = None, planned: int = 0) -> DeployedNet:
    """The net from the cache, or compiled into it. `transform`: servers to run model_transform in (deploy_all's);
    None runs the command. `reuse`: the run's model_transform recipes, by graph (deploy_all's). `planned`: the
    peak the net was scheduled by (its model_deploy makes room for it: TransformServers.make_room)."""
    found = cached(toolchain, spec, onnx_sha256)
    if found is not None:
        return found
    final = nets_cache() / cache_key(spec, onnx_sha256, toolchain)
    work = final.with_name(f"{final.name}.partial-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        return _compile(toolchain, spec, onnx, onnx_sha256, threads, work, final, transform, reuse, planned)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already unless this job failed or was interrupted


class ToolFailed(Exception):
    """One step of `compile_in` failed: which (tool) and its exit status."""

    def __init__(self, tool: str, status: int):
        super().__init__(f"{tool} failed (exit status {status})")
        self.tool, self.status = tool, status


@dataclass
class Compiled:
    """What compile_in did: seconds per tool, the top passes' reports, and the net whose model_transform output
    made this one's ("": model_transform ran)."""

    seconds: dict[str, float]
    top_passes: list[dict]
    transform_from: str = ""
    converter_weights: bool = False  # tpuc-opt wrote no weights file: the top MLIR names the converter's


def compile_in(toolchain: Toolchain, spec: DeploySpec, onnx: Path, work: Path, log: Path,
               threads: int | None = None, peak_rss: dict[str, int] | None = None,
               transform: TransformServers | None = None, reuse: TransformReuse | None = None,
               planned: int = 0) -> Compiled:
    """model_transform (or, given `reuse`, its output made from a net of the same graph), the spec's top passes,
    model_deploy, in `work`, logging to `log`. Raises ToolFailed naming the failed step.
    `peak_rss` gets each tool's largest process's resident bytes."""
    mlir, bmodel = f"{spec.name}.mlir", f"{spec.name}.bmodel"
    seconds, reports, transformed = {}, [], _Transformed(0)
    codes = onnx.parent / spec.codes if spec.codes else None  # beside the network's ONNX
    key = reuse.graph_of[spec.label] if reuse is not None else ""
    if spec.baked:
        onnx = _with_baked_inputs(spec, onnx, work)
    for tool, args in (("model_transform", spec.transform_args(str(onnx.absolute()), mlir)),
                       ("model_deploy", spec.deploy_args(mlir, bmodel))):
        start = time.perf_counter()
        if tool == "model_transform":
            transformed = _model_transform(toolchain, spec.name, onnx, args, work, log, threads, peak_rss,
                                           transform, reuse, key)
            status = transformed.status
        else:
            if transform is not None and planned:
                transform.make_room(planned, memory_budget())
            status = toolchain.run(tool, args, cwd=work, log=log, threads=threads, peak_rss=peak_rss)
        seconds[tool] = round(time.perf_counter() - start, 2)
        if status != 0 or (tool == "model_deploy" and not (work / bmodel).is_file()):
            raise ToolFailed(tool, status)
        if tool == "model_transform" and spec.top_passes:
            start = time.perf_counter()
            try:
                reports = top_passes.apply(toolchain, work / mlir, spec.top_passes, log, spec.dynamic, codes,
                                           spec.weight_bits, spec.q_group_size, threads)
            except subprocess.CalledProcessError as error:
                raise ToolFailed("top passes " + ",".join(spec.top_passes), error.returncode) from None
            seconds["top passes"] = round(time.perf_counter() - start, 2)
    return Compiled(seconds, reports, transformed.made_from, transformed.converter_weights)


def transform_graph(spec: DeploySpec, onnx: Path) -> str:
    """The graph model_transform gets for the net (transform_reuse.graph_key): its ONNX's, with a baked input's
    value (_with_baked_inputs) the same for every net of one graph."""
    return graph_key(onnx, [*spec.transform_args(str(onnx), "NET.mlir"), "--baked", json.dumps(spec.baked)])


class _Transformed(NamedTuple):
    status: int
    made_from: str = ""  # the net of the graph whose output made this one's ("": the tool ran)
    converter_weights: bool = False  # the top MLIR names the converter's weights file (transform_server.py)


def _model_transform(toolchain, name: str, onnx: Path, args: list[str], work: Path, log: Path, threads, peak_rss,
                     servers: TransformServers | None, reuse: TransformReuse | None, key: str) -> _Transformed:
    """model_transform's output for net `name` in `work`: made by the recipe of the net's graph (`key`) where `reuse`
    has one, else by the tool (in a server, given `servers`), whose output then teaches `reuse`. In a server the
    top MLIR names the converter's weights file where it holds the top weights (tpuc-opt writes none: an 8B
    head's transform 16-24 s -> 8-11 s, a block's 7-11 s -> 3-5 s)."""
    recipe = reuse.recipe(key) if reuse is not None else None
    if recipe is not None:
        try:
            recipe.apply(name, onnx, work)
        except NoRecipe as why:  # this net differs where the recipe takes nothing from it: the tool runs
            with open(log, "a") as handle:
                handle.write(f"model_transform: not made from {recipe.reference}'s output: {why}\n")
        else:
            with open(log, "a") as handle:
                handle.write(f"model_transform: made from {recipe.reference}'s output (transform_reuse.py)\n")
            return _Transformed(0, recipe.reference)
    kept: list[bool] = []
    if servers is not None:
        status = servers.run(toolchain, args, work, log, threads, peak_rss,
                             keep_converter_weights=KEEP_CONVERTER_WEIGHTS, kept=kept)
    else:
        status = toolchain.run("model_transform", args, cwd=work, log=log, threads=threads, peak_rss=peak_rss)
    if status == 0 and reuse is not None:
        reuse.ran(key, name, onnx, work)
    return _Transformed(status, "", any(kept))


def _with_baked_inputs(spec: DeploySpec, onnx_path: Path, work: Path) -> Path:
    """The network's ONNX with each baked input (a dynamic net's mask) a constant: the value it has at the
    network's largest shape (graphopt.contract.baked_mask), folded through the clamp that reads it. Written
    in `work`, its external data linked beside it (not copied: an 8B block's is 0.9 GB)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    for name, shape in spec.baked:
        if name != c.ATTENTION_MASK:
            raise GraphoptError(f"network '{spec.name}' bakes input '{name}', and only a mask can be baked.")
        value = c.baked_mask(shape[2], shape[3] - shape[2]).reshape(shape)
        graph.input.remove(next(i for i in graph.input if i.name == name))
        readers = [n for n in graph.node if name in n.input]
        if any(n.op_type != "Clip" or n.input[0] != name for n in readers):
            raise GraphoptError(f"network '{spec.name}' reads its mask with {sorted({n.op_type for n in readers})}; "
                                "a baked mask is folded through a Clip (clamp-mask) only.")
        for clip in readers:  # clamp-mask's Clip(mask, min, max): its value, as the constant
            bounds = [_constant(graph, n) for n in clip.input[1:3]] + [None] * (3 - len(clip.input))
            graph.node.remove(clip)
            graph.initializer.append(numpy_helper.from_array(np.clip(value, bounds[0], bounds[1]), clip.output[0]))
    for tensor in graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and not (work / entry.value).exists():
                (work / entry.value).symlink_to((onnx_path.parent / entry.value).absolute())
    derived = work / f"{spec.name}.baked.onnx"
    onnx.save(model, str(derived))
    return derived


def _constant(graph, name: str):
    """An initializer's or Constant node's value; None for an omitted optional input ('')."""
    from onnx import numpy_helper

    if not name:
        return None
    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    node = next(n for n in graph.node if n.op_type == "Constant" and n.output[0] == name)
    return numpy_helper.to_array(node.attribute[0].t)


def _compile(toolchain, spec, onnx, onnx_sha256, threads, work: Path, final: Path, transform=None,
             reuse=None, planned: int = 0) -> DeployedNet:
    log = work / "compile.log"
    mlir, bmodel = f"{spec.name}.mlir", f"{spec.name}.bmodel"
    peak_rss: dict[str, int] = {}
    try:
        done = compile_in(toolchain, spec, onnx, work, log, threads, peak_rss, transform, reuse, planned)
    except ToolFailed as failure:
        failed = final.with_name(f"{final.name}.failed")
        shutil.rmtree(failed, ignore_errors=True)
        work.rename(failed)
        raise DeployError(spec.name, failure.tool, failed / "compile.log", failure.status) from None
    total_cycle = read_total_cycle(work / "compiler_profile_0.txt")
    memory = read_info(toolchain, work / bmodel)[0].get("memory")
    # Keep the bmodel, the MLIR text (top and tpu level: what later passes are read from), the
    # profile and the log; drop the weight copies, which are as big as the ONNX.
    for path in work.iterdir():
        if path.is_symlink():
            path.unlink()
        elif path.suffix in (".npz", ".onnx", ".prototxt") or path.is_dir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (work / RESULT).write_text(json.dumps({"net": spec.name, "onnx_sha256": onnx_sha256, "seconds": done.seconds,
                                           "total_cycle": total_cycle, "memory": memory, "top_passes": done.top_passes,
                                           "peak_rss": peak_rss, "transform": spec.transform_args("NET.onnx", mlir),
                                           "transform_from": done.transform_from,
                                           "converter_weights": done.converter_weights,
                                           "deploy": spec.deploy_args(mlir, bmodel)}, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return DeployedNet(spec, final / bmodel, False, done.seconds, total_cycle, memory, final, done.top_passes,
                       peak_rss, transform_from=done.transform_from, converter_weights=done.converter_weights)


def estimated_peak(onnx_bytes: int) -> int:
    """A net's compile peak, from its ONNX size. Measured in a Llama-3.1-8B build (8 layers, W4BF16): an 873 MB
    block 1.78 GiB in model_transform (its server, transform_server.py) and 1.50 GiB in model_deploy; the 2.1 GB
    embedding and lm_head 4.7 GiB in model_transform and 5.9 GiB in model_deploy (BF16), 2.8x their ONNX, the
    largest. The 1 GiB covers the server's own size. Every compile records its tools' peaks
    (DeployedNet.peak_rss) and the report holds the largest to this."""
    return 3 * onnx_bytes + (1 << 30)


@dataclass(frozen=True)
class OnnxFile:
    path: Path
    sha256: str  # of the file and its external data (SharedData.digest), from the manifest
    size: int  # bytes, external data included
    external: tuple[Path, ...] = ()  # its external data files


@dataclass
class Deployed:
    """Every net of a deploy_all, in spec order, and how the compiles were scheduled (None: all cached)."""

    nets: list[DeployedNet]
    schedule: Schedule | RaySchedule | None
    transform_refusals: list[str] = field(default_factory=list)  # graphs whose nets each ran model_transform, and why


def deploy_all(toolchain: Toolchain, specs: list[DeploySpec], onnx_files: dict[str, OnnxFile],
               jobs: int | None, show_progress: bool = True, ray_address: str | None = None) -> Deployed:
    """Compiles every spec not in the net cache, each planned by its own estimated peak: on this machine as
    many at once as `jobs` (default: the cores) and the memory budget allow, biggest first; or, given a
    `ray_address` ("auto" for Ray's own default), as Ray tasks on that cluster's nodes."""
    found = {s.label: cached(toolchain, s, onnx_files[s.onnx_network].sha256) for s in specs}
    todo = [s for s in specs if found[s.label] is None]
    parallel = jobs or os.cpu_count() or 1
    where = "on Ray" if ray_address else f"up to {parallel} jobs"
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), unit="net", file=sys.stderr, dynamic_ncols=True,
               leave=False, disable=None if show_progress else True, desc=f"bm1684x ({where})")
    started = time.perf_counter()

    def finished(job, done: DeployedNet) -> None:
        found[job.name] = done
        bar.update(1)
        if show_progress:
            how = " + ".join(f"{k} {v:.1f}s" + (f" (from {done.transform_from})" if k == "model_transform" and
                                                  done.transform_from else "") for k, v in done.seconds.items())
            peak = max(done.peak_rss.values(), default=0) / 2**30
            node = f" on {done.node}" if done.node else ""
            bar.write(f"  {done.spec.label:<22} {done.spec.quantize:<7} {how:<44} peak {peak:4.1f} GiB{node} "
                      f"(elapsed {time.perf_counter() - started:6.1f}s)", file=sys.stderr)

    schedule, refusals = None, []
    try:
        if todo and ray_address:
            by_label = {s.label: s for s in todo}
            work = [RemoteJob(s.label, estimated_peak(onnx_files[s.onnx_network].size), compile_on_node,
                              (s, _files_of(onnx_files[s.onnx_network]), onnx_files[s.onnx_network].sha256))
                    for s in todo]
            schedule = run_on_ray(work, ray_address, lambda job, result: finished(
                job, _store_from_node(toolchain, by_label[job.name], onnx_files[by_label[job.name].onnx_network], result)))
        elif todo:
            threads = max(1, (os.cpu_count() or 1) // parallel)
            transform = TransformServers()
            reuse = TransformReuse({s.label: transform_graph(s, onnx_files[s.onnx_network].path) for s in todo})
            peaks = {s.label: estimated_peak(onnx_files[s.onnx_network].size) for s in todo}
            work = [Job(s.label, peaks[s.label],
                        functools.partial(deploy_network, toolchain, s, onnx_files[s.onnx_network].path,
                                          onnx_files[s.onnx_network].sha256, threads, transform, reuse,
                                          peaks[s.label]),
                        after=reuse.teachers(s.label)) for s in todo]
            try:
                schedule = run_jobs(work, parallel, memory_budget(), finished)
            finally:
                transform.close()
            refusals = reuse.refusals()
    finally:
        bar.close()
    return Deployed([found[s.label] for s in specs], schedule, refusals)


# ---- on a Ray node (--executor ray) ---------------------------------------------------------------

def _files_of(onnx: OnnxFile) -> list[str]:
    """The ONNX file and its external data, as absolute paths: what a node must see at the same place."""
    return [str(p.absolute()) for p in (onnx.path, *onnx.external)]


def compile_on_node(spec: DeploySpec, onnx_paths: list[str], onnx_sha256: str) -> dict:
    """A Ray task: the net compiled on this node into its own net cache (the same key as anywhere), returned as
    the cache entry's files. Raises GraphoptError naming the node when it cannot see the ONNX or has no toolchain."""
    node = node_name()
    missing = [p for p in onnx_paths if not Path(p).is_file()]
    if missing:
        raise GraphoptError(f"Ray node {node} cannot see {missing[0]} ({spec.name}'s ONNX). --executor ray needs the "
                            "output folder at the same path on every node: a shared filesystem, or a copy made "
                            "before the build (README, \"Building on a Ray cluster\").")
    from graphopt.targets.bm1684x import toolchain as toolchains

    transform = TransformServers()
    try:
        net = deploy_network(toolchains.require(), spec, Path(onnx_paths[0]), onnx_sha256, 1, transform)
    except GraphoptError as error:
        raise GraphoptError(f"on Ray node {node}: {error}") from None
    finally:
        transform.close()
    files = {f.name: f.read_bytes() for f in sorted(net.directory.iterdir()) if f.is_file()}
    return {"key": net.directory.name, "files": files, "node": node, "cached": net.cached}


def _store_from_node(toolchain: Toolchain, spec: DeploySpec, onnx: OnnxFile, result: dict) -> DeployedNet:
    """A node's cache entry, written into this machine's net cache under the same key (unless the node wrote
    it there itself: a shared cache), then read as any cached net."""
    key = cache_key(spec, onnx.sha256, toolchain)
    if result["key"] != key:
        raise GraphoptError(f"Ray node {result['node']} compiled {spec.name} under cache key {result['key']}, this "
                            f"machine expects {key}: the node's TPU-MLIR is another version or at another path "
                            f"than {toolchain.describe()}. Install the same toolchain at the same path on every node "
                            "(graphopt toolchain install bm1684x).")
    final = nets_cache() / key
    if not (final / RESULT).is_file():
        partial = final.with_name(f"{key}.partial-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name, data in result["files"].items():
            (partial / name).write_bytes(data)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    net = cached(toolchain, spec, onnx.sha256)
    return dataclasses.replace(net, cached=result["cached"], node=result["node"])


def combine(toolchain: Toolchain, nets: list[DeployedNet], out: Path, show_progress: bool = False) -> dict:
    """The nets' bmodels as one, in `out`: graphopt's combine.py (model_tool --combine's bytes, in little memory),
    or model_tool --combine itself for a toolchain without the bmodel schema. Written under a temporary name and
    renamed when complete. Returns what was combined, and by what."""
    inputs = [str(n.bmodel) for n in nets]
    if combine_bmodels.schema_path(toolchain.root).is_file():
        with tqdm(unit="B", unit_scale=True, desc="combine", disable=not show_progress, file=sys.stderr) as bar:
            def show(copied: int, total: int) -> None:
                bar.total, bar.n = total, copied
                bar.refresh()
            done = combine_bmodels.combine(toolchain.root, [n.bmodel for n in nets], out, show)
        return {"by": "graphopt", "inputs": inputs, **done}
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    log = nets_cache() / f"combine-{os.getpid()}.log"
    log.unlink(missing_ok=True)
    status = toolchain.run("model_tool", ["--combine", *[str(n.bmodel) for n in nets], "-o", str(partial)],
                           cwd=out.parent, log=log)
    if status != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise DeployError("(all)", "model_tool --combine", log)
    log.unlink()
    partial.rename(out)
    return {"by": "model_tool --combine", "inputs": inputs}
