"""The runtime that drives the emitted networks as the chip runtime does, down to its device memory.

`ChipStyleRuntime` is LLM-TPU's Llama3_1 chat demo: each prefill and decode step is the Program
(graphopt/device_program.py) of writes, copies, launches and reads that the demo's chat.cpp makes,
with the bits it writes (int32 ids and positions, fp16 mask bits). A device executes it: the
cmodel simulator on the bmodel's real memory (targets/bm1684x/simulator.py), or `HostDevice`
over onnxruntime sessions or the rewritten FX graphs (each compiler stage checked with the same
driver). `Seq2SeqRuntime` drives encoder-decoder networks as docs/encoder-decoder-networks.md says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from graphopt.device_program import Buffer, Copy, HostDevice, IoSpec, Launch, Program, Read, Same, Tensor, Write
from graphopt.errors import GraphoptError
from graphopt.networks import MASK_VALUE, NETWORK_ALIASES, causal_mask, decode_mask
from graphopt.output import MANIFEST

# What the Llama3_1 demo writes for "masked", whatever the nets' dtype: fp16 −10000, bits 0xF0E2.
ATTENTION_MASK = np.float16(MASK_VALUE)


class Backend(Protocol):
    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def ort_session(path: Path):
    """A quiet CPU onnxruntime session."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtBackend:
    """onnxruntime sessions over an output directory's ONNX files, opened on first use."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = directory
        self.files = {n["name"]: n["file"] for n in manifest["networks"]}
        self.files.update({alias: self.files[source] for alias, source in NETWORK_ALIASES.items()})
        self._sessions: dict = {}

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if network not in self._sessions:
            self._sessions[network] = ort_session(self.directory / self.files[network])
        session = self._sessions[network]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs)))


class FxBackend:
    """The rewritten FX graphs, run in torch: the stage before ONNX."""

    def __init__(self, networks: dict):
        self.networks = networks

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        net = self.networks[NETWORK_ALIASES.get(network, network)]
        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in net.inputs]
        return {name: out.numpy() for name, out in zip(net.output_names, net.run(*args))}


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # [V] per generated token
    stopped: str = ""  # "eos", "length" (reached SEQ) or "" (max_new_tokens)


@dataclass(frozen=True)
class Shapes:
    seq_length: int
    num_layers: int
    hidden: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Shapes":
        nets = {n["name"]: n for n in manifest["networks"]}
        block = "decoder_block_" if "decoder_block_0" in nets else "block_"
        past_k = next(o for o in nets[f"{block}0"]["outputs"] if o["name"] == "past_k")["shape"]
        return cls(seq_length=manifest["seq_length"],
                   num_layers=sum(1 for n in nets if n.startswith(block) and not n.startswith(f"{block}cache_")),
                   hidden=nets["lm_head"]["inputs"][0]["shape"][-1], kv_heads=past_k[2], head_dim=past_k[3])


def network_io(manifest: dict) -> dict[str, dict[str, list[tuple[str, IoSpec]]]]:
    """Each network's inputs and outputs by position, the runtime's aliases included (embedding_cache:
    the embedding with its dynamic sequence axis at one token)."""
    def specs(net: dict, io: str, one_token: bool) -> list[tuple[str, IoSpec]]:
        out = []
        for t in net[io]:
            dynamic = {int(axis) for axis in net.get("dynamic_axes", {}).get(t["name"], {})}
            shape = tuple(1 if one_token and axis in dynamic else d for axis, d in enumerate(t["shape"]))
            out.append((t["name"], IoSpec(shape, np.dtype(t["dtype"]))))
        return out

    nets = {n["name"]: n for n in manifest["networks"]}
    io = {name: {"in": specs(n, "inputs", False), "out": specs(n, "outputs", False)} for name, n in nets.items()}
    for alias, source in NETWORK_ALIASES.items():
        io[alias] = {"in": specs(nets[source], "inputs", True), "out": specs(nets[source], "outputs", True)}
    return io


def _in(net: str, index: int) -> Tensor:
    return Tensor(net, "in", index)


def _out(net: str, index: int) -> Tensor:
    return Tensor(net, "out", index)


class ChipStyleRuntime:
    """LLM-TPU's Llama3_1 chat demo (`models/Llama3_1/python_demo/chat.cpp` at ea05961), step for step.

    Prefill: the prompt's int32 ids padded to SEQ (zeros on a first turn) into `embedding`; its
    output copied into `block_0`'s input, then each block's output into the next block's input.
    Positions and the [SEQ,SEQ] mask are written into block_0's inputs only: every later block
    reads its own, which the demo takes to be the same memory. Each block's past_k/past_v is
    copied whole into the layer's cache; row len-1 of the last hidden states into `lm_head`;
    `greedy_head` reads lm_head's output in place. Decode: the token into `embedding_cache`, its
    output through every `block_cache_i`, whose new K/V row goes into the cache at row len-1.
    The masks hold `ATTENTION_MASK` as fp16 bits (0xF0E2), whatever dtype the nets have. Where the
    decode nets are io_alone, the cache *is* their history input memory; otherwise the demo
    allocates it and copies it in every step."""

    block, block_cache = "block_", "block_cache_"
    history = (3, 4)  # history_k, history_v: the decode blocks' inputs that hold the cache

    def __init__(self, device, shapes: Shapes):
        self.device, self.shapes = device, shapes
        self.length = 0
        # The demo's visited_tokens: the prompt is copied in front, each new token appended; rows past
        # the prompt keep an earlier turn's tokens, which a prefill sends as its padding ids.
        self.visited = np.zeros(shapes.seq_length, np.int32)
        self.io_alone = device.io_alone(f"{self.block_cache}0")
        self.cache = [tuple(_in(f"{self.block_cache}{i}", h) if self.io_alone else
                            Buffer(f"past_{'kv'[j]}_{i}", _in(f"{self.block_cache}{i}", h))
                            for j, h in enumerate(self.history)) for i in range(shapes.num_layers)]

    def _head(self) -> list:
        # The logits are read for the checks, before greedy_head runs: a head whose memory is shared
        # with greedy_head's may be overwritten by it (the demo itself only reads the token).
        return [Launch("lm_head"), Read(_out("lm_head", 0), "logits"),
                Launch("greedy_head", bind=((0, _out("lm_head", 0)),)), Read(_out("greedy_head", 0), "token")]

    def _run(self, program: Program) -> tuple[int, np.ndarray]:
        out = self.device.execute(program)
        return int(out["token"].reshape(-1)[0]), out["logits"].reshape(-1).astype(np.float32)

    def room(self, prompt: list[int]) -> int:
        """How many tokens can follow `prompt` before its SEQ positions are used up."""
        return self.shapes.seq_length - len(prompt)

    def prefill(self, prompt: list[int]) -> tuple[int, np.ndarray]:
        seq, n = self.shapes.seq_length, len(prompt)
        positions = np.zeros(seq, np.int32)
        self.visited[:n], positions[:n] = prompt, np.arange(n)
        mask = causal_mask(seq, seq, n).numpy().astype(ATTENTION_MASK.dtype)
        program = Program([Write(_in("embedding", 0), self.visited.copy(), what="the prompt's ids"), Launch("embedding")])
        hidden, first = _out("embedding", 0), f"{self.block}0"
        for layer in range(self.shapes.num_layers):
            block = f"{self.block}{layer}"
            program += Copy(_in(block, 0), hidden)
            if layer == 0:
                program += [Write(_in(block, 1), positions, what="the positions"),
                            Write(_in(block, 2), mask, what="the prefill mask")]
            else:
                program += [Same(_in(block, 1), _in(first, 1)), Same(_in(block, 2), _in(first, 2))]
            program += Launch(block)
            hidden = _out(block, 0)
            program += [Copy(self.cache[layer][0], _out(block, 1)), Copy(self.cache[layer][1], _out(block, 2))]
        program += Copy(_in("lm_head", 0), hidden, src_row=n - 1, rows=1)
        program += self._head()
        self.length = n
        return self._visit(self._run(program))

    def _visit(self, answer: tuple[int, np.ndarray]) -> tuple[int, np.ndarray]:
        if self.length < self.shapes.seq_length:
            self.visited[self.length] = answer[0]
        return answer

    def decode(self, token: int) -> tuple[int, np.ndarray]:
        seq = self.shapes.seq_length
        self.length += 1
        row = self.length - 1  # the new token's position and its cache row
        mask = decode_mask(seq, row).numpy().astype(ATTENTION_MASK.dtype)
        program = Program([Write(_in("embedding_cache", 0), np.array([token], np.int32), what="the token"),
                           Launch("embedding_cache")])
        hidden, first = _out("embedding_cache", 0), f"{self.block_cache}0"
        for layer in range(self.shapes.num_layers):
            block = f"{self.block_cache}{layer}"
            program += Copy(_in(block, 0), hidden)
            if layer == 0:
                program += [Write(_in(block, 1), np.array([row], np.int32), what="the position"),
                            Write(_in(block, 2), mask, what="the decode mask")]
            elif self.io_alone:
                program += [Copy(_in(block, 1), _in(first, 1)), Copy(_in(block, 2), _in(first, 2))]
            else:
                program += [Same(_in(block, 1), _in(first, 1)), Same(_in(block, 2), _in(first, 2))]
            if not self.io_alone:
                program += [Copy(_in(block, h), cache) for h, cache in zip(self.history, self.cache[layer])]
            program += Launch(block)
            hidden = _out(block, 0)
            program += [Copy(self.cache[layer][0], _out(block, 1), dst_row=row),
                        Copy(self.cache[layer][1], _out(block, 2), dst_row=row)]
        program += Copy(_in("lm_head", 0), hidden)
        program += self._head()
        return self._visit(self._run(program))

    def generate(self, prompt: list[int], max_new_tokens: int, stop_tokens: frozenset[int] = frozenset()) -> Generation:
        if not 0 < len(prompt) <= self.shapes.seq_length:
            raise GraphoptError(f"the prompt has {len(prompt)} tokens but the networks were compiled for "
                                f"--seq-length {self.shapes.seq_length}: give 1 to {self.shapes.seq_length} tokens, "
                                "or compile with a larger --seq-length.")
        result = Generation(list(prompt))
        token, logits = self.prefill(prompt)
        while True:
            result.tokens.append(token)
            result.logits.append(logits)
            if token in stop_tokens:
                result.stopped = "eos"
                break
            if len(result.tokens) >= max_new_tokens:
                break
            if self.length >= self.shapes.seq_length:
                result.stopped = "length"
                break
            token, logits = self.decode(token)
        return result


class Seq2SeqRuntime(ChipStyleRuntime):
    """An encoder-decoder model's networks, driven as docs/encoder-decoder-networks.md says.

    The source is padded to SRC (= SEQ) and encoded once; `cross_kv` turns the encoder output into
    every layer's cross-attention K/V, which the runtime keeps in buffers of its own and copies into
    each decoder block. The target then runs like a decoder-only model: the decoder start token is
    the prompt, prefilled through `decoder_block_i`, and each next token is decoded through
    `decoder_block_cache_i`. This contract is graphopt's own: masks are written as values in the
    nets' dtype, and every block gets its inputs written or copied before it runs."""

    block, block_cache = "decoder_block_", "decoder_block_cache_"
    history = (5, 6)

    def __init__(self, device, shapes: Shapes, decoder_start: int):
        super().__init__(device, shapes)
        self.decoder_start = decoder_start
        self.cross = [tuple(Buffer(f"cross_{'kv'[j]}_{i}", _out("cross_kv", 2 * i + j)) for j in range(2))
                      for i in range(shapes.num_layers)]
        self.source_mask = np.zeros((1, 1, 1, shapes.seq_length), np.float32)

    def encode(self, source: list[int]) -> None:
        seq, n = self.shapes.seq_length, len(source)
        if not 0 < n <= seq:
            raise GraphoptError(f"the source has {n} tokens but the networks were compiled for --seq-length {seq}: "
                                f"give 1 to {seq} tokens, or compile with a larger --seq-length.")
        ids, valid = np.zeros(seq, np.int32), np.zeros(seq, np.int32)
        ids[:n], valid[:n] = source, 1
        program = Program([Write(_in("encoder", 0), ids, what="the source ids"),
                           Write(_in("encoder", 1), valid, what="the source's valid positions"), Launch("encoder"),
                           Copy(_in("cross_kv", 0), _out("encoder", 0)), Launch("cross_kv")])
        for layer, (k, v) in enumerate(self.cross):
            program += [Copy(k, _out("cross_kv", 2 * layer)), Copy(v, _out("cross_kv", 2 * layer + 1))]
        self.device.execute(program)
        self.source_mask[...] = 0.0
        self.source_mask[..., n:] = MASK_VALUE

    def room(self, source: list[int]) -> int:
        """A translation's target has its own SEQ positions, the first taken by the decoder start token."""
        return self.shapes.seq_length - 1

    def _steps(self, embedding: str, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray,
               row: int | None) -> Program:
        """Embed `ids` at `positions`, then every layer's block (prefill when `row` is None, else decode)."""
        steps = positions.size
        program = Program([Write(_in(embedding, 0), ids, what="the ids"),
                           Write(_in(embedding, 1), positions, what="the positions"), Launch(embedding)])
        hidden = _out(embedding, 0)
        source_mask = np.repeat(self.source_mask, steps, axis=2)
        for layer in range(self.shapes.num_layers):
            block = f"{self.block if row is None else self.block_cache}{layer}"
            program += [Copy(_in(block, 0), hidden),
                        Write(_in(block, 1), mask, raw=False, what="the mask"),
                        Write(_in(block, 2), source_mask, raw=False, what="the source mask"),
                        Copy(_in(block, 3), self.cross[layer][0]), Copy(_in(block, 4), self.cross[layer][1])]
            if row is not None and not self.io_alone:
                program += [Copy(_in(block, h), cache) for h, cache in zip(self.history, self.cache[layer])]
            program += Launch(block)
            hidden = _out(block, 0)
            program += [Copy(self.cache[layer][j], _out(block, 1 + j), dst_row=row or 0) for j in range(2)]
        return program

    def prefill(self, prompt: list[int]) -> tuple[int, np.ndarray]:
        seq, n = self.shapes.seq_length, len(prompt)
        ids, positions = np.zeros(seq, np.int32), np.zeros(seq, np.int32)
        ids[:n], positions[:n] = prompt, np.arange(n)
        program = self._steps("embedding", ids, positions, causal_mask(seq, seq, n).numpy(), None)
        program += Copy(_in("lm_head", 0), _out(f"{self.block}{self.shapes.num_layers - 1}", 0), src_row=n - 1, rows=1)
        program += self._head()
        self.length = n
        return self._run(program)

    def decode(self, token: int) -> tuple[int, np.ndarray]:
        self.length += 1
        row = self.length - 1
        program = self._steps("embedding_cache", np.array([token], np.int32), np.array([row], np.int32),
                              decode_mask(self.shapes.seq_length, row).numpy(), row)
        program += Copy(_in("lm_head", 0), _out(f"{self.block_cache}{self.shapes.num_layers - 1}", 0))
        program += self._head()
        return self._run(program)

    def translate(self, source: list[int], max_new_tokens: int, stop_tokens: frozenset[int] = frozenset()) -> Generation:
        """Greedy target tokens for `source` (the decoder start token is not among them)."""
        self.encode(source)
        result = self.generate([self.decoder_start], max_new_tokens, stop_tokens)
        result.prompt = list(source)
        return result


