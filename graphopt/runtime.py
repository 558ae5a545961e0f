"""The runtime that drives the emitted networks as the chip runtime does, down to its device memory.

`ChipStyleRuntime` is LLM-TPU's Llama3_1 chat demo, `LlmTpuRuntime` today's LLM-TPU demos (Qwen3):
each prefill and decode step is the Program (graphopt/device_program.py) of writes, copies,
launches and reads that the demo's chat.cpp makes, with the bits it writes (int32 ids and
positions, 16-bit mask bits). A device executes it: the
cmodel simulator on the bmodel's real memory (targets/bm1684x/simulator.py), or `HostDevice`
over onnxruntime sessions or the rewritten FX graphs (each compiler stage checked with the same
driver). `Seq2SeqRuntime` drives encoder-decoder networks as docs/encoder-decoder-networks.md says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from graphopt import contract as c
from graphopt.device_program import (At, Buffer, Copy, Fill, HostDevice, IoSpec, Launch, Program, Read, Same, Tensor,
                                     Write)
from graphopt.errors import GraphoptError
from graphopt.manifest import load_manifest

# What the Llama3_1 demo writes for "masked", whatever the nets' dtype: fp16 −10000, bits 0xF0E2.
ATTENTION_MASK = np.uint16(c.LLAMA3_1_DEMO.mask_bits["float16"]).view(np.float16)


class Backend(Protocol):
    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def ort_session(model: Path | bytes, prepack: bool = True, threads: int | None = None):
    """A quiet CPU onnxruntime session of an ONNX file, or of a model serialized in memory. `prepack=False`
    for a session run a few times: packing every MatMul weight when the session opens (a copy of all of
    them) then costs more than packing per run saves. The packed layout is the same either way, and so are
    the outputs.

    onnxruntime's constant folding is off. The only constants graphopt's ONNX leaves to fold are the
    Transposes over Linear weights, kept for TPU-MLIR (onnx_ir.py); folding them copied and transposed every
    weight as the session opened: an 8B block's check session took 1.8-3.9 s to open, 0.01 s without, since
    its external data is then mapped and not copied. onnxruntime fuses each Transpose into its MatMul instead
    (FusedMatMul, transB), which runs as fast, and the outputs are the same bits (measured on that block).

    `threads`: its intra-op threads (default: onnxruntime's, one per core), the share of the cores a process
    has where others run beside it (export workers): onnxruntime's threads spin while they wait."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                        providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantFolding"])


class OrtBackend:
    """onnxruntime sessions over an output directory's ONNX files, opened on first use."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory, self.manifest = directory, manifest
        self.files = {n["name"]: n["file"] for n in manifest["networks"]}
        self.files.update({alias: self.files[source] for alias, source in c.contract_of_manifest(manifest).aliases().items()})
        self._sessions: dict = {}

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if network not in self._sessions:
            self._sessions[network] = ort_session(self.directory / self.files[network])
        session = self._sessions[network]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs)))

    def head_logits(self):
        return head_logits_for(self.directory, self.manifest)


class FxBackend:
    """The rewritten FX graphs, run in torch: the stage before ONNX."""

    def __init__(self, networks: dict):
        self.networks = networks
        self.aliases = {alias: source for k in c.CONTRACTS.values() for alias, source in k.aliases().items()}

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        net = self.networks[self.aliases.get(network, network)]
        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in net.inputs]
        return {name: out.numpy() for name, out in zip(net.output_names, net.run(*args))}

    def head_logits(self):
        """For a token-out lm_head: its FX graph up to the TopK's input (see HeadLogits)."""
        import torch

        head = next((n for n in self.networks.values() if n.kind == c.LM_HEAD), None)
        topk = next((n for n in head.graph.nodes if n.target == torch.ops.aten.topk.default), None) if head else None
        if topk is None:
            return None
        gm = head.subgraph([topk.args[0]])

        def logits(hidden: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return gm(torch.from_numpy(hidden.reshape(1, -1).astype(np.float32)))[0].numpy().reshape(-1)

        return logits


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # [V] per generated token
    stopped: str = ""  # "eos", "length" (reached SEQ) or "" (max_new_tokens)
    draws: list["Draw"] = field(default_factory=list)  # per generated token, when sampled


@dataclass(frozen=True)
class Draw:
    """One sampled step: the sample head's candidates (the first top_k, as the demo reads them), their
    probabilities, and the ids the repetition penalty was given."""

    candidates: np.ndarray
    probs: np.ndarray
    penalised: np.ndarray


@dataclass(frozen=True)
class Sampling:
    """What LLM-TPU's demos sample with under --do_sample: the generation config's repetition_penalty,
    temperature, top_k and top_p (config/generation_config.json; transformers' defaults where it says
    nothing, as the demos read it), the penalty's window (pipeline.py --rep_window: the turn's last 64
    tokens; 0: all of them) and, graphopt's own, the seed of the host's draw (the demo seeds from
    std::random_device, so no two runs of it draw alike)."""

    penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = c.SAMPLE_CANDIDATES
    top_p: float = 1.0
    window: int = 64
    seed: int = 0

    def __post_init__(self):
        problems = [f"top_k {self.top_k} is not between 1 and {c.SAMPLE_CANDIDATES}, the candidates sample_head "
                    "answers (the demo reads top_k of them)"] if not 1 <= self.top_k <= c.SAMPLE_CANDIDATES else []
        problems += [f"temperature {self.temperature} is not above 0"] if not self.temperature > 0 else []
        problems += [f"top_p {self.top_p} is not in (0, 1]"] if not 0 < self.top_p <= 1 else []
        problems += [f"repetition_penalty {self.penalty} is not above 0"] if not self.penalty > 0 else []
        if problems:
            raise GraphoptError(f"cannot sample: {'; '.join(problems)}. Set it in the generation config "
                                "(config/generation_config.json beside the networks), which the demos read too.")

    @classmethod
    def from_generation_config(cls, path: Path, window: int = 64, seed: int = 0) -> "Sampling":
        """As the python_demo reads it: transformers' GenerationConfig of the folder (its defaults, the
        cpp_demo's too, where the file says nothing)."""
        from transformers import GenerationConfig
        from transformers.utils import logging as transformers_logging

        if not path.is_file():
            raise GraphoptError(f"sampling reads the generation config, and {path} is not there: `graphopt run` writes "
                                "it into config/ beside the networks; copy the model's generation_config.json there.")
        level = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # not its notes on flags greedy generation ignores
        try:
            config = GenerationConfig.from_pretrained(str(path.parent), path.name)
        except (OSError, ValueError) as error:
            raise GraphoptError(f"{path} is not a generation config transformers can read ({error}); fix or replace "
                                "it with the model's generation_config.json.") from None
        finally:
            transformers_logging.set_verbosity(level)
        read = (config.repetition_penalty, config.temperature, config.top_k, config.top_p)
        defaults = (cls.penalty, cls.temperature, cls.top_k, cls.top_p)  # the cpp_demo's (transformers' unset: None)
        return cls(*(d if v is None else v for v, d in zip(read, defaults)), window, seed)

    @property
    def describe(self) -> str:
        window = f"the last {self.window} tokens" if self.window else "the whole turn"
        return (f"penalty {self.penalty} over {window}, temperature {self.temperature}, top_k {self.top_k}, "
                f"top_p {self.top_p}")

    def penalised(self, turn: list[int]) -> np.ndarray:
        """The ids the demo gives the repetition penalty: the turn's last `window` tokens (all with 0)."""
        return np.asarray(turn[-self.window:] if self.window > 0 else turn, np.int32)


@dataclass(frozen=True)
class Shapes:
    seq_length: int
    num_layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    max_input: int = 0  # the prefill's rows (LLM-TPU's MAX_INPUT_LENGTH); 0: SEQ

    @property
    def prefill_rows(self) -> int:
        return self.max_input or self.seq_length

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Shapes":
        contract = c.contract_of_manifest(manifest)
        nets = {n["name"]: n for n in manifest["networks"]}
        layers = contract.layers(nets)
        block = nets[contract.prefill_block.network(layers[0])]
        past_k = next(o for o in block["outputs"] if o["name"] == c.PAST_K)["shape"]
        return cls(seq_length=manifest["seq_length"], num_layers=len(layers),
                   hidden=nets[contract.network(c.LM_HEAD)]["inputs"][0]["shape"][-1], kv_heads=past_k[2],
                   head_dim=past_k[3], max_input=block["inputs"][0]["shape"][1])


def network_io(manifest: dict) -> dict[str, dict[str, list[tuple[str, IoSpec]]]]:
    """Each network's inputs and outputs by position, the contract's one-token networks included
    (embedding_cache: the embedding with its dynamic sequence axis at one token)."""
    def specs(net: dict, io: str, one_token: bool) -> list[tuple[str, IoSpec]]:
        return [(t["name"], IoSpec(c.one_token_shape(t["shape"]) if one_token else tuple(t["shape"]),
                                   np.dtype(t["dtype"]))) for t in net[io]]

    nets = {n["name"]: n for n in manifest["networks"]}
    contract = c.contract_of_manifest(manifest)
    io = {name: {"in": specs(n, "inputs", False), "out": specs(n, "outputs", False)} for name, n in nets.items()}
    for alias, source in contract.aliases().items():
        io[alias] = {"in": specs(nets[source], "inputs", True), "out": specs(nets[source], "outputs", True)}
    for name, entry in io.items():  # a dynamic net's baked inputs: not the runtime's to write, made per launch
        spec = contract.spec(name)
        if spec.launch_length:
            entry["launch_length"] = spec.launch_length
        if spec.baked:
            entry["baked"] = {n: _baker(spec, dict(entry["in"])[n].shape) for n in spec.baked}
            entry["in"] = [(n, s) for n, s in entry["in"] if n not in spec.baked]
    return io


def _baker(spec: c.NetworkSpec, shape: tuple[int, ...]):
    """The baked mask of `spec`'s net for a launch: its rows and cache rows from the launch's dims."""
    inputs = spec.device_inputs
    history = inputs.index(c.HISTORY_K) if c.HISTORY_K in inputs else None

    def bake(launch: Launch) -> np.ndarray:
        rows = launch.length(0, shape[2])
        cache = launch.length(history, shape[3] - shape[2]) if history is not None else 0
        return c.launch_mask(shape, rows, cache)

    return bake


def _in(net: str, index: int) -> Tensor:
    return Tensor(net, "in", index)


def _out(net: str, index: int) -> Tensor:
    return Tensor(net, "out", index)


class ChipStyleRuntime:
    """LLM-TPU's Llama3_1 chat demo (`models/Llama3_1/python_demo/chat.cpp` at ea05961), step for step.

    Prefill: the prompt's int32 ids padded to SEQ into `embedding` (the demo's visited tokens: zeros
    on a first turn, an earlier turn's tokens after it); its output copied into `block_0`'s input,
    then each block's output into the next block's input. Positions and the [SEQ,SEQ] mask are
    written into block_0's inputs only: every later block reads its own, which the demo takes to be
    the same memory. Each block's past_k/past_v is copied whole into the layer's cache; row len-1 of
    the last hidden states into `lm_head`; `greedy_head` reads lm_head's output in place. Decode:
    the token into `embedding_cache`, its output through every `block_cache_i`, whose new K/V row
    goes into the cache at row len-1. The masks hold `ATTENTION_MASK` as fp16 bits (0xF0E2),
    whatever dtype the nets have. Where the decode nets are io_alone, the cache *is* their history
    input memory; otherwise the demo allocates it and copies it in every step. Every net name and
    input position comes from the contract (graphopt/contract.py, LLAMA3_1_DEMO)."""

    contract = c.LLAMA3_1_DEMO
    prefill_kind, decode_kind = c.BLOCK, c.BLOCK_CACHE

    draw: Draw | None = None  # the last step's, where the runtime samples

    def __init__(self, device, shapes: Shapes):
        self.device, self.shapes = device, shapes
        self.length = 0
        self.visited = np.zeros(shapes.seq_length, np.int32)
        self.prefill_spec, self.decode_spec = self.contract.spec(self.prefill_kind), self.contract.spec(self.decode_kind)
        self.embedding, self.embedding_cache = self.contract.network(c.EMBEDDING), self.contract.one_token(c.EMBEDDING)
        self.lm_head = self.contract.network(c.LM_HEAD)
        self.greedy_head = self.contract.network(c.GREEDY_HEAD) if self.contract.has(c.GREEDY_HEAD) else None
        self.history = tuple(self.decode_spec.input_index(name) for name in c.HISTORY_INPUTS)
        self.io_alone = device.io_alone(self.block_cache(0))
        self.cache = [tuple(_in(self.block_cache(i), h) if self.io_alone else
                            Buffer(f"past_{'kv'[j]}_{i}", _in(self.block_cache(i), h))
                            for j, h in enumerate(self.history)) for i in range(shapes.num_layers)]

    def block(self, layer: int) -> str:
        return self.prefill_spec.network(layer)

    def block_cache(self, layer: int) -> str:
        return self.decode_spec.network(layer)

    def _head(self) -> list:
        # The logits are read for the checks, before greedy_head runs: a head whose memory is shared
        # with greedy_head's may be overwritten by it (the demo itself only reads the token).
        return [Launch(self.lm_head), Read(_out(self.lm_head, 0), "logits"),
                Launch(self.greedy_head, bind=((0, _out(self.lm_head, 0)),)), Read(_out(self.greedy_head, 0), "next")]

    def _run(self, program: Program) -> tuple[int, np.ndarray]:
        out = self.device.execute(program)
        return int(out["next"].reshape(-1)[0]), out["logits"].reshape(-1).astype(np.float32)

    def room(self, prompt: list[int]) -> int:
        """How many tokens can follow `prompt` before its SEQ positions are used up."""
        return self.shapes.seq_length - len(prompt)

    def prefill(self, prompt: list[int]) -> tuple[int, np.ndarray]:
        seq, n = self.shapes.seq_length, len(prompt)
        positions = np.zeros(seq, np.int32)
        self.visited[:n], positions[:n] = prompt, np.arange(n)
        mask = c.causal_mask(seq, seq, n).astype(ATTENTION_MASK.dtype)
        position, mask_input = (self.prefill_spec.input_index(x) for x in (c.POSITION_IDS, c.ATTENTION_MASK))
        program = Program([Write(_in(self.embedding, 0), self.visited.copy(), what="the prompt's ids"),
                           Launch(self.embedding)])
        hidden, first = _out(self.embedding, 0), self.block(0)
        for layer in range(self.shapes.num_layers):
            block = self.block(layer)
            program += Copy(_in(block, 0), hidden)
            if layer == 0:
                program += [Write(_in(block, position), positions, what="the positions"),
                            Write(_in(block, mask_input), mask, what="the prefill mask")]
            else:
                program += [Same(_in(block, position), _in(first, position)),
                            Same(_in(block, mask_input), _in(first, mask_input))]
            program += Launch(block)
            hidden = _out(block, 0)
            program += [Copy(self.cache[layer][j], _out(block, 1 + j)) for j in range(2)]
        program += Copy(_in(self.lm_head, 0), hidden, src_row=n - 1, rows=1)
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
        mask = c.decode_mask(seq, row).astype(ATTENTION_MASK.dtype)
        position, mask_input = (self.decode_spec.input_index(x) for x in (c.POSITION_IDS, c.ATTENTION_MASK))
        program = Program([Write(_in(self.embedding_cache, 0), np.array([token], np.int32), what="the token"),
                           Launch(self.embedding_cache)])
        hidden, first = _out(self.embedding_cache, 0), self.block_cache(0)
        for layer in range(self.shapes.num_layers):
            block = self.block_cache(layer)
            program += Copy(_in(block, 0), hidden)
            if layer == 0:
                program += [Write(_in(block, position), np.array([row], np.int32), what="the position"),
                            Write(_in(block, mask_input), mask, what="the decode mask")]
            elif self.io_alone:
                program += [Copy(_in(block, position), _in(first, position)),
                            Copy(_in(block, mask_input), _in(first, mask_input))]
            else:
                program += [Same(_in(block, position), _in(first, position)),
                            Same(_in(block, mask_input), _in(first, mask_input))]
            if not self.io_alone:
                program += [Copy(_in(block, h), cache) for h, cache in zip(self.history, self.cache[layer])]
            program += Launch(block)
            hidden = _out(block, 0)
            program += [Copy(self.cache[layer][j], _out(block, 1 + j), dst_row=row) for j in range(2)]
        program += Copy(_in(self.lm_head, 0), hidden)
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
            if self.draw is not None:
                result.draws.append(self.draw)
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


class LlmTpuRuntime(ChipStyleRuntime):
    """Today's LLM-TPU chat demos (`models/Qwen3/python_demo/chat.cpp` at d581e7b, its path for a
    static bmodel without `block_kv_i`), step for step, on the networks of contract LLM_TPU.

    The cache of layer i is `block_cache_i`'s history_k/history_v memory, zeroed at load. Prefill: the
    prompt's int32 ids written over a zeroed `embedding` input (only n ids), its output copied into a
    buffer of the runtime's own, block_0's inputs and outputs zeroed, then n rows of hidden states
    copied into each block (into block_0 only, where block_0's input and output share an address:
    the blocks then compute in place), positions and the [L,L] mask into block_0 (every later block
    reads its own), n rows of each block's K/V into the cache, row n-1 of the last block into
    lm_head, which answers the token. Decode: the token into `embedding_cache`; each `block_cache_i`
    reads the previous net's output in place and block_cache_0's position and mask, and writes its
    new K/V row straight into the cache at row len-1 (no copy). The mask bits follow the nets' dtype
    (`embedding_cache`'s output): fp16 0xF0E2 or bf16 0xC61C. Where `block_cache_i` has decode stages
    (the same net compiled for fewer cache rows, stage 0 holding SEQ), a decode step runs the stage
    with the fewest rows that hold the history, as the Qwen3 cpp_demo's `select_decode_stage` picks
    it, and takes that stage's cache input to be the cache (they share addresses).

    Dynamic blocks (`--dynamic`, the demo's `is_dynamic` without a prefill mask input): block_i computes
    its causal mask itself and runs at the prompt's n rows (`net_launch_dyn`); nothing is written for
    the mask. History-KV (`block_kv_i`, the cpp_demo's `forward_first_with_kv`, its newer and chunked
    form of the python demo's): a prompt continues the session. Its ids are embedded a chunk
    (MAX_INPUT_LENGTH) at a time into a buffer of SEQ rows; each chunk runs through block_i on a fresh
    session, else through block_kv_i with the cache's rows so far copied into its history inputs
    (`net_launch_kv_dyn` sets the chunk's and the cache's lengths), and its K/V is copied into the cache
    after them. `clear()` is the demo's `clear_kv`. After a turn that followed another, the cpp_demo
    counts `history_length` one past the cache: it adds the turn's tokens to a count that already held
    the previous answer's last token, which never enters the cache, so the turn's decode steps attend
    one row nobody wrote, at positions one too far. This runtime counts as the demo does (the tokens a
    user of the demo gets: equal to the real demo's on the simulator, README "Checked against the
    runtime"); `exact_history=True` counts the cache's rows instead, which is what makes a chat's
    turns equal to one prefill of the whole conversation (checks.chat_check).

    Sampling networks (`--do-sample`): lm_head answers logits, copied into greedy_head (the demo's
    greedy_search), or with `sampling` into sample_head (its penalty_sample): the parameters written
    once at load, per token the turn's last `window` ids with their count as the launch's length, then
    top_k candidates and probabilities read back and one drawn (`Draw`, kept on the Generation).

    The demo reads no logits; for the checks, `head_logits(hidden_row) -> logits` (when given) turns
    the row lm_head was fed into the logits the reference head computes from it."""

    contract = c.LLM_TPU

    def __init__(self, device, shapes: Shapes, head_logits=None, contract: c.Contract = c.LLM_TPU,
                 exact_history: bool = False, sampling: Sampling | None = None):
        self.contract = contract
        super().__init__(device, shapes)
        self.head_logits, self.exact_history = head_logits, exact_history
        self.turn: list[int] = []  # the demo's visited tokens: this turn's prompt and answer so far
        self._init_heads(sampling)
        self.cache = [tuple(_in(self.block_cache(i), h) for h in self.history) for i in range(shapes.num_layers)]
        self.dynamic = self.prefill_spec.dynamic
        self.kv_spec = contract.spec(c.BLOCK_KV) if contract.has(c.BLOCK_KV) else None
        # With history-KV the buffer holds the hidden states of a whole prompt (SEQ rows), chunk after chunk.
        self.buffer = Buffer("dev_buffer", _out(self.embedding, 0), shapes.seq_length if self.kv_spec else None)
        first = self.block_kv(0) if self.kv_spec else self.block(0)  # the net the demo asks is_same_addr of
        address = device.address(_in(first, 0))
        self.in_place = address is not None and address == device.address(_out(first, 0))
        if self.kv_spec:  # the demo's init zeroes the cache, as clear_kv does
            self.clear()
        dtype = device.dtype(_out(self.embedding_cache, 0))
        self.mask_bits = {"bf16": "bfloat16"}.get(dtype, "float16")
        self.mask_value = np.uint16(self.contract.mask_bits[self.mask_bits])
        # Decode stages: the cache rows of each stage of block_cache_0 (stage 0: SEQ, then fewer).
        self.stage_rows = device.stage_rows(_in(self.block_cache(0), self.history[0]))

    def block_kv(self, layer: int) -> str:
        return self.kv_spec.network(layer)

    def room(self, prompt: list[int]) -> int:
        """With history-KV, a prompt follows the session's cache."""
        return super().room(prompt) - (self.length if self.kv_spec else 0)

    def clear(self) -> None:
        """The demo's clear_kv: a new session (the cache zeroed)."""
        if self.kv_spec:
            self.device.execute(Program([Fill(cache) for layer in self.cache for cache in layer]))
        self.length = 0

    def decode_stage(self, history_length: int) -> int:
        """The cpp_demo's select_decode_stage: the last stage (in the file's order) whose cache rows are
        at least `history_length`, the tokens so far with the new one."""
        stage = 0
        for rows in self.stage_rows:
            if history_length > rows:
                break
            stage += 1
        return max(stage - 1, 0)

    def _mask(self, dst: Tensor, mask: np.ndarray, what: str) -> Write:
        """The demo's mask: its bit pattern where `mask` is masked, 0 elsewhere."""
        bits = np.where(mask < 0, self.mask_value, np.uint16(0)).astype(np.uint16)
        return Write(dst, bits, bits=self.mask_bits, what=what)

    def _init_heads(self, sampling: Sampling | None) -> None:
        """Where lm_head answers logits (--do-sample), the demo's greedy_search or, when sampling, its
        penalty_sample; the cpp_demo writes the sampling parameters into sample_head once, at init."""
        self.sampling, self.draw = sampling, None
        if sampling is None:
            return
        if not self.contract.has(c.SAMPLE_HEAD):
            raise GraphoptError("sampling needs networks compiled with --do-sample (greedy_head and sample_head); "
                                "these answer the token from lm_head. Recompile with --do-sample, or generate greedily.")
        self.rng = np.random.default_rng(sampling.seed)
        spec = self.contract.spec(c.SAMPLE_HEAD)
        head = spec.network()
        self.device.execute(Program([
            Write(_in(head, spec.device_inputs.index(name)), np.array([value], dtype), what=f"the {name}")
            for name, value, dtype in ((c.PENALTY, sampling.penalty, np.float32),
                                       (c.TEMPERATURE, sampling.temperature, np.float32),
                                       (c.TOP_K, sampling.top_k, np.int32), (c.TOP_P, sampling.top_p, np.float32))]))

    def _head(self) -> list:
        if self.contract.head_outputs_token:
            return [Read(_in(self.lm_head, 0), "hidden"), Launch(self.lm_head), Read(_out(self.lm_head, 0), "next")]
        logits = _out(self.lm_head, 0)
        program = [Launch(self.lm_head), Read(logits, "logits")]
        if self.sampling is None:  # greedy_search: the logits copied into greedy_head
            greedy = self.contract.network(c.GREEDY_HEAD)
            return program + [Copy(_in(greedy, 0), logits), Launch(greedy), Read(_out(greedy, 0), "next")]
        # penalty_sample: the ids to penalise written (their count is the launch's length), the logits copied
        # in, and the first top_k candidates and probabilities read back
        spec = self.contract.spec(c.SAMPLE_HEAD)
        head, ids = spec.network(), spec.device_inputs.index(c.INPUT_IDS)
        penalised = self.sampling.penalised(self.turn)
        top_k = self.sampling.top_k
        return program + [Write(_in(head, ids), penalised, partial=True, what="the ids to penalise"),
                          Copy(_in(head, spec.device_inputs.index(c.M_LOGITS)), logits),
                          Launch(head, dims=((ids, 1, len(penalised)),)),
                          Read(_out(head, spec.outputs.index(c.PROBS)), "candidate_probs", rows=top_k),
                          Read(_out(head, spec.outputs.index(c.TOKEN)), "candidates", rows=top_k),
                          Read(_in(head, ids), "penalised", rows=len(penalised))]

    def _run(self, program: Program) -> tuple[int, np.ndarray]:
        out = self.device.execute(program)
        if self.contract.head_outputs_token:
            hidden = out["hidden"].reshape(-1).astype(np.float32)
            logits = self.head_logits(hidden) if self.head_logits else np.zeros(0, np.float32)
            return int(out["next"].reshape(-1)[0]), logits
        logits = out["logits"].reshape(-1).astype(np.float32)
        if self.sampling is None:
            return int(out["next"].reshape(-1)[0]), logits
        # The demo's std::discrete_distribution over the candidates' probabilities (weights: it normalises them).
        probs = out["candidate_probs"].reshape(-1).astype(np.float64)
        self.draw = Draw(out["candidates"].reshape(-1).astype(np.int64), probs,
                         out["penalised"].reshape(-1).astype(np.int64))
        return int(self.draw.candidates[self.rng.choice(probs.size, p=probs / probs.sum())]), logits

    def _visit(self, answer: tuple[int, np.ndarray]) -> tuple[int, np.ndarray]:
        self.turn.append(answer[0])
        return super()._visit(answer)

    def _dims(self, spec: c.NetworkSpec, rows: int, history: int = 0) -> tuple[tuple[int, int, int], ...]:
        """net_launch_dyn / net_launch_kv_dyn, for dynamic nets (a static one runs at its own lengths)."""
        return c.launch_dims(spec.device_inputs, rows, history) if self.dynamic else ()

    def prefill(self, prompt: list[int]) -> tuple[int, np.ndarray]:
        self.turn = list(prompt)
        if self.kv_spec:
            return self._prefill_with_history(prompt)
        rows, n = self.shapes.prefill_rows, len(prompt)
        if n > rows:
            raise GraphoptError(f"the prompt has {n} tokens but the prefill networks take {rows} "
                                "(--max-input-length): give at most that many, or compile with a larger one.")
        positions = np.zeros(rows, np.int32)
        positions[:n] = np.arange(n)
        self.visited[:] = 0
        self.visited[:n] = prompt
        spec, first = self.prefill_spec, self.block(0)
        position = spec.device_inputs.index(c.POSITION_IDS)
        mask_input = None if c.ATTENTION_MASK in spec.baked else spec.device_inputs.index(c.ATTENTION_MASK)
        program = Program([Fill(_in(self.embedding, 0)),
                           Write(_in(self.embedding, 0), np.asarray(prompt, np.int32), partial=True,
                                 what="the prompt's ids"),
                           Launch(self.embedding), Copy(self.buffer, _out(self.embedding, 0))])
        program += self._empty_net(spec, first)
        hidden = self.buffer
        for layer in range(self.shapes.num_layers):
            block = self.block(layer)
            if layer == 0 or not self.in_place:
                program += Copy(_in(block, 0), hidden, rows=n)
            else:
                program += Same(_in(block, 0), _out(self.block(layer - 1), 0))
            if layer == 0:
                program += Write(_in(block, position), positions, what="the positions")
                if mask_input is not None:
                    program += self._mask(_in(block, mask_input), c.causal_mask(rows, rows, n), "the prefill mask")
            else:
                program += Same(_in(block, position), _in(first, position))
                if mask_input is not None:
                    program += Same(_in(block, mask_input), _in(first, mask_input))
            program += Launch(block, dims=self._dims(spec, n))
            hidden = _out(block, 0)
            program += [Copy(self.cache[layer][j], _out(block, 1 + j), rows=n) for j in range(2)]
        program += Copy(_in(self.lm_head, 0), hidden, src_row=n - 1, rows=1)
        program += self._head()
        self.length = n
        return self._visit(self._run(program))

    @staticmethod
    def _empty_net(spec: c.NetworkSpec, net: str) -> list:
        """The demo's empty_net: every input and output of a net zeroed."""
        return ([Fill(_in(net, i)) for i in range(len(spec.device_inputs))] +
                [Fill(_out(net, i)) for i in range(len(spec.outputs))])

    def _prefill_with_history(self, tokens: list[int]) -> tuple[int, np.ndarray]:
        """The cpp_demo's forward_first_with_kv: the prompt after the session's cache, a chunk at a time."""
        rows, n, seq = self.shapes.prefill_rows, len(tokens), self.shapes.seq_length
        if self.length + n >= seq:
            raise GraphoptError(f"the session holds {self.length} tokens and the prompt has {n}, but the cache holds "
                                f"{seq} (--seq-length) with one row for the answer: start a new session (clear), "
                                "give a shorter prompt, or compile with a larger --seq-length.")
        chunks = [(t, min(rows, n - t)) for t in range(0, n, rows)]
        ids = np.asarray(tokens, np.int32)
        program = Program()
        for t, size in chunks:
            program += [Fill(_in(self.embedding, 0)),
                        Write(_in(self.embedding, 0), ids[t:t + size], partial=True, what="a chunk's ids"),
                        Launch(self.embedding), Copy(self.buffer, _out(self.embedding, 0), dst_row=t, rows=size)]
        program += self._empty_net(self.prefill_spec, self.block(0)) + self._empty_net(self.kv_spec, self.block_kv(0))
        history, positions = self.length, np.zeros(rows, np.int32)  # positions past a chunk keep the last chunk's
        hidden = self.buffer
        for t, size in chunks:
            positions[:size] = history + np.arange(size)
            spec, name = (self.kv_spec, self.block_kv) if history else (self.prefill_spec, self.block)
            for layer in range(self.shapes.num_layers):
                net = name(layer)
                if layer == 0:
                    program += Copy(_in(net, 0), self.buffer, src_row=t, rows=size)
                elif not self.in_place:
                    program += Copy(_in(net, 0), hidden, rows=size)
                else:
                    program += Same(_in(net, 0), _out(name(layer - 1), 0))
                program += Write(_in(net, spec.device_inputs.index(c.POSITION_IDS)), positions.copy(),
                                 what="the chunk's positions")
                if history:
                    program += [Copy(_in(net, spec.device_inputs.index(h)), cache, rows=history)
                                for h, cache in zip(c.HISTORY_INPUTS, self.cache[layer])]
                program += Launch(net, dims=self._dims(spec, size, history))
                hidden = _out(net, 0)
                program += [Copy(self.cache[layer][j], _out(net, 1 + j), dst_row=history, rows=size) for j in range(2)]
            history += size
        program += Copy(_in(self.lm_head, 0), hidden, src_row=chunks[-1][1] - 1, rows=1)
        program += self._head()
        # The demo's count after a turn that followed another: one past the cache (see the class docstring).
        self.length = history + (1 if self.length and not self.exact_history else 0)
        self.visited[:n] = tokens
        return self._visit(self._run(program))

    def decode(self, token: int) -> tuple[int, np.ndarray]:
        self.length += 1
        row = self.length - 1  # the new token's position and its cache row
        stage = self.decode_stage(self.length)
        rows = self.stage_rows[stage]
        spec, first = self.decode_spec, self.block_cache(0)
        position, mask_input = (spec.input_index(x) for x in (c.POSITION_IDS, c.ATTENTION_MASK))

        def at(net: str, index: int) -> Tensor:  # an input of `net` in this step's stage
            return Tensor(net, "in", index, stage)

        program = Program([Write(_in(self.embedding_cache, 0), np.array([token], np.int32), what="the token"),
                           Launch(self.embedding_cache)])
        program += [Write(at(first, position), np.array([row], np.int32), what="the position"),
                    self._mask(at(first, mask_input), c.decode_mask(rows, row), "the decode mask")]
        hidden = _out(self.embedding_cache, 0)
        for layer in range(self.shapes.num_layers):
            block = self.block_cache(layer)
            bind = ((0, hidden),) if layer == 0 else (
                (0, hidden), (position, at(first, position)), (mask_input, at(first, mask_input)))
            if stage:  # the stage's cache inputs are taken to be the cache (stage 0's memory)
                program += [Same(at(block, h), cache) for h, cache in zip(self.history, self.cache[layer])]
            program += Launch(block, bind=bind, bind_out=tuple((1 + j, At(self.cache[layer][j], row)) for j in range(2)),
                              stage=stage)
            hidden = Tensor(block, "out", 0, stage)
        program += Copy(_in(self.lm_head, 0), hidden)
        program += self._head()
        return self._visit(self._run(program))


class Seq2SeqRuntime(ChipStyleRuntime):
    """An encoder-decoder model's networks, driven as docs/encoder-decoder-networks.md says.

    The source is padded to SRC (= SEQ) and encoded once; `cross_kv` turns the encoder output into
    every layer's cross-attention K/V, which the runtime keeps in buffers of its own and copies into
    each decoder block. The target then runs like a decoder-only model: the decoder start token is
    the prompt, prefilled through `decoder_block_i`, and each next token is decoded through
    `decoder_block_cache_i`. This contract is graphopt's own: masks are written as values in the
    nets' dtype, and every block gets its inputs written or copied before it runs."""

    contract = c.ENCODER_DECODER
    prefill_kind, decode_kind = c.DECODER_BLOCK, c.DECODER_BLOCK_CACHE

    def __init__(self, device, shapes: Shapes, decoder_start: int):
        super().__init__(device, shapes)
        self.decoder_start = decoder_start
        self.encoder, self.cross_kv = self.contract.network(c.ENCODER), self.contract.network(c.CROSS_KV)
        self.cross = [tuple(Buffer(f"cross_{'kv'[j]}_{i}", _out(self.cross_kv, 2 * i + j)) for j in range(2))
                      for i in range(shapes.num_layers)]
        self.source_length = shapes.seq_length

    def encode(self, source: list[int]) -> None:
        seq, n = self.shapes.seq_length, len(source)
        if not 0 < n <= seq:
            raise GraphoptError(f"the source has {n} tokens but the networks were compiled for --seq-length {seq}: "
                                f"give 1 to {seq} tokens, or compile with a larger --seq-length.")
        ids, valid = np.zeros(seq, np.int32), np.zeros(seq, np.int32)
        ids[:n], valid[:n] = source, 1
        spec = self.contract.spec(c.ENCODER)
        program = Program([Write(_in(self.encoder, spec.input_index(c.INPUT_IDS)), ids, what="the source ids"),
                           Write(_in(self.encoder, spec.input_index(c.SOURCE_VALID)), valid,
                                 what="the source's valid positions"), Launch(self.encoder),
                           Copy(_in(self.cross_kv, 0), _out(self.encoder, 0)), Launch(self.cross_kv)])
        for layer, (k, v) in enumerate(self.cross):
            program += [Copy(k, _out(self.cross_kv, 2 * layer)), Copy(v, _out(self.cross_kv, 2 * layer + 1))]
        self.device.execute(program)
        self.source_length = n

    def room(self, source: list[int]) -> int:
        """A translation's target has its own SEQ positions, the first taken by the decoder start token."""
        return self.shapes.seq_length - 1

    def _steps(self, embedding: str, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray,
               row: int | None) -> Program:
        """Embed `ids` at `positions`, then every layer's block (prefill when `row` is None, else decode)."""
        embed = self.contract.spec(c.EMBEDDING)
        program = Program([Write(_in(embedding, embed.input_index(c.INPUT_IDS)), ids, what="the ids"),
                           Write(_in(embedding, embed.input_index(c.POSITION_IDS)), positions, what="the positions"),
                           Launch(embedding)])
        hidden = _out(embedding, 0)
        spec = self.prefill_spec if row is None else self.decode_spec
        source_mask = c.source_mask(self.shapes.seq_length, self.source_length, positions.size)
        index = {name: spec.input_index(name) for name in spec.inputs}
        for layer in range(self.shapes.num_layers):
            block = spec.network(layer)
            program += [Copy(_in(block, index[c.INPUT_STATES]), hidden),
                        Write(_in(block, index[c.ATTENTION_MASK]), mask, raw=False, what="the mask"),
                        Write(_in(block, index[c.ENCODER_ATTENTION_MASK]), source_mask, raw=False,
                              what="the source mask"),
                        Copy(_in(block, index[c.CROSS_K]), self.cross[layer][0]),
                        Copy(_in(block, index[c.CROSS_V]), self.cross[layer][1])]
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
        program = self._steps(self.embedding, ids, positions, c.causal_mask(seq, seq, n), None)
        program += Copy(_in(self.lm_head, 0), _out(self.block(self.shapes.num_layers - 1), 0), src_row=n - 1, rows=1)
        program += self._head()
        self.length = n
        return self._run(program)

    def decode(self, token: int) -> tuple[int, np.ndarray]:
        self.length += 1
        row = self.length - 1
        program = self._steps(self.embedding_cache, np.array([token], np.int32), np.array([row], np.int32),
                              c.decode_mask(self.shapes.seq_length, row), row)
        program += Copy(_in(self.lm_head, 0), _out(self.block_cache(self.shapes.num_layers - 1), 0))
        program += self._head()
        return self._run(program)

    def translate(self, source: list[int], max_new_tokens: int, stop_tokens: frozenset[int] = frozenset()) -> Generation:
        """Greedy target tokens for `source` (the decoder start token is not among them)."""
        self.encode(source)
        result = self.generate([self.decoder_start], max_new_tokens, stop_tokens)
        result.prompt = list(source)
        return result


def runtime_for(backend, manifest: dict, head_logits=None, sampling: Sampling | None = None) -> ChipStyleRuntime:
    """The runtime that drives this manifest's networks (by their contract) on `backend`: a device
    that executes programs itself (the simulator), or one that runs single networks (onnxruntime,
    FX), wrapped in a HostDevice. `head_logits`: for a token-out head, how a check gets logits (a
    backend's `head_logits()`, or `HeadLogits`); without it such a head's generation has tokens only,
    as the demo does, and costs no second run of the head per token. `sampling`: draw each token as the
    demos' --do_sample does (networks compiled with --do-sample), instead of greedily."""
    device = backend if hasattr(backend, "execute") else HostDevice(backend, network_io(manifest))
    contract = c.contract_of_manifest(manifest)
    start = int(manifest["model"]["config"]["decoder_start_token_id"]) if contract is c.ENCODER_DECODER else 0
    return runtime_on(device, Shapes.from_manifest(manifest), contract, head_logits, start, sampling)


def runtime_on(device, shapes: Shapes, contract: c.Contract, head_logits=None,
               decoder_start: int = 0, sampling: Sampling | None = None) -> ChipStyleRuntime:
    """The runtime of `contract` on `device` (which executes programs): its demo's, by the contract's key."""
    if sampling is not None and contract.key != c.LLM_TPU.key:
        raise GraphoptError(f"sampling is driven as today's LLM-TPU demos do it (--contract {c.LLM_TPU.key} "
                            f"--do-sample); these networks follow the {contract.name}. Generate greedily.")
    if contract is c.ENCODER_DECODER:
        return Seq2SeqRuntime(device, shapes, decoder_start)
    if contract.key == c.LLM_TPU.key:
        return LlmTpuRuntime(device, shapes, head_logits, contract, sampling=sampling)
    return ChipStyleRuntime(device, shapes)


class HeadLogits:
    """The logits a token-out lm_head computes before its TopK, from a row of hidden states: the
    output directory's lm_head ONNX in onnxruntime with the TopK's input made the output. For the
    checks only (near-ties, logit errors): the chip answers the token alone."""

    def __init__(self, directory: Path, manifest: dict):
        import onnx

        contract = c.contract_of_manifest(manifest)
        net = next(n for n in manifest["networks"] if n["name"] == contract.network(c.LM_HEAD))
        model = onnx.load(str(directory / net["file"]))
        topk = next(n for n in model.graph.node if n.op_type == "TopK")
        del model.graph.output[:]
        model.graph.output.append(onnx.helper.make_tensor_value_info(topk.input[0], onnx.TensorProto.FLOAT, None))
        self.session = ort_session(model.SerializeToString())
        self.input = self.session.get_inputs()[0].name

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: hidden.reshape(1, -1).astype(np.float32)})[0].reshape(-1)


def head_logits_for(directory: Path, manifest: dict):
    """A HeadLogits where the manifest's lm_head answers tokens, else None (its logits are read)."""
    return HeadLogits(directory, manifest) if c.contract_of_manifest(manifest).head_outputs_token else None


def run_prompt(runtime: ChipStyleRuntime, prompt: list[int], max_new_tokens: int,
               stop_tokens: frozenset[int] = frozenset()) -> Generation:
    """Generate from `prompt`: a prompt to continue, or for an encoder-decoder model the source to translate."""
    if isinstance(runtime, Seq2SeqRuntime):
        return runtime.translate(prompt, max_new_tokens, stop_tokens)
    return runtime.generate(prompt, max_new_tokens, stop_tokens)


__all__ = ["ChipStyleRuntime", "LlmTpuRuntime", "Sampling", "Draw", "Seq2SeqRuntime", "HeadLogits", "head_logits_for", "OrtBackend", "FxBackend", "load_manifest", "runtime_for", "runtime_on",
           "run_prompt", "ort_session"]
