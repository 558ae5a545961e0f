"""The network contract: which networks a compiled model is split into, what each one's inputs and
outputs are called, and what a runtime writes into them. This module is its one home.

Everything else reads it: `graphopt/networks/` traces each network with these input and output
names; the passes find the inputs they rewrite by them; `graphopt/checks.py` builds check inputs
by them; `graphopt/runtime.py` drives the networks by them; targets compile and inspect by them.
It imports numpy only, so a runtime can read it without torch.

A `Contract` is data: the networks (a name, per layer or not, a kind, input and output names), the
nets that are another network compiled at one token (`embedding_cache`), where the final norm is
computed, and the runtime's mask rule. Three values: LLM_TPU (today's LLM-TPU demos and TPU-MLIR's
llm_convert), LLAMA3_1_DEMO (LLM-TPU's legacy Llama3_1 demo) and ENCODER_DECODER (graphopt's own).
LLM_TPU takes options (`llm_tpu_with`: --dynamic, --history-kv, --do-sample), which bake the prefill
blocks' mask into the compiled nets (`NetworkSpec.baked`), add block_kv_i, or add the sampling heads.

Masks are additive, MASK_VALUE (−10000) where a query may not look. A chip runtime writes them as
16-bit bit patterns; `Contract.mask_bits` says which, by the nets' mask dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

# ---- network kinds: what a network computes, whatever a contract calls it -----------------------
EMBEDDING = "embedding"
BLOCK = "block"  # a decoder layer over SEQ rows (prefill)
BLOCK_CACHE = "block_cache"  # the same layer for one new row, with the K/V cache as inputs (decode)
BLOCK_KV = "block_kv"  # the same layer for a chunk of new rows that also attend to the cache (history-KV prefill)
LM_HEAD = "lm_head"
GREEDY_HEAD = "greedy_head"
SAMPLE_HEAD = "sample_head"  # today's demos' sampler (--do-sample): candidates and their probabilities
PENALTY_SAMPLE_HEAD = "penalty_sample_head"  # the Llama3_1 demo's (no top_k input)
ENCODER = "encoder"
CROSS_KV = "cross_kv"  # every decoder layer's cross-attention K/V, once per source
DECODER_BLOCK = "decoder_block"  # an encoder-decoder model's decoder layer (self- and cross-attention)
DECODER_BLOCK_CACHE = "decoder_block_cache"

PREFILL_BLOCKS = frozenset({BLOCK, DECODER_BLOCK})
DECODE_BLOCKS = frozenset({BLOCK_CACHE, DECODER_BLOCK_CACHE})
HISTORY_BLOCKS = DECODE_BLOCKS | {BLOCK_KV}  # networks whose attention reads the cache as inputs (concat-cache)
BLOCKS = PREFILL_BLOCKS | HISTORY_BLOCKS
ALL_KINDS = BLOCKS | frozenset({EMBEDDING, LM_HEAD, GREEDY_HEAD, SAMPLE_HEAD, PENALTY_SAMPLE_HEAD, ENCODER, CROSS_KV})
DECODE_OF = {BLOCK: BLOCK_CACHE, DECODER_BLOCK: DECODER_BLOCK_CACHE}  # a prefill block's decode twin

# ---- tensor names ------------------------------------------------------------------------------
INPUT_IDS = "input_ids"  # token ids [1,T] (int)
POSITION_IDS = "position_ids"  # [1,T] (int)
INPUT_EMBED = "input_embed"  # the embedding's output [1,T,H]
INPUT_STATES = "input_states"  # a block's input hidden states [1,T,H]
ATTENTION_MASK = "attention_mask"  # a block's additive mask [1,1,T,keys]
SOURCE_VALID = "attention_mask"  # the encoder's [1,SRC] 1 = token / 0 = padding (transformers' name)
ENCODER_ATTENTION_MASK = "encoder_attention_mask"  # cross-attention's additive source mask [1,1,T,SRC]
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
CROSS_K, CROSS_V = "cross_k", "cross_v"  # a decoder block's cross-attention K/V [1,SRC,heads,D]
HISTORY_K, HISTORY_V = "history_k", "history_v"  # a decode block's cache [1,SEQ,KV,D]
HIDDEN_STATES = "hidden_states"  # a block's output; lm_head's input [1,H]
PAST_K, PAST_V = "past_k", "past_v"  # a block's new K/V [1,T,KV,D]
M_LOGITS = "m_logits"
TOKEN = "token"
PROBS = "probs"
TOP_P, TEMPERATURE, PENALTY, TOP_K = "top_p", "temperature", "penalty", "top_k"
SAMPLE_CANDIDATES = 50  # a sample head's TopK: the most tokens a runtime's top_k can draw from (llm_convert's max_top_k)
KV_OUTPUTS = (PAST_K, PAST_V)
HISTORY_INPUTS = (HISTORY_K, HISTORY_V)
# What the passes add to a traced network to make it the contract's (kv-layout, concat-cache,
# cross-kv-inputs): a wrapper's forward takes and returns the rest.
ADDED_BY_PASSES = frozenset({*KV_OUTPUTS, *HISTORY_INPUTS, CROSS_K, CROSS_V})

# ---- masks -------------------------------------------------------------------------------------
MASK_VALUE = -10000.0  # fp16 bits 0xF0E2


def causal_mask(steps: int, keys: int, length: int) -> np.ndarray:
    """The runtime's prefill mask [1,1,steps,keys]: query i (a prompt position < length) sees keys j <= i;
    rows from `length` on (the padding) are masked everywhere."""
    mask = np.full((1, 1, steps, keys), MASK_VALUE, np.float32)
    for i in range(min(steps, length)):
        mask[0, 0, i, : i + 1] = 0.0
    return mask


def chunk_mask(steps: int, history_rows: int, length: int, history: int) -> np.ndarray:
    """A history-KV chunk's mask [1,1,steps,history_rows+steps]: query i (< length) sees the first `history`
    cache rows and the chunk's keys j <= i; the rest of the cache and the padding rows are masked."""
    mask = np.full((1, 1, steps, history_rows + steps), MASK_VALUE, np.float32)
    mask[0, 0, :length, :history] = 0.0
    mask[..., history_rows:] = causal_mask(steps, steps, length)
    return mask


