"""What is inside a .bmodel (`model_tool --info`), and whether it meets the runtime's contract.

For a decoder-only model the contract is what LLM-TPU's Llama3_1 chat demo reads from the file:
the nets by name, NUM_LAYERS = (nets - 5) / 2, int32 ids and positions, 16-bit activations, a
[1,SEQ,KV,D] cache in and a [1,1,KV,D] row out for the decode nets, the masks' shapes. For an
encoder-decoder model it is docs/encoder-decoder-networks.md, with the bmodel's int32 ids and
16-bit floats. `runtime_problems` adds what names and shapes cannot show: whether the runtime's
copies between nets are sound on the file's memory layout (memory_check.py), and whether the
mask bits the demo writes mean "masked" to nets of the file's mask dtype.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


LLM_TPU = "LLM-TPU Llama3_1 chat demo"
ENCODER_DECODER = "encoder-decoder networks, docs/encoder-decoder-networks.md"


def contract_of(nets: list[NetInfo]) -> str:
    """Which runtime contract a bmodel's nets are held to: an encoder net makes it a translation model."""
    return ENCODER_DECODER if any(n.name == "encoder" for n in nets) else LLM_TPU


def _expecter(by_name: dict[str, NetInfo], problems: list[str]):
    """`expect(net, io, index, rank, dtypes, shape)`: the tensor, after noting every way it differs."""

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

    return expect


def _layers(by_name: dict[str, NetInfo], prefix: str) -> tuple[list[int], list[int]]:
    blocks = sorted(int(n[len(prefix):]) for n in by_name if re.fullmatch(rf"{prefix}\d+", n))
    caches = sorted(int(n[len(prefix) + 6:]) for n in by_name if re.fullmatch(rf"{prefix}cache_\d+", n))
    return blocks, caches


def _missing_nets(by_name: dict[str, NetInfo], fixed: tuple[str, ...], prefix: str) -> tuple[list[str], list[int]]:
    """(problems, layers): the fixed nets that are missing, and whether the block nets are numbered 0..L-1."""
    problems = [f"net '{name}' is missing" for name in fixed if name not in by_name]
    blocks, caches = _layers(by_name, prefix)
    if blocks != list(range(len(blocks))) or caches != blocks or not blocks:
        problems.append(f"block nets must be {prefix}0..{prefix}{{L-1}} and {prefix}cache_0..{prefix}cache_{{L-1}}; "
                        f"found blocks {blocks} and caches {caches}")
    return problems, blocks


def contract_problems(nets: list[NetInfo]) -> list[str]:
    """Everything in `nets` their runtime would trip over (see `contract_of`); empty when they meet the contract."""
    if contract_of(nets) == ENCODER_DECODER:
        return encoder_decoder_problems(nets)
    by_name = {n.name: n for n in nets}
    fixed = ("embedding", "embedding_cache", "lm_head", "greedy_head", "penalty_sample_head")
    problems, blocks = _missing_nets(by_name, fixed, "block_")
    if len(nets) != 5 + 2 * len(blocks):
        problems.append(f"{len(nets)} nets, but the runtime computes NUM_LAYERS = (nets - 5) / 2 and expects "
                        f"{5 + 2 * len(blocks)} for {len(blocks)} layers")
    if problems:
        return problems
    expect = _expecter(by_name, problems)
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


