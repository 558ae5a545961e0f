"""A reference runtime that drives the emitted networks exactly as the chip runtime does.

It follows LLM-TPU's chat demo step for step: pad the prompt to SEQ, prefill through
`block_i` with a [1,1,SEQ,SEQ] mask of 0 / −10000, keep a [1,SEQ,KV,D] cache per layer,
decode through `block_cache_i` with a [1,1,1,SEQ+1] mask and write each new token's K/V at
row len-1. Backends run single networks by the contract's names: onnxruntime on the emitted
files, the rewritten FX graphs in torch (to check each compiler stage with the same driver),
or a target's simulator (targets/bm1684x/simulator.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.networks import MASK_VALUE, NETWORK_ALIASES, causal_mask, decode_mask

from graphopt.output import MANIFEST


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


class ChipStyleRuntime:
    def __init__(self, backend: Backend, shapes: Shapes):
        self.backend, self.shapes = backend, shapes
        self.length = 0
        cache = (1, shapes.seq_length, shapes.kv_heads, shapes.head_dim)
        self.cache_k = [np.zeros(cache, np.float32) for _ in range(shapes.num_layers)]
        self.cache_v = [np.zeros(cache, np.float32) for _ in range(shapes.num_layers)]

    def _head(self, hidden: np.ndarray) -> tuple[int, np.ndarray]:
        logits = self.backend.run("lm_head", {"hidden_states": hidden})["m_logits"]
        token = self.backend.run("greedy_head", {"m_logits": logits})["token"]
        return int(token.reshape(-1)[0]), logits[0]

    # What differs between model families: the network names and the inputs besides the
    # hidden states, mask and cache (Seq2SeqRuntime overrides these).
    block, block_cache = "block_", "block_cache_"

    def _embed(self, network: str, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.backend.run(network, {"input_ids": ids})["input_embed"]

    def _layer_inputs(self, layer: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        return {"position_ids": positions}

    def room(self, prompt: list[int]) -> int:
        """How many tokens can follow `prompt` before its SEQ positions are used up."""
        return self.shapes.seq_length - len(prompt)

    def prefill(self, prompt: list[int]) -> tuple[int, np.ndarray]:
        seq, n = self.shapes.seq_length, len(prompt)
        ids = np.zeros((1, seq), np.int64)
        ids[0, :n] = prompt
        positions = np.zeros((1, seq), np.int64)
        positions[0, :n] = np.arange(n)
        mask = causal_mask(seq, seq, n).numpy()
        hidden = self._embed("embedding", ids, positions)
        for layer in range(self.shapes.num_layers):
            out = self.backend.run(f"{self.block}{layer}", {"input_states": hidden, "attention_mask": mask,
                                                            **self._layer_inputs(layer, positions)})
            hidden = out["hidden_states"]
            self.cache_k[layer][...] = out["past_k"]
            self.cache_v[layer][...] = out["past_v"]
        self.length = n
        return self._head(hidden[:, n - 1])

    def decode(self, token: int) -> tuple[int, np.ndarray]:
        seq = self.shapes.seq_length
        self.length += 1
        row = self.length - 1  # the new token's position and its cache row
        mask = decode_mask(seq, row).numpy()
        positions = np.array([[row]], np.int64)
        hidden = self._embed("embedding_cache", np.array([[token]], np.int64), positions)
        for layer in range(self.shapes.num_layers):
            out = self.backend.run(f"{self.block_cache}{layer}", {
                "input_states": hidden, "attention_mask": mask, **self._layer_inputs(layer, positions),
                "history_k": self.cache_k[layer], "history_v": self.cache_v[layer]})
            hidden = out["hidden_states"]
            self.cache_k[layer][:, row] = out["past_k"][:, 0]
            self.cache_v[layer][:, row] = out["past_v"][:, 0]
        return self._head(hidden[:, 0])

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
    """An encoder-decoder model's networks, driven as a chip runtime would.

    The source is padded to SRC (= SEQ) and encoded once; `cross_kv` turns the encoder output into
    every layer's cross-attention K/V once. The target then runs like a decoder-only model: the
    decoder start token is the prompt, prefilled through `decoder_block_i`, and each next token is
    decoded through `decoder_block_cache_i`, all reading the same cross K/V and source mask."""

    block, block_cache = "decoder_block_", "decoder_block_cache_"

    def __init__(self, backend: Backend, shapes: Shapes, decoder_start: int):
        super().__init__(backend, shapes)
        self.decoder_start = decoder_start
        self.cross: dict[str, np.ndarray] = {}
        self.source_mask = np.zeros((1, 1, 1, shapes.seq_length), np.float32)

    def encode(self, source: list[int]) -> None:
        seq, n = self.shapes.seq_length, len(source)
        if not 0 < n <= seq:
            raise GraphoptError(f"the source has {n} tokens but the networks were compiled for --seq-length {seq}: "
                                f"give 1 to {seq} tokens, or compile with a larger --seq-length.")
        ids, valid = np.zeros((1, seq), np.int64), np.zeros((1, seq), np.int64)
        ids[0, :n], valid[0, :n] = source, 1
        states = self.backend.run("encoder", {"input_ids": ids, "attention_mask": valid})["encoder_hidden_states"]
        self.cross = self.backend.run("cross_kv", {"encoder_hidden_states": states})
        self.source_mask[...] = 0.0
        self.source_mask[..., n:] = MASK_VALUE

    def room(self, source: list[int]) -> int:
        """A translation's target has its own SEQ positions, the first taken by the decoder start token."""
        return self.shapes.seq_length - 1

    def _embed(self, network: str, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.backend.run(network, {"input_ids": ids, "position_ids": positions})["input_embed"]

    def _layer_inputs(self, layer: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        steps = positions.shape[1]  # the source mask, one row per decoder position
        return {"encoder_attention_mask": np.repeat(self.source_mask, steps, axis=2),
                "cross_k": self.cross[f"cross_k_{layer}"], "cross_v": self.cross[f"cross_v_{layer}"]}

    def translate(self, source: list[int], max_new_tokens: int, stop_tokens: frozenset[int] = frozenset()) -> Generation:
        """Greedy target tokens for `source` (the decoder start token is not among them)."""
        self.encode(source)
        result = self.generate([self.decoder_start], max_new_tokens, stop_tokens)
        result.prompt = list(source)
        return result


def runtime_for(backend: Backend, manifest: dict) -> ChipStyleRuntime:
    """The runtime that drives this manifest's networks: decoder-only or encoder-decoder."""
    shapes = Shapes.from_manifest(manifest)
    config = manifest["model"]["config"]
    if config.get("is_encoder_decoder"):
        return Seq2SeqRuntime(backend, shapes, int(config["decoder_start_token_id"]))
    return ChipStyleRuntime(backend, shapes)


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