def baked_mask(steps: int, history_rows: int = 0) -> np.ndarray:
    """The mask a dynamic net computes itself at its largest shape: the whole cache and a causal chunk
    (TPU-MLIR's FAttention with its small mask: query i sees key j <= i + history_rows)."""
    return chunk_mask(steps, history_rows, steps, history_rows)


def launch_mask(shape, rows: int, history: int) -> np.ndarray:
    """What a dynamic net's baked mask (of the ONNX network's `shape` [1,1,steps,history_rows+steps]) means
    when it is launched at `rows` rows after `history` cache rows, written out at the full shape."""
    steps, keys = shape[2], shape[3]
    return chunk_mask(steps, keys - steps, rows, history)


def launch_dims(device_inputs, rows: int, history: int = 0) -> tuple[tuple[int, int, int], ...]:
    """A dynamic net's lengths for one launch, (input index, axis, length), as LLM-TPU's demos set them
    (`net_launch_dyn`, `net_launch_kv_dyn`): `rows` new rows of the hidden states and positions and, where
    the net reads the cache, `history` rows of it."""
    dims = [(device_inputs.index(name), 1, rows) for name in (INPUT_STATES, POSITION_IDS)]
    if history:
        dims += [(device_inputs.index(name), 1, history) for name in HISTORY_INPUTS]
    return tuple(dims)


def decode_mask(seq_length: int, row: int) -> np.ndarray:
    """The runtime's decode mask [1,1,1,SEQ+1] for a new token at `row`: history rows < row
    are valid, rows from `row` on are not written yet, and the last column is the token itself."""
    mask = np.zeros((1, 1, 1, seq_length + 1), np.float32)
    mask[..., row:seq_length] = MASK_VALUE
    return mask