def encoder_decoder_problems(nets: list[NetInfo]) -> list[str]:
    """The nets of docs/encoder-decoder-networks.md, as a bmodel holds them: ids and masks of the
    encoder int32, every activation, mask and K/V 16-bit, the decode blocks' cache [1,SEQ,heads,D]."""
    by_name = {n.name: n for n in nets}
    fixed = ("encoder", "cross_kv", "embedding", "embedding_cache", "lm_head", "greedy_head")
    problems, blocks = _missing_nets(by_name, fixed, "decoder_block_")
    if problems:
        return problems
    expect = _expecter(by_name, problems)
    ids = expect("encoder", "inputs", 0, 2, INT)
    seq = ids.shape[1] if ids else 0
    expect("encoder", "inputs", 1, dtypes=INT, shape=(1, seq))
    states = expect("encoder", "outputs", 0, 3, HALF)
    hidden = states.shape[2] if states else 0
    expect("cross_kv", "inputs", 0, dtypes=HALF, shape=(1, seq, hidden))
    expect("embedding", "inputs", 0, dtypes=INT, shape=(1, seq))
    expect("embedding", "inputs", 1, dtypes=INT, shape=(1, seq))
    expect("embedding_cache", "inputs", 0, dtypes=INT, shape=(1, 1))
    expect("embedding_cache", "inputs", 1, dtypes=INT, shape=(1, 1))
    expect("embedding", "outputs", 0, dtypes=HALF, shape=(1, seq, hidden))
    for i in blocks:
        k = expect("cross_kv", "outputs", 2 * i, 4, HALF)
        kv = tuple(k.shape[2:]) if k else ()
        expect("cross_kv", "outputs", 2 * i + 1, dtypes=HALF, shape=(1, seq, *kv))
        block, cache = f"decoder_block_{i}", f"decoder_block_cache_{i}"
        for net, steps, keys in ((block, seq, seq), (cache, 1, seq + 1)):
            expect(net, "inputs", 0, dtypes=HALF, shape=(1, steps, hidden))
            expect(net, "inputs", 1, dtypes=HALF, shape=(1, 1, steps, keys))
            expect(net, "inputs", 2, dtypes=HALF, shape=(1, 1, steps, seq))
            expect(net, "inputs", 3, dtypes=HALF, shape=(1, seq, *kv))
            expect(net, "inputs", 4, dtypes=HALF, shape=(1, seq, *kv))
            expect(net, "outputs", 0, dtypes=HALF, shape=(1, steps, hidden))
            expect(net, "outputs", 1, dtypes=HALF, shape=(1, steps, *kv))
            expect(net, "outputs", 2, dtypes=HALF, shape=(1, steps, *kv))
        expect(cache, "inputs", 5, dtypes=HALF, shape=(1, seq, *kv))
        expect(cache, "inputs", 6, dtypes=HALF, shape=(1, seq, *kv))
    expect("lm_head", "inputs", 0, dtypes=HALF, shape=(1, hidden))
    logits = expect("lm_head", "outputs", 0, 2)
    expect("greedy_head", "inputs", 0, shape=(1, logits.shape[1] if logits else 0))
    expect("greedy_head", "outputs", 0, dtypes=INT)
    return problems


MASK_CLAMP_PASS = "clamp-mask"


def mask_problems(nets: list[NetInfo], manifest: dict | None) -> list[str]:
    """The Llama3_1 demo writes fp16 mask bits (0xF0E2, fp16 −10000) whatever the nets' dtype. A bf16
    net reads them as −5.6e29, which TPU-MLIR's bf16 attention turns into NaN on a row masked
    everywhere (the prompt's padding rows): the demo then generates token 0. graphopt's blocks clamp
    the mask (the clamp-mask pass); that is known from the manifest the bmodel was built from."""
    from graphopt.runtime import ATTENTION_MASK

    if contract_of(nets) != LLM_TPU:
        return []
    bf16 = [n.name for n in nets if re.fullmatch(r"block_(cache_)?\d+", n.name) and len(n.inputs) > 2
            and n.inputs[2].dtype == "bfloat16"]
    if not bf16:
        return []
    clamped = {n["name"] for n in (manifest or {}).get("networks", [])
               if any(p["pass"] == MASK_CLAMP_PASS and "attention_mask" in p["note"] for p in n["passes"])}
    unclamped = [name for name in bf16 if name not in clamped]
    if not unclamped:
        return []
    bits = int(np.float16(ATTENTION_MASK).view(np.uint16))
    as_bf16 = float((np.array([bits], np.uint32) << 16).view(np.float32)[0])
    evidence = ("No manifest.json beside this bmodel says" if manifest is None else
                "The manifest.json beside it does not say")
    return [f"{', '.join(unclamped[:4])}{' ...' if len(unclamped) > 4 else ''}: attention_mask is bfloat16, and the "
            f"Llama3_1 demo writes 0x{bits:04X} into it (fp16 {float(ATTENTION_MASK):g}), which bf16 reads as "
            f"{as_bf16:.2g}; a block that does not clamp its mask answers NaN on the prompt's padding rows and the "
            f"demo generates token 0. {evidence} that these blocks clamp the mask (graphopt's {MASK_CLAMP_PASS} "
            "pass): compile the model with graphopt, or in an f16 mode (w4f16, w8f16, f16)"]


def runtime_problems(layout: dict, nets: list[NetInfo], manifest: dict | None) -> list[str]:
    """What the runtime would trip over that names and shapes do not show: its device copies on this
    memory layout (`Simulator.layout`), and its mask bits in the nets' mask dtype."""
    from graphopt.targets.bm1684x import memory_check

    return memory_check.check(layout) + mask_problems(nets, manifest)


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
    contract = contract_of(nets)
    if problems:
        lines.append(f"contract ({contract}): NOT MET")
        lines += [f"  - {p}" for p in problems]
    else:
        layers = len(_layers({n.name: n for n in nets}, "decoder_block_" if contract == ENCODER_DECODER else "block_")[0])
        lines.append(f"contract ({contract}): met ({layers} layers)")
    return "\n".join(lines)
