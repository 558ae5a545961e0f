"""What is inside a .bmodel (`model_tool --info`), and whether it meets the runtime's contract.

The contract is what LLM-TPU's Llama3_1 chat demo reads from the file: the nets by name,
NUM_LAYERS = (nets - 5) / 2, int32 ids and positions, 16-bit activations, a [1,SEQ,KV,D]
cache in and a [1,1,KV,D] row out for the decode nets, the masks' shapes.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.targets.bm1684x.toolchain import Toolchain

_NET = re.compile(r"^net \d+: \[(?P<name>[^\]]+)\]")
_TENSOR = re.compile(r"^(?P<io>input|output): (?P<name>[^,]+), \[(?P<shape>[^\]]*)\], (?P<dtype>\w+)")
_MEMORY = re.compile(r"^device mem size: (?P<total>\d+) \(weight: (?P<weight>\d+), instruct: (?P<instruct>\d+), "
                     r"runtime: (?P<runtime>\d+)\)")


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # as model_tool prints it: int32, bfloat16, float16, float32, ...


@dataclass
class NetInfo:
    name: str
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


def read_info(toolchain: Toolchain, bmodel: Path) -> tuple[dict, list[NetInfo]]:
    """(file fields, nets) of a bmodel, parsed from `model_tool --info`. The file's device
    memory (bytes: total, weight, instruct, runtime) is in the fields as "memory"."""
    out = subprocess.run([*toolchain.tool("model_tool"), "--info", str(bmodel)], capture_output=True, text=True,
                         env=toolchain.environ())
    if out.returncode != 0 or "net 0:" not in out.stdout:
        raise GraphoptError(f"{bmodel} could not be read as a bmodel by TPU-MLIR's model_tool: "
                            f"{(out.stderr or out.stdout).strip().splitlines()[-1:] or 'no output'}. "
                            "Give a .bmodel written by model_deploy or model_tool --combine.")
    header, nets = {}, []
    for line in out.stdout.splitlines():
        line = line.strip()
        if m := _NET.match(line):
            nets.append(NetInfo(m["name"]))
        elif (m := _TENSOR.match(line)) and nets:
            # A dynamic net prints its largest shape as [max:1, max:1024].
            shape = tuple(int(d.strip().removeprefix("max:")) for d in m["shape"].split(",") if d.strip())
            (nets[-1].inputs if m["io"] == "input" else nets[-1].outputs).append(Tensor(m["name"], shape, m["dtype"]))
        elif m := _MEMORY.match(line):
            header["memory"] = {k: int(v) for k, v in m.groupdict().items()}
        elif not nets and ": " in line:
            key, value = line.split(": ", 1)
            header[key] = value
    return header, nets


HALF = ("bfloat16", "float16")
INT = ("int32",)


def contract_problems(nets: list[NetInfo]) -> list[str]:
    """Everything in `nets` the LLM-TPU Llama3_1 runtime would trip over; empty when it meets the contract."""
    by_name = {n.name: n for n in nets}
    problems = []
    fixed = ("embedding", "embedding_cache", "lm_head", "greedy_head", "penalty_sample_head")
    problems += [f"net '{name}' is missing" for name in fixed if name not in by_name]
    blocks = sorted(int(n[6:]) for n in by_name if re.fullmatch(r"block_\d+", n))
    caches = sorted(int(n[12:]) for n in by_name if re.fullmatch(r"block_cache_\d+", n))
    if blocks != list(range(len(blocks))) or caches != blocks or not blocks:
        problems.append(f"block nets must be block_0..block_{{L-1}} and block_cache_0..block_cache_{{L-1}}; "
                        f"found blocks {blocks} and caches {caches}")
    if len(nets) != 5 + 2 * len(blocks):
        problems.append(f"{len(nets)} nets, but the runtime computes NUM_LAYERS = (nets - 5) / 2 and expects "
                        f"{5 + 2 * len(blocks)} for {len(blocks)} layers")
    if problems:
        return problems

    def expect(net: str, io: str, index: int, rank: int | None = None, dtypes=None, shape=None):
        tensors = getattr(by_name[net], io)
        if index >= len(tensors):
            problems.append(f"{net}: has {len(tensors)} {io}, expected at least {index + 1}")
            return None
        t = tensors[index]
        if dtypes and t.dtype not in dtypes:
            problems.append(f"{net} {io[:-1]} {index} ({t.name}): dtype {t.dtype}, expected {' or '.join(dtypes)}")
        if rank is not None and len(t.shape) != rank:
            problems.append(f"{net} {io[:-1]} {index} ({t.name}): shape {list(t.shape)}, expected rank {rank}")
        if shape is not None and t.shape != tuple(shape):
            problems.append(f"{net} {io[:-1]} {index} ({t.name}): shape {list(t.shape)}, expected {list(shape)}")
        return t

    ids = expect("embedding", "inputs", 0, 2, INT)
    seq = ids.shape[1] if ids else 0
    expect("embedding_cache", "inputs", 0, dtypes=INT, shape=(1, 1))
    embed = expect("embedding", "outputs", 0, 3, HALF)
    hidden = embed.shape[2] if embed else 0
    for i in blocks:
        block, cache = f"block_{i}", f"block_cache_{i}"
        expect(block, "inputs", 0, dtypes=HALF, shape=(1, seq, hidden))
        expect(block, "inputs", 1, dtypes=INT, shape=(1, seq))
        expect(block, "inputs", 2, dtypes=HALF, shape=(1, 1, seq, seq))
        expect(block, "outputs", 0, dtypes=HALF, shape=(1, seq, hidden))
        k = expect(block, "outputs", 1, 4, HALF)
        expect(block, "outputs", 2, 4, HALF, shape=k.shape if k else None)
        kv = tuple(k.shape[2:]) if k else ()
        expect(cache, "inputs", 0, dtypes=HALF, shape=(1, 1, hidden))
        expect(cache, "inputs", 1, dtypes=INT, shape=(1, 1))
        expect(cache, "inputs", 2, dtypes=HALF, shape=(1, 1, 1, seq + 1))
        expect(cache, "inputs", 3, dtypes=HALF, shape=(1, seq, *kv))
        expect(cache, "inputs", 4, dtypes=HALF, shape=(1, seq, *kv))
        expect(cache, "outputs", 0, dtypes=HALF, shape=(1, 1, hidden))
        expect(cache, "outputs", 1, dtypes=HALF, shape=(1, 1, *kv))
        expect(cache, "outputs", 2, dtypes=HALF, shape=(1, 1, *kv))
    expect("lm_head", "inputs", 0, dtypes=HALF, shape=(1, hidden))
    logits = expect("lm_head", "outputs", 0, 2)
    vocab = logits.shape[1] if logits else 0
    expect("greedy_head", "inputs", 0, shape=(1, vocab))
    expect("greedy_head", "outputs", 0, dtypes=INT)
    expect("penalty_sample_head", "inputs", 0, shape=(1, vocab))
    expect("penalty_sample_head", "inputs", 1, dtypes=INT, shape=(1, seq))
    expect("penalty_sample_head", "outputs", 0, shape=(1, 50))
    expect("penalty_sample_head", "outputs", 1, dtypes=INT, shape=(1, 50))
    return problems


def render(path: Path, header: dict, nets: list[NetInfo], problems: list[str]) -> str:
    lines = [f"{path}: {header.get('chip', '?')}, {len(nets)} nets, bmodel {header.get('bmodel version', '?')}"]
    if mem := header.get("memory"):
        lines.append(f"device memory {mem['total'] / 1e6:.1f} MB (weight {mem['weight'] / 1e6:.1f}, instructions "
                     f"{mem['instruct'] / 1e6:.1f}, runtime {mem['runtime'] / 1e6:.1f})")
    for net in nets:
        lines.append(f"\n  {net.name}")
        for io, tensors in (("in ", net.inputs), ("out", net.outputs)):
            for t in tensors:
                lines.append(f"    {io} {t.name:<28} {str(list(t.shape)):<22} {t.dtype}")
    lines.append("")
    if problems:
        lines.append("contract (LLM-TPU Llama3_1 chat demo): NOT MET")
        lines += [f"  - {p}" for p in problems]
    else:
        layers = (len(nets) - 5) // 2
        lines.append(f"contract (LLM-TPU Llama3_1 chat demo): met ({layers} layers)")
    return "\n".join(lines)