def source_mask(seq_length: int, length: int, steps: int = 1) -> np.ndarray:
    """An encoder-decoder model's cross-attention mask [1,1,steps,SRC]: source padding from `length` on."""
    mask = np.zeros((1, 1, steps, seq_length), np.float32)
    mask[..., length:] = MASK_VALUE
    return mask


# ---- contracts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkSpec:
    """One network of a contract. `name` holds `{layer}` for a network per decoder layer; an output
    name may too (cross_kv's `cross_k_{layer}`: one per layer). `one_token_of` names the network whose
    file this one is, compiled for one token (`one_token_shape`: the sequence axis at 1)."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    one_token_of: str | None = None
    # Inputs a dynamic net computes on the device itself (its causal mask, `baked_mask`): the ONNX network
    # takes them, the compiled net does not, and the runtime writes nothing into them.
    baked: tuple[str, ...] = ()
    # Inputs whose length (axis 1) the runtime sets at each launch of an otherwise fixed net, up to the length
    # it was compiled for (sample_head's input_ids: the tokens it penalises): dynamic in the ONNX network too.
    launch_length: tuple[str, ...] = ()

    @property
    def dynamic(self) -> bool:
        """Compiled length-free: the runtime sets lengths per launch (net_launch_dyn)."""
        return bool(self.baked or self.launch_length)

    @property
    def device_inputs(self) -> tuple[str, ...]:
        """The inputs of the compiled net, in order: what a runtime's input indices count."""
        return tuple(n for n in self.inputs if n not in self.baked)

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.name

    def network(self, layer: int | None = None) -> str:
        return self.name.format(layer=layer) if self.per_layer else self.name

    def output_names(self, layers: int) -> list[str]:
        """The outputs, those per layer spelled out for `layers` layers."""
        return [o.format(layer=i) for o in self.outputs for i in (range(layers) if "{layer}" in o else [None])]

    def input_index(self, name: str) -> int:
        return self.inputs.index(name)

    @property
    def traced_inputs(self) -> list[str]:
        """The inputs of the network as traced, before the passes add theirs."""
        return [n for n in self.inputs if n not in ADDED_BY_PASSES]

    def traced_outputs(self, layers: int) -> list[str]:
        return [n for n in self.output_names(layers) if n not in ADDED_BY_PASSES]


@dataclass(frozen=True)
class Contract:
    """A runtime's networks. `key`: its `--contract` name. `mask_bits`: the 16-bit pattern the runtime
    writes for "masked", by the nets' mask dtype (LLM-TPU's Llama3_1 demo writes fp16 −10000 whatever
    the dtype). `final_norm_in_last_block`: the model's final norm ends the last decoder layer's
    networks instead of starting lm_head."""

    key: str
    name: str
    networks: tuple[NetworkSpec, ...]
    mask_bits: dict[str, int] = field(default_factory=dict)
    final_norm_in_last_block: bool = False
    options: frozenset[str] = frozenset()  # of CONTRACT_OPTIONS, which change its networks (llm_tpu_with)

    def spec(self, kind_or_name: str) -> NetworkSpec:
        """A network's spec by kind (the first of that kind that is not a one-token alias) or by name."""
        for spec in self.networks:
            if spec.kind == kind_or_name and spec.one_token_of is None:
                return spec
        for spec in self.networks:
            if spec.name == kind_or_name or re.fullmatch(spec.name.replace("{layer}", r"\d+"), kind_or_name):
                return spec
        raise KeyError(f"contract {self.name} has no network '{kind_or_name}'")

    def network(self, kind: str, layer: int | None = None) -> str:
        """The name of the network of `kind` (for `layer`)."""
        return self.spec(kind).network(layer)

    def one_token(self, kind: str) -> str:
        """The name of the network that is the `kind` network's file compiled for one token (embedding_cache)."""
        source = self.network(kind)
        return next(s.name for s in self.networks if s.one_token_of == source)

    @property
    def prefill_block(self) -> NetworkSpec:
        return next(s for s in self.networks if s.kind in PREFILL_BLOCKS)

    def aliases(self) -> dict[str, str]:
        """{network compiled for one token: the network whose file it is}."""
        return {s.name: s.one_token_of for s in self.networks if s.one_token_of}

    def has(self, kind: str) -> bool:
        return any(s.kind == kind for s in self.networks)

    @property
    def describe(self) -> str:
        return self.key + "".join(f" --{o}" for o in sorted(self.options))

    @property
    def head_outputs_token(self) -> bool:
        """lm_head ends in TopK(1) and answers the token id itself (no greedy_head)."""
        return self.spec(LM_HEAD).outputs == (TOKEN,)

    def layers(self, networks) -> list[int]:
        """The layer numbers of the per-layer prefill blocks among `networks` (names)."""
        return sorted(l for n in networks if (l := layer_of(self.prefill_block, n)) is not None)