def runtime_for(backend, manifest: dict) -> ChipStyleRuntime:
    """The runtime that drives this manifest's networks (decoder-only or encoder-decoder) on `backend`:
    a device that executes programs itself (the simulator), or one that runs single networks
    (onnxruntime, FX), wrapped in a HostDevice."""
    device = backend if hasattr(backend, "execute") else HostDevice(backend, network_io(manifest))
    shapes = Shapes.from_manifest(manifest)
    config = manifest["model"]["config"]
    if config.get("is_encoder_decoder"):
        return Seq2SeqRuntime(device, shapes, int(config["decoder_start_token_id"]))
    return ChipStyleRuntime(device, shapes)


def run_prompt(runtime: ChipStyleRuntime, prompt: list[int], max_new_tokens: int,
               stop_tokens: frozenset[int] = frozenset()) -> Generation:
    """Generate from `prompt`: a prompt to continue, or for an encoder-decoder model the source to translate."""
    if isinstance(runtime, Seq2SeqRuntime):
        return runtime.translate(prompt, max_new_tokens, stop_tokens)
    return runtime.generate(prompt, max_new_tokens, stop_tokens)


def load_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise GraphoptError(f"{directory} has no {MANIFEST}: it is not a graphopt output directory. Create one with "
                            "`graphopt run MODEL --target onnx --out DIR` and pass that DIR.")
    return json.loads(path.read_text())


def open_runtime(directory: Path) -> tuple[ChipStyleRuntime, dict]:
    manifest = load_manifest(directory)
    return runtime_for(OrtBackend(directory, manifest), manifest), manifest
