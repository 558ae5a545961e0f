"""What is inside a .bmodel (`model_tool --info`), and whether it meets the runtime's contract.

For a decoder-only model there are two contracts (graphopt/contract.py), what each runtime reads
from the file: today's LLM-TPU demos (LLM_TPU: MAX_INPUT_LENGTH from embedding, SEQ from
block_cache_0's history_k, layers counted from the nets that are not heads, a token-out lm_head,
mask bits by embedding_cache's dtype) and the legacy Llama3_1 demo (NUM_LAYERS = (nets - 5) / 2,
SEQ from embedding, logits into greedy_head); both want int32 ids and positions, 16-bit
activations, a [1,SEQ,KV,D] cache in and a [1,1,KV,D] row out for the decode nets. For an
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

from graphopt import contract as c
from graphopt.device_program import bits_to_float
from graphopt.errors import GraphoptError
from graphopt.targets.bm1684x.toolchain import Toolchain

_NET = re.compile(r"^net \d+: \[(?P<name>[^\]]+)\]")
_TENSOR = re.compile(r"^(?P<io>input|output): (?P<name>[^,]+), \[(?P<shape>[^\]]*)\], (?P<dtype>\w+)")
_STAGE = re.compile(r"^stage (?P<index>\d+)")
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
    inputs: list[Tensor] = field(default_factory=list)  # stage 0's
    outputs: list[Tensor] = field(default_factory=list)
    more_stages: list["NetInfo"] = field(default_factory=list)  # the same net for other shapes (decode stages)
    dynamic: bool = False  # the runtime sets its lengths per launch (model_tool prints its shapes as max:N)


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
            stage = nets[-1]
        elif (m := _STAGE.match(line)) and nets and int(m["index"]) > 0:
            stage = NetInfo(nets[-1].name)
            nets[-1].more_stages.append(stage)
        elif (m := _TENSOR.match(line)) and nets:
            # A dynamic net prints its largest shape as [max:1, max:1024].
            shape = tuple(int(d.strip().removeprefix("max:")) for d in m["shape"].split(",") if d.strip())
            stage.dynamic |= "max:" in m["shape"]
            (stage.inputs if m["io"] == "input" else stage.outputs).append(Tensor(m["name"], shape, m["dtype"]))
        elif m := _MEMORY.match(line):
            header["memory"] = {k: int(v) for k, v in m.groupdict().items()}
        elif not nets and ": " in line:
            key, value = line.split(": ", 1)
            header[key] = value
    return header, nets


HALF = ("bfloat16", "float16")
INT = ("int32",)
FLOAT = ("float32",)

def contract_of(nets: list[NetInfo]) -> c.Contract:
    """Which runtime contract a bmodel's nets are held to, from their names and how many inputs block_0
    takes (graphopt.contract.contract_of_nets)."""
    first = next((n for n in nets if n.name == c.LLM_TPU.network(c.BLOCK, 0)), None)
    return c.contract_of_nets((n.name for n in nets), len(first.inputs) if first else None)


def _expecter(contract: c.Contract, by_name: dict[str, NetInfo], problems: list[str]):
    """`expect(kind, io, tensor, layer, rank, dtypes, shape)`: the contract network of `kind`'s (`layer`'s)
    input or output named `tensor` (by the contract's position for it), after noting every way it differs.
    `kind` may also be a network's name (the one-token nets)."""

    def expect(kind: str, io: str, tensor: str, layer: int | None = None, rank: int | None = None, dtypes=None,
               shape=None):
        spec = contract.spec(kind)
        net = spec.network(layer) if spec.name != kind else kind
        names = spec.device_inputs if io == "inputs" else spec.output_names(len(contract.layers(by_name)))
        index = list(names).index(tensor.format(layer=layer))
        tensors = getattr(by_name[net], io)
        if index >= len(tensors):
            problems.append(f"{net}: has {len(tensors)} {io}, expected at least {index + 1}")
            return None
        t = tensors[index]
        where = f"{net} {io[:-1]} {index} ({t.name})"
        if dtypes and t.dtype not in dtypes:
            problems.append(f"{where}: dtype {t.dtype}, expected {' or '.join(dtypes)}")
        if rank is not None and len(t.shape) != rank:
            problems.append(f"{where}: shape {list(t.shape)}, expected rank {rank}")
        if shape is not None and t.shape != tuple(shape):
            problems.append(f"{where}: shape {list(t.shape)}, expected {list(shape)}")
        return t

    return expect


def _missing_nets(contract: c.Contract, by_name: dict[str, NetInfo]) -> tuple[list[str], list[int]]:
    """(problems, layers): the contract's nets that are missing, and whether the per-layer nets are numbered
    0..L-1 for every kind of them."""
    problems = [f"net '{s.name}' is missing" for s in contract.networks if not s.per_layer and s.name not in by_name]
    layers = contract.layers(by_name)
    per_layer = [s for s in contract.networks if s.per_layer]
    found = {s.name: sorted(l for n in by_name if (l := c.layer_of(s, n)) is not None) for s in per_layer}
    if not layers or layers != list(range(len(layers))) or any(f != layers for f in found.values()):
        problems.append(f"block nets must be {' and '.join(s.name.format(layer='0..L-1') for s in per_layer)}; "
                        f"found {', '.join(f'{name.format(layer=chr(105))} for i in {f}' for name, f in found.items())}")
    return problems, layers


def contract_problems(nets: list[NetInfo], contract: c.Contract | None = None) -> list[str]:
    """Everything in `nets` the runtime of `contract` (default: `contract_of`) would trip over; empty
    when they meet it."""
    contract = contract or contract_of(nets)
    if contract is c.ENCODER_DECODER:
        return encoder_decoder_problems(nets)
    return decoder_problems(contract, nets)


def decoder_contracts_met(nets: list[NetInfo]) -> dict[str, list[str]]:
    """{decoder-only contract key: its problems with `nets`} for every such contract graphopt knows."""
    return {key: decoder_problems(contract_of(nets) if key == contract_of(nets).key else c.CONTRACTS[key], nets)
            for key in c.DECODER_CONTRACTS}


def decoder_problems(contract: c.Contract, nets: list[NetInfo]) -> list[str]:
    by_name = {n.name: n for n in nets}
    problems, layers = _missing_nets(contract, by_name)
    fixed = sum(1 for s in contract.networks if not s.per_layer)
    if contract is c.LLAMA3_1_DEMO and len(nets) != fixed + 2 * len(layers):
        problems.append(f"{len(nets)} nets, but the runtime computes NUM_LAYERS = (nets - {fixed}) / 2 and expects "
                        f"{fixed + 2 * len(layers)} for {len(layers)} layers")
    if contract.key == c.LLM_TPU.key:  # today's demos count layers as (nets - 3 - the optional heads) / 2 (3: history)
        heads = sum(1 for h in c.LLM_TPU_OPTIONAL_HEADS if h in by_name)
        per_layer = sum(1 for s in contract.networks if s.per_layer)
        base = sum(1 for s in contract.networks if not s.per_layer and s.name not in c.LLM_TPU_OPTIONAL_HEADS)
        counted = (len(nets) - base - heads) // per_layer
        if counted != len(layers):
            problems.append(f"{len(nets)} nets: the demo counts (nets - {base} - {heads} heads) / {per_layer} = "
                            f"{counted} layers, not {len(layers)}")
    if problems:
        return problems
    expect = _expecter(contract, by_name, problems)
    embedding_cache = contract.one_token(c.EMBEDDING)
    ids = expect(c.EMBEDDING, "inputs", c.INPUT_IDS, rank=2, dtypes=INT)
    rows = ids.shape[1] if ids else 0  # the prefill's rows: SEQ for the legacy demo, MAX_INPUT_LENGTH today
    expect(embedding_cache, "inputs", c.INPUT_IDS, dtypes=INT, shape=(1, 1))
    embed = expect(c.EMBEDDING, "outputs", c.INPUT_EMBED, rank=3, dtypes=HALF)
    hidden = embed.shape[2] if embed else 0
    history = by_name[contract.network(c.BLOCK_CACHE, layers[0])].inputs
    index = contract.spec(c.BLOCK_CACHE).input_index(c.HISTORY_K)
    seq = history[index].shape[1] if index < len(history) and len(history[index].shape) > 1 else rows
    if contract is c.LLAMA3_1_DEMO and seq != rows:
        problems.append(f"the legacy demo reads SEQ from embedding ({rows}), but the decode cache holds {seq} rows")
    problems += _stage_problems(contract, by_name, layers, index)
    block_kv = contract.has(c.BLOCK_KV)
    for i in layers:
        for kind in (c.BLOCK, c.BLOCK_KV) if block_kv else (c.BLOCK,):
            expect(kind, "inputs", c.INPUT_STATES, i, dtypes=HALF, shape=(1, rows, hidden))
            expect(kind, "inputs", c.POSITION_IDS, i, dtypes=INT, shape=(1, rows))
            if c.ATTENTION_MASK not in contract.spec(kind).baked:
                expect(kind, "inputs", c.ATTENTION_MASK, i, dtypes=HALF, shape=(1, 1, rows, rows))
            expect(kind, "outputs", c.HIDDEN_STATES, i, dtypes=HALF, shape=(1, rows, hidden))
            k = expect(kind, "outputs", c.PAST_K, i, rank=4, dtypes=HALF)
            expect(kind, "outputs", c.PAST_V, i, rank=4, dtypes=HALF, shape=k.shape if k else None)
        kv = tuple(k.shape[2:]) if k else ()
        if block_kv:  # the demo's PREFILL_KV_LENGTH: block_kv_0's history rows, as many as the cache's
            for name in c.HISTORY_INPUTS:
                expect(c.BLOCK_KV, "inputs", name, i, dtypes=HALF, shape=(1, seq, *kv))
        expect(c.BLOCK_CACHE, "inputs", c.INPUT_STATES, i, dtypes=HALF, shape=(1, 1, hidden))
        expect(c.BLOCK_CACHE, "inputs", c.POSITION_IDS, i, dtypes=INT, shape=(1, 1))
        expect(c.BLOCK_CACHE, "inputs", c.ATTENTION_MASK, i, dtypes=HALF, shape=(1, 1, 1, seq + 1))
        for name in c.HISTORY_INPUTS:
            expect(c.BLOCK_CACHE, "inputs", name, i, dtypes=HALF, shape=(1, seq, *kv))
        expect(c.BLOCK_CACHE, "outputs", c.HIDDEN_STATES, i, dtypes=HALF, shape=(1, 1, hidden))
        for name in c.KV_OUTPUTS:
            expect(c.BLOCK_CACHE, "outputs", name, i, dtypes=HALF, shape=(1, 1, *kv))
    expect(c.LM_HEAD, "inputs", c.HIDDEN_STATES, dtypes=HALF, shape=(1, hidden))
    if contract.head_outputs_token:  # the demo reads lm_head's output dim 1 == 1 as "lm_head answers the token"
        expect(c.LM_HEAD, "outputs", c.TOKEN, dtypes=INT, shape=(1, 1))
        return problems
    logits = expect(c.LM_HEAD, "outputs", c.M_LOGITS, rank=2)
    vocab = logits.shape[1] if logits else 0
    sampler = c.SAMPLE_HEAD if contract.has(c.SAMPLE_HEAD) else c.PENALTY_SAMPLE_HEAD
    # The demos copy lm_head's logits byte for byte into the heads: the same dtype, or they read garbage.
    same = (logits.dtype,) if logits else None
    expect(c.GREEDY_HEAD, "inputs", c.M_LOGITS, dtypes=same, shape=(1, vocab))
    expect(c.GREEDY_HEAD, "outputs", c.TOKEN, dtypes=INT)
    expect(sampler, "inputs", c.M_LOGITS, dtypes=same, shape=(1, vocab))
    expect(sampler, "inputs", c.INPUT_IDS, dtypes=INT, shape=(1, seq))
    for name in (c.PENALTY, c.TEMPERATURE, c.TOP_P):  # written as C floats, top_k as a C int
        expect(sampler, "inputs", name, dtypes=FLOAT, shape=(1,))
    if sampler == c.SAMPLE_HEAD:
        expect(sampler, "inputs", c.TOP_K, dtypes=INT, shape=(1,))
    expect(sampler, "outputs", c.PROBS, dtypes=FLOAT, shape=(1, c.SAMPLE_CANDIDATES))
    expect(sampler, "outputs", c.TOKEN, dtypes=INT, shape=(1, c.SAMPLE_CANDIDATES))
    return problems


def stage_rows(net: NetInfo, index: int) -> list[int]:
    """The cache rows (input `index`, axis 1) of each stage of a decode net, stage 0 first."""
    return [s.inputs[index].shape[1] for s in (net, *net.more_stages) if len(s.inputs) > index]


def _stage_problems(contract: c.Contract, by_name: dict[str, NetInfo], layers: list[int], index: int) -> list[str]:
    """Decode stages: the legacy demo runs stage 0 only; today's cpp_demo picks the smallest stage that holds
    the history, walking them in order, and asserts every layer has the same."""
    nets = [by_name[contract.network(c.BLOCK_CACHE, i)] for i in layers]
    first = stage_rows(nets[0], index)
    if len(first) == 1:
        return []
    if contract is c.LLAMA3_1_DEMO:
        return [f"{nets[0].name} has {len(first)} stages; the legacy demo runs stage 0 only"]
    problems = []
    if first != sorted(first, reverse=True) or len(set(first)) != len(first):
        problems.append(f"{nets[0].name}'s stages hold {first} cache rows: the demo needs them longest first")
    problems += [f"{n.name}'s stages hold {stage_rows(n, index)} cache rows, {nets[0].name}'s {first}: the demo "
                 "needs every layer's the same" for n in nets[1:] if stage_rows(n, index) != first]
    return problems


def encoder_decoder_problems(nets: list[NetInfo]) -> list[str]:
    """The nets of docs/encoder-decoder-networks.md, as a bmodel holds them: ids and masks of the
    encoder int32, every activation, mask and K/V 16-bit, the decode blocks' cache [1,SEQ,heads,D]."""
    contract, by_name = c.ENCODER_DECODER, {n.name: n for n in nets}
    problems, layers = _missing_nets(contract, by_name)
    if problems:
        return problems
    expect = _expecter(contract, by_name, problems)
    embedding_cache = contract.one_token(c.EMBEDDING)
    ids = expect(c.ENCODER, "inputs", c.INPUT_IDS, rank=2, dtypes=INT)
    seq = ids.shape[1] if ids else 0
    expect(c.ENCODER, "inputs", c.SOURCE_VALID, dtypes=INT, shape=(1, seq))
    states = expect(c.ENCODER, "outputs", c.ENCODER_HIDDEN_STATES, rank=3, dtypes=HALF)
    hidden = states.shape[2] if states else 0
    expect(c.CROSS_KV, "inputs", c.ENCODER_HIDDEN_STATES, dtypes=HALF, shape=(1, seq, hidden))
    for name in (c.INPUT_IDS, c.POSITION_IDS):
        expect(c.EMBEDDING, "inputs", name, dtypes=INT, shape=(1, seq))
        expect(embedding_cache, "inputs", name, dtypes=INT, shape=(1, 1))
    expect(c.EMBEDDING, "outputs", c.INPUT_EMBED, dtypes=HALF, shape=(1, seq, hidden))
    cross_k, cross_v = contract.spec(c.CROSS_KV).outputs
    for i in layers:
        k = expect(c.CROSS_KV, "outputs", cross_k, i, rank=4, dtypes=HALF)
        kv = tuple(k.shape[2:]) if k else ()
        expect(c.CROSS_KV, "outputs", cross_v, i, dtypes=HALF, shape=(1, seq, *kv))
        for kind, steps, keys in ((c.DECODER_BLOCK, seq, seq), (c.DECODER_BLOCK_CACHE, 1, seq + 1)):
            expect(kind, "inputs", c.INPUT_STATES, i, dtypes=HALF, shape=(1, steps, hidden))
            expect(kind, "inputs", c.ATTENTION_MASK, i, dtypes=HALF, shape=(1, 1, steps, keys))
            expect(kind, "inputs", c.ENCODER_ATTENTION_MASK, i, dtypes=HALF, shape=(1, 1, steps, seq))
            for name in (c.CROSS_K, c.CROSS_V):
                expect(kind, "inputs", name, i, dtypes=HALF, shape=(1, seq, *kv))
            expect(kind, "outputs", c.HIDDEN_STATES, i, dtypes=HALF, shape=(1, steps, hidden))
            for name in c.KV_OUTPUTS:
                expect(kind, "outputs", name, i, dtypes=HALF, shape=(1, steps, *kv))
        for name in c.HISTORY_INPUTS:
            expect(c.DECODER_BLOCK_CACHE, "inputs", name, i, dtypes=HALF, shape=(1, seq, *kv))
    expect(c.LM_HEAD, "inputs", c.HIDDEN_STATES, dtypes=HALF, shape=(1, hidden))
    logits = expect(c.LM_HEAD, "outputs", c.M_LOGITS, rank=2)
    expect(c.GREEDY_HEAD, "inputs", c.M_LOGITS, shape=(1, logits.shape[1] if logits else 0))
    expect(c.GREEDY_HEAD, "outputs", c.TOKEN, dtypes=INT)
    return problems


MASK_CLAMP_PASS = "clamp-mask"


def _read_bits(bits: int, dtype: str) -> float:
    """What a 16-bit pattern means to a net whose input has `dtype` (a 16-bit float, as the contract wants)."""
    return float(bits_to_float(np.array([bits], np.uint16), "bfloat16" if dtype == "bfloat16" else "float16")[0])


def _masks(contract: c.Contract, by_name: dict[str, NetInfo]) -> list[tuple[str, str]]:
    """(net, its mask input's dtype) of every prefill and decode block."""
    return [(spec.network(layer), by_name[spec.network(layer)].inputs[spec.device_inputs.index(c.ATTENTION_MASK)].dtype)
            for spec in (contract.spec(c.BLOCK), contract.spec(c.BLOCK_CACHE)) if c.ATTENTION_MASK not in spec.baked
            for layer in contract.layers(by_name)]


def mask_problems(nets: list[NetInfo], manifest: dict | None) -> list[str]:
    """The bits the contract's runtime writes for "masked" (LLM-TPU's Llama3_1 demo: fp16 0xF0E2 whatever
    the nets' dtype) must read as about −10000 in each block's mask dtype. A bf16 net reads 0xF0E2 as
    −5.6e29, which TPU-MLIR's bf16 attention turns into NaN on a row masked everywhere (the prompt's
    padding rows): the demo then generates token 0, unless the blocks clamp the mask (graphopt's
    clamp-mask pass), which the manifest the bmodel was built from says."""
    contract, by_name = contract_of(nets), {n.name: n for n in nets}
    if contract is c.ENCODER_DECODER:
        return []
    if contract.key == c.LLM_TPU.key:  # the demo writes the bits of embedding_cache's output dtype
        return _mask_dtype_problems(contract, by_name)
    clamped = {n["name"] for n in (manifest or {}).get("networks", [])
               if any(p["pass"] == MASK_CLAMP_PASS and c.ATTENTION_MASK in p["note"] for p in n["passes"])}
    wrong, meaning = [], {}
    for name, dtype in _masks(contract, by_name):
        bits = contract.mask_bits.get(dtype)
        value = _read_bits(bits, dtype) if bits is not None else None
        if (value is None or abs(value - c.MASK_VALUE) > 64) and name not in clamped:
            wrong.append(name)
            meaning[dtype] = (bits, value)
    if not wrong:
        return []
    evidence = ("No manifest.json beside this bmodel says" if manifest is None else
                "The manifest.json beside it does not say")
    reads = "; ".join(f"into a {dtype} mask it writes " + (f"0x{bits:04X}, which reads as {value:.2g}" if bits is not None
                      else "bits it has no rule for") for dtype, (bits, value) in meaning.items())
    return [f"{', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}: the {contract.name} writes fp16 −10000 "
            f"(0x{c.FP16_MASK_BITS:04X}) for masked positions whatever the nets' dtype; {reads}, and a block that does "
            f"not clamp its mask answers NaN on the prompt's padding rows, so the demo generates token 0. {evidence} "
            f"that these blocks clamp the mask (graphopt's {MASK_CLAMP_PASS} pass): compile the model with graphopt, "
            "or in an f16 mode (w4f16, w8f16, f16)"]


def _mask_dtype_problems(contract: c.Contract, by_name: dict[str, NetInfo]) -> list[str]:
    writer = by_name[contract.one_token(c.EMBEDDING)].outputs[0].dtype
    bits = contract.mask_bits.get(writer)
    if bits is None:
        return [f"{contract.one_token(c.EMBEDDING)} outputs {writer}: today's demos stop with \"Invalid attention "
                "dtype\" unless it is float16 or bfloat16"]
    wrong = [(name, dtype) for name, dtype in _masks(contract, by_name)
             if abs(_read_bits(bits, dtype) - c.MASK_VALUE) > 64]
    if not wrong:
        return []
    names = ", ".join(f"{name} ({dtype})" for name, dtype in wrong[:4])
    return [f"{names}{' ...' if len(wrong) > 4 else ''}: the demo writes 0x{bits:04X} (−10000 in "
            f"{writer}, embedding_cache's output dtype) into every mask, which these masks read as "
            f"{_read_bits(bits, wrong[0][1]):.2g}; compile the blocks' I/O in {writer}"]


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
        lines.append(f"\n  {net.name}" + (f" ({1 + len(net.more_stages)} stages)" if net.more_stages else "")
                     + (" (dynamic: shapes are the largest)" if net.dynamic else ""))
        for number, stage in enumerate((net, *net.more_stages)):
            if number:
                lines.append(f"    stage {number}:")
            for io, tensors in (("in ", stage.inputs), ("out", stage.outputs)):
                for t in tensors:
                    lines.append(f"    {io} {t.name:<28} {str(list(t.shape)):<22} {t.dtype}")
    lines.append("")
    contract = contract_of(nets)
    if problems:
        lines.append(f"contract ({contract.describe}: {contract.name}): NOT MET")
        lines += [f"  - {p}" for p in problems]
    else:
        layers = len(contract.layers({n.name for n in nets}))
        lines.append(f"contract ({contract.describe}: {contract.name}): met ({layers} layers)")
    if contract is not c.ENCODER_DECODER:
        for key, others in decoder_contracts_met(nets).items():
            if key != contract.key:
                lines.append(f"contract ({key}: {c.CONTRACTS[key].name}): " + (
                    "met as well" if not others else f"not met ({others[0]}{' ...' if len(others) > 1 else ''})"))
    return "\n".join(lines)