def layer_of(spec: NetworkSpec, network: str) -> int | None:
    """The layer `network` is of spec's per-layer networks, or None when it is not one of them."""
    match = re.fullmatch(spec.name.replace("{layer}", r"(\d+)"), network)
    return int(match.group(1)) if match else None


FP16_MASK_BITS = int(np.float16(MASK_VALUE).view(np.uint16))  # 0xF0E2
BF16_MASK_BITS = 0xC61C  # bf16 −9984: −10000 is not a bf16 value; the nearest LLM-TPU picked

# TopK(1) over lm_head's logits: every contract whose lm_head answers logits has it.
GREEDY_HEAD_SPEC = NetworkSpec("greedy_head", GREEDY_HEAD, (M_LOGITS,), (TOKEN,))

# The embedding and the blocks: the same in LLM-TPU's legacy demo and today's.
LLM_TPU_BLOCKS = (
    NetworkSpec("embedding", EMBEDDING, (INPUT_IDS,), (INPUT_EMBED,)),
    NetworkSpec("embedding_cache", EMBEDDING, (INPUT_IDS,), (INPUT_EMBED,), one_token_of="embedding"),
    NetworkSpec("block_{layer}", BLOCK, (INPUT_STATES, POSITION_IDS, ATTENTION_MASK), (HIDDEN_STATES, PAST_K, PAST_V)),
    NetworkSpec("block_cache_{layer}", BLOCK_CACHE, (INPUT_STATES, POSITION_IDS, ATTENTION_MASK, HISTORY_K, HISTORY_V),
                (HIDDEN_STATES, PAST_K, PAST_V)),
)

# Today's LLM-TPU demos (models/Qwen3/python_demo/chat.cpp at d581e7b) and what TPU-MLIR's llm_convert
# writes (python/llm/LlmConverter.py): the final norm in the last block, lm_head answering the token
# (TopK 1), the mask bits of the nets' own dtype (the demo reads embedding_cache's output dtype).
LLM_TPU = Contract(
    "llm-tpu", "LLM-TPU chat demos (Qwen3 python_demo) / TPU-MLIR llm_convert",
    networks=(*LLM_TPU_BLOCKS, NetworkSpec("lm_head", LM_HEAD, (HIDDEN_STATES,), (TOKEN,))),
    mask_bits={"float16": FP16_MASK_BITS, "bfloat16": BF16_MASK_BITS},
    final_norm_in_last_block=True,
)

# What llm_convert's --dynamic and --use_history_kv change in the LLM_TPU networks, graphopt's
# --dynamic and --history-kv. Dynamic: block_i runs at the prompt's rows (the demo's net_launch_dyn)
# and computes its causal mask itself. History-KV (forces dynamic): block_kv_i, a chunk of new rows
# against the first rows of the cache (net_launch_kv_dyn sets both lengths), so a chat's later turn
# costs its own tokens; the Qwen3 demos' forward_first_with_kv drives it.
#
# Do-sample (llm_convert's --do_sample): lm_head answers the logits, and two heads read them, as the demos
# look them up by name: greedy_head (TopK 1) and sample_head, whose input_ids are the tokens the repetition
# penalty applies to (the demo sets their length per launch) and whose outputs are the SAMPLE_CANDIDATES most
# likely tokens after penalty, temperature, top_k and top_p, with their probabilities; the demo draws one.
DYNAMIC, HISTORY_KV, DO_SAMPLE = "dynamic", "history-kv", "do-sample"
CONTRACT_OPTIONS = (DYNAMIC, HISTORY_KV, DO_SAMPLE)
BLOCK_KV_SPEC = NetworkSpec("block_kv_{layer}", BLOCK_KV, (INPUT_STATES, POSITION_IDS, ATTENTION_MASK, HISTORY_K, HISTORY_V),
                            (HIDDEN_STATES, PAST_K, PAST_V), baked=(ATTENTION_MASK,))
SAMPLE_HEAD_SPEC = NetworkSpec("sample_head", SAMPLE_HEAD, (M_LOGITS, INPUT_IDS, PENALTY, TEMPERATURE, TOP_K, TOP_P),
                               (PROBS, TOKEN), launch_length=(INPUT_IDS,))
SAMPLING_HEADS = (GREEDY_HEAD_SPEC, SAMPLE_HEAD_SPEC)
LLM_TPU_OPTIONAL_HEADS = tuple(s.name for s in SAMPLING_HEADS)  # the demos count them out of the layers


def llm_tpu_with(options) -> Contract:
    """LLM_TPU with `options` (of CONTRACT_OPTIONS); history-KV makes the blocks dynamic too."""
    options = frozenset(options)
    if unknown := options - set(CONTRACT_OPTIONS):
        raise ValueError(f"unknown contract options {sorted(unknown)}")
    if not options:
        return LLM_TPU
    if HISTORY_KV in options:
        options |= {DYNAMIC}
    networks = []
    for spec in LLM_TPU.networks:
        if spec.kind == BLOCK and DYNAMIC in options:
            spec = replace(spec, baked=(ATTENTION_MASK,))
        if spec.kind == LM_HEAD and DO_SAMPLE in options:
            spec = replace(spec, outputs=(M_LOGITS,))
        networks.append(spec)
        if spec.kind == BLOCK_CACHE and HISTORY_KV in options:
            networks.append(BLOCK_KV_SPEC)
    if DO_SAMPLE in options:
        networks += SAMPLING_HEADS
    return replace(LLM_TPU, networks=tuple(networks), options=options)

# LLM-TPU's models/Llama3_1 chat demo (python_demo/chat.cpp at ea05961), deleted from LLM-TPU in May 2025.
LLAMA3_1_DEMO = Contract(
    "llama3_1", "LLM-TPU Llama3_1 chat demo (legacy)",
    networks=(
        *LLM_TPU_BLOCKS,
        NetworkSpec("lm_head", LM_HEAD, (HIDDEN_STATES,), (M_LOGITS,)),
        GREEDY_HEAD_SPEC,
        NetworkSpec("penalty_sample_head", PENALTY_SAMPLE_HEAD, (M_LOGITS, INPUT_IDS, TOP_P, TEMPERATURE, PENALTY),
                    (PROBS, TOKEN)),
    ),
    mask_bits={"float16": FP16_MASK_BITS, "bfloat16": FP16_MASK_BITS},
)

# graphopt's own encoder-decoder networks (docs/encoder-decoder-networks.md); masks as values of the nets' dtype.
ENCODER_DECODER = Contract(
    "encoder-decoder", "encoder-decoder networks, docs/encoder-decoder-networks.md",
    networks=(
        NetworkSpec("encoder", ENCODER, (INPUT_IDS, SOURCE_VALID), (ENCODER_HIDDEN_STATES,)),
        NetworkSpec("cross_kv", CROSS_KV, (ENCODER_HIDDEN_STATES,), ("cross_k_{layer}", "cross_v_{layer}")),
        NetworkSpec("embedding", EMBEDDING, (INPUT_IDS, POSITION_IDS), (INPUT_EMBED,)),
        NetworkSpec("embedding_cache", EMBEDDING, (INPUT_IDS, POSITION_IDS), (INPUT_EMBED,), one_token_of="embedding"),
        NetworkSpec("decoder_block_{layer}", DECODER_BLOCK,
                    (INPUT_STATES, ATTENTION_MASK, ENCODER_ATTENTION_MASK, CROSS_K, CROSS_V), (HIDDEN_STATES, PAST_K, PAST_V)),
        NetworkSpec("decoder_block_cache_{layer}", DECODER_BLOCK_CACHE,
                    (INPUT_STATES, ATTENTION_MASK, ENCODER_ATTENTION_MASK, CROSS_K, CROSS_V, HISTORY_K, HISTORY_V),
                    (HIDDEN_STATES, PAST_K, PAST_V)),
        NetworkSpec("lm_head", LM_HEAD, (HIDDEN_STATES,), (M_LOGITS,)),
        GREEDY_HEAD_SPEC,
    ),
)


CONTRACTS = {k.key: k for k in (LLM_TPU, LLAMA3_1_DEMO, ENCODER_DECODER)}
DECODER_CONTRACTS = (LLM_TPU.key, LLAMA3_1_DEMO.key)  # what `--contract` offers a decoder-only model
DEFAULT_CONTRACT = LLM_TPU.key


def contract_for(is_encoder_decoder: bool, key: str | None = None, options=()) -> Contract:
    """The contract of a model's networks: an encoder-decoder model has one; a decoder-only model the
    `--contract` chosen, with its options (`--dynamic`, `--history-kv`: LLM_TPU's only)."""
    if is_encoder_decoder:
        return ENCODER_DECODER
    key = key or DEFAULT_CONTRACT
    return llm_tpu_with(options) if key == LLM_TPU.key else CONTRACTS[key]


def contract_of_manifest(manifest: dict) -> Contract:
    """The contract an output directory's networks follow (manifests before "contract" was recorded:
    an encoder network makes it the encoder-decoder one, else the Llama3_1 demo's, then the only one)."""
    if "contract" in manifest:
        return contract_for(False, manifest["contract"], manifest.get("contract_options", ())) \
            if manifest["contract"] in DECODER_CONTRACTS else CONTRACTS[manifest["contract"]]
    return contract_for(any(n["name"] == ENCODER_DECODER.network(ENCODER) for n in manifest["networks"]),
                        LLAMA3_1_DEMO.key)


def contract_of_nets(names, block_inputs: int | None = None) -> Contract:
    """The contract a set of compiled net names follows (a bmodel's): an encoder makes it the
    encoder-decoder one, a penalty_sample_head the Llama3_1 demo's, else today's LLM-TPU: with history-KV
    where block_kv_0 is there, dynamic where block_0 takes no mask (`block_inputs`: how many it takes),
    do-sample where sample_head is there."""
    names = set(names)
    if ENCODER_DECODER.network(ENCODER) in names:
        return ENCODER_DECODER
    if LLAMA3_1_DEMO.network(PENALTY_SAMPLE_HEAD) in names or (
            LLAMA3_1_DEMO.network(GREEDY_HEAD) in names and SAMPLE_HEAD_SPEC.name not in names):
        return LLAMA3_1_DEMO
    dynamic = block_inputs is not None and block_inputs < len(LLM_TPU.spec(BLOCK).inputs)
    options = ((HISTORY_KV,) if BLOCK_KV_SPEC.network(0) in names else (DYNAMIC,) if dynamic else ()) + (
        (DO_SAMPLE,) if SAMPLE_HEAD_SPEC.name in names else ())
    return llm_tpu_with(options)


def one_token_shape(shape) -> tuple[int, ...]:
    """A one-token network's tensor: its network's tensor with the sequence axis (axis 1) at one token."""
    return tuple(1 if axis == 1 else d for axis, d in enumerate(shape))
