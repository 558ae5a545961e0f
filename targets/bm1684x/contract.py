"""How each network of the runtime contract (graphopt/contract.py) becomes a net of the BM1684X bmodel.

What each net is compiled from, with which model_deploy mode and flags and which top passes: the
table `deploy.py` compiles from. The nets, their names and I/O are the contract's; this module
adds only what TPU-MLIR needs to know.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphopt import contract as c
from graphopt.errors import GraphoptError
from graphopt.models.quantized import check_groups_in_order, linear_dims
from graphopt.targets.bm1684x.top_passes import TOP_PIPELINE, passes_for

# --quantize of the CLI -> (model_deploy mode of the blocks, half-precision mode of the rest)
QUANT_MODES = {
    "w4bf16": ("W4BF16", "BF16"),
    "w8bf16": ("W8BF16", "BF16"),
    "w4f16": ("W4F16", "F16"),
    "w8f16": ("W8F16", "F16"),
    "bf16": ("BF16", "BF16"),
    "f16": ("F16", "F16"),
}
DEFAULT_GROUP_SIZE = 64  # weights per quantization scale/zero point: what LLM-TPU uses (graphopt run --group-size)
CHIP = "bm1684x"

# The simulator against onnxruntime on the reference of the same precision (the fp32 ONNX for
# float nets, the fake-quantized ONNX for W4/W8, see fake_quant.py): all that compiling and
# 16-bit activations may cost. Measured on tiny-llama: 0.9997 or better in every mode.
MIN_COSINE = 0.999
# Weight-quantized nets against the fp32 ONNX too. W4's loss against fp32 is a property of
# the model's weights (tiny-llama's std-0.2 random weights: 0.920 in onnxruntime alone), so it
# is reported, not held to a bar.
MIN_COSINE_VS_FP32 = {"W8": 0.99}
# A simulated generation may pick the other of two near-tied tokens only where its logits agree
# with the reference's. Measured per step: 0.991 or better in every mode (w8bf16, 384-token prompt,
# SEQ 512: bench/runtime_modes.py); 0.17 for a bmodel fed the wrong rows by an overlapping copy.
MIN_LOGIT_COSINE = 0.98

# model_transform flags for every net. graphopt's ONNX passes have already folded and simplified
# each network; TPU-MLIR would do it all again (ConstantFolding, onnxsim, ConstantFolding), which
# for an 8B block costs 93 s and 11 GB (126.6 s / 15.0 GB -> 33.8 s / 4.3 GB without), and for
# the 2.1 GB 8B lm_head runs past 24 GB (9.0 GB without). The flag is argparse `type=bool`, so
# only an empty string turns it off.
TRANSFORM_FLAGS = ("--do_onnx_sim", "")


@dataclass(frozen=True)
class DeploySpec:
    """One network of the bmodel: its source ONNX network, its shapes and model_deploy flags."""

    name: str  # the net's name in the bmodel
    onnx_network: str  # the manifest network it is compiled from
    input_shapes: tuple[tuple[int, ...], ...]
    quantize: str  # model_deploy --quantize
    flags: tuple[str, ...]  # the rest of model_deploy's flags
    top_passes: tuple[str, ...] = ()  # rewrites of model_transform's MLIR before model_deploy (top_passes/)
    stage: int = 0  # a further stage of net `name` (the same net for other shapes), combined into it
    # A dynamic net's baked inputs, (name, the ONNX network's shape): compiled from the ONNX with their value
    # at that shape as a constant (graphopt.contract.baked_mask), which the top passes make length-free.
    baked: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # Compiled length-free (the top passes' context: a baked mask made the small mask, shapes opened). The build
    # also passes --dynamic; bench/history_kv.py compiles the same net without it, for TPU-MLIR's cycle
    # estimate at its largest shape.
    dynamic: bool = False
    # A pre-quantized checkpoint's codes of the net's Linears (the file beside its ONNX, checkpoint_codes.py),
    # which the keep-checkpoint-codes top pass writes as A16MatMul.
    codes: str | None = None

    @property
    def label(self) -> str:
        """The net, and its stage when it is not the first: for progress lines and results."""
        return f"{self.name} (stage {self.stage}, {self.input_shapes[-1][1]} cache rows)" if self.stage else self.name

    @property
    def precision(self) -> str:
        """W4/W8 for weight-only quantized nets, else the float mode."""
        return self.quantize[:2] if self.quantize[0] == "W" else self.quantize

    @property
    def weight_bits(self) -> int | None:
        return {"W4": 4, "W8": 8}.get(self.precision)

    @property
    def q_group_size(self) -> int | None:
        """model_deploy's --q_group_size, where the net has one."""
        return int(self.flags[self.flags.index("--q_group_size") + 1]) if "--q_group_size" in self.flags else None

    def transform_args(self, onnx_path: str, mlir: str) -> list[str]:
        shapes = "[" + ",".join("[" + ",".join(map(str, s)) + "]" for s in self.input_shapes) + "]"
        return ["--model_name", self.name, "--model_def", onnx_path, "--input_shapes", shapes, *TRANSFORM_FLAGS,
                "--mlir", mlir]

    def deploy_args(self, mlir: str, bmodel: str) -> list[str]:
        return ["--mlir", mlir, "--quantize", self.quantize, *self.flags, "--chip", CHIP, "--model", bmodel]


def block_flags(quantize: str, group_size: int) -> tuple[str, ...]:
    """model_deploy flags of a decoder-only block (the decode form adds `DECODE_FLAGS`)."""
    flags = ("--quant_input", "--quant_output")
    if QUANT_MODES[quantize][0].startswith("W"):
        flags = ("--q_group_size", str(group_size), *flags)
    return flags + ("--high_precision",)


# io_alone: a net's inputs and outputs get device memory of their own, outside the neuron memory
# that all nets share (the runtime loads the bmodel with BM_RUNTIME_SHARE_MEM). The decode blocks:
# the runtime points history_k/v at the cache in place instead of copying it every step.
DECODE_FLAGS = ("--addr_mode", "io_alone")
# The embeddings and lm_head: the runtime copies the embedding's output into block_0's input and the
# last block's row into lm_head's input, and greedy_head reads lm_head's output in place. In shared
# memory TPU-MLIR placed tiny-llama's block_0 input (SEQ 64) inside the embedding's output, and the
# cmodel's forward copy then overwrote rows 32-63 with rows 0-31. Io_alone makes those copies disjoint
# by construction; memory_check.py checks every copy of the runtime on the combined file.
EMBEDDING_FLAGS = ("--quant_input", "--quant_output", *DECODE_FLAGS)
LM_HEAD_FLAGS = ("--quant_input", *DECODE_FLAGS)


# Decode stages (--chunk-length): block_cache_i compiled again for fewer cache rows, as further stages of
# the same net. model_deploy saves the first compile's io_alone addresses and gives every stage the same,
# so each stage's cache input is the cache the runtime keeps (TPU-MLIR's llm_convert does the same).
IO_ALONE_CONFIG = "io_alone_config.json"


# A dynamic net (--dynamic block_i, block_kv_i, sample_head): the runtime sets its lengths per launch (net_launch_dyn).
DYNAMIC_FLAGS = ("--dynamic",)


def decode_stage_rows(seq_length: int, chunk_length: int | None) -> list[int]:
    """The cache rows of each decode stage, as llm_convert makes them: SEQ (stage 0), then every multiple
    of the chunk below SEQ, longest first (the order LLM-TPU's cpp_demo selects a stage in)."""
    if not chunk_length:
        return [seq_length]
    return [seq_length, *sorted(range(chunk_length, seq_length, chunk_length), reverse=True)]


def stage_specs(spec: DeploySpec, inputs: list[str], rows: list[int], io_config: str) -> list[DeploySpec]:
    """The further stages of decode block `spec` (inputs named `inputs`) for the cache rows `rows[1:]`."""
    flags = tuple(f for f in spec.flags if f not in ("--save_io_alone_config", IO_ALONE_CONFIG))
    out = []
    for stage, n in enumerate(rows[1:], start=1):
        shapes = tuple((*s[:-1], n + 1) if name == c.ATTENTION_MASK else (s[0], n, *s[2:]) if name in c.HISTORY_INPUTS
                       else s for name, s in zip(inputs, spec.input_shapes))
        out.append(DeploySpec(spec.name, spec.onnx_network, shapes, spec.quantize,
                              flags + ("--use_io_alone_config", io_config), spec.top_passes, stage, codes=spec.codes))
    return out


def deploy_specs(manifest: dict, quantize: str, group_size: int, top_pipeline: tuple[str, ...] = TOP_PIPELINE,
                 decode_stages: bool = False, lm_head: str = "bf16") -> list[DeploySpec]:
    """The runtime contract's nets (graphopt/contract.py), each with its mode, flags and top passes, in the
    contract's order (a layer's nets together), which is the order LLM-TPU's compile script combines them.
    `decode_stages`: the decode blocks save their io_alone addresses for stages compiled after them."""
    contract = c.contract_of_manifest(manifest)
    weights, half = QUANT_MODES[quantize]
    blocks = block_flags(quantize, group_size)
    if contract is c.ENCODER_DECODER:
        # Without --high_precision: a post-LN block (Marian, BART) ends in a LayerNorm, which it computes in
        # fp32 and leaves as the net's fp32 output (--quant_output strips casts, and there is none), so the
        # next net would be fed fp32. Measured on tiny-marian bf16: the same block cosines either way.
        blocks = blocks[:-1]
    # The encoder and cross_kv hold Linear weights like the blocks and take their mode; their outputs stay
    # in the blocks' 16-bit float, so nothing is converted between the nets. The heads stay fp32.
    head = lm_head_mode(quantize, lm_head)
    head_flags = ("--q_group_size", str(group_size)) if head.startswith("W") else ()
    modes = {c.EMBEDDING: (half, EMBEDDING_FLAGS), c.LM_HEAD: (head, head_flags + LM_HEAD_FLAGS),
             c.BLOCK: (weights, blocks), c.BLOCK_KV: (weights, blocks),
             c.BLOCK_CACHE: (weights, blocks + DECODE_FLAGS + (
                 ("--save_io_alone_config", IO_ALONE_CONFIG) if decode_stages else ())),
             c.DECODER_BLOCK: (weights, blocks), c.DECODER_BLOCK_CACHE: (weights, blocks + DECODE_FLAGS),
             c.ENCODER: (weights, blocks), c.CROSS_KV: (weights, blocks),
             c.GREEDY_HEAD: ("F32", ()),
             # Compiled static, TPU-MLIR 1.30.2 places an intermediate of the sampler (the probability ahead of
             # each candidate) in the memory of its token output, which then holds float bits: the simulator
             # check caught it (token equal 0.0). Compiled --dynamic, at the same shapes, it is right.
             c.PENALTY_SAMPLE_HEAD: ("F32", DYNAMIC_FLAGS),
             # Io_alone as llm_convert compiles it: the demo copies lm_head's logits in and writes its inputs once.
             c.SAMPLE_HEAD: ("F32", DECODE_FLAGS)}
    nets = {n["name"]: n for n in manifest["networks"]}
    layers = contract.layers(nets)

    def spec_of(network: c.NetworkSpec, layer: int | None) -> DeploySpec:
        name = network.network(layer)
        source = nets[network.one_token_of or name]
        shapes = tuple(c.one_token_shape(i["shape"]) if network.one_token_of else tuple(i["shape"])
                       for i in source["inputs"] if i["name"] not in network.baked)
        mode, flags = modes[network.kind]
        baked = tuple((i["name"], tuple(i["shape"])) for i in source["inputs"] if i["name"] in network.baked)
        codes = source.get("codes") if mode.startswith("W") else None  # a float mode computes the dequantized ONNX
        return DeploySpec(name, source["name"], shapes, mode, flags + (DYNAMIC_FLAGS if network.dynamic else ()),
                          passes_for(network.kind, top_pipeline, network.dynamic, codes is not None, mode), baked=baked,
                          dynamic=network.dynamic, codes=codes)

    specs, run = [], []  # run: consecutive per-layer networks, compiled layer by layer
    for network in [*contract.networks, None]:
        if network is not None and network.per_layer:
            run.append(network)
            continue
        specs += [spec_of(n, layer) for layer in layers for n in run]
        run = []
        if network is not None:
            specs.append(spec_of(network, None))
    return specs


def check_chunk_length(chunk_length: int | None, seq_length: int, runtime: str) -> None:
    if chunk_length is None:
        return
    if runtime != c.LLM_TPU.key:
        raise GraphoptError(f"--chunk-length makes decode stages, which only today's LLM-TPU demos select (--contract "
                            f"{c.LLM_TPU.key}); the {c.CONTRACTS[runtime].name}'s runtime runs stage 0 alone. "
                            "Leave --chunk-length out.")
    if not 1 <= chunk_length <= seq_length // 2:
        raise GraphoptError(f"--chunk-length {chunk_length} must be between 1 and half of --seq-length {seq_length} "
                            f"({seq_length // 2}), as llm_convert requires: the decode stages are its multiples below SEQ.")


def check_experts(source) -> None:
    """Mixtures of experts reach the ONNX target, not this one yet: refused before any work."""
    if source.experts > 1:
        raise GraphoptError(
            f"{source.name} is a mixture of experts ({source.experts} experts a layer), which the bm1684x target does "
            "not compile yet. graphopt traces experts as a per-token gather of the chosen experts' weights "
            "(transformers' batched_mm): the ONNX target runs it (--target onnx), but TPU-MLIR's simulator fails on "
            "that form (std::bad_alloc after the router's TopK, tiny Mixtral in bf16). What it takes is a top pass "
            "that writes TPU-MLIR's own expert matmuls from the gather, as llm_convert writes its MoE blocks (the "
            "router's TopK, then matmuls that take the expert ids).")


def check_quantizable(config, quantize: str, group_size: int) -> None:
    """W4 on BM1684X needs every quantized weight's output channels to be a multiple of 64
    (TPU-MLIR reports `invalid scale channel` otherwise), and its input channels to split into groups."""
    if quantize not in QUANT_MODES:
        raise GraphoptError(f"--quantize {quantize} is not a BM1684X mode; choose one of {', '.join(QUANT_MODES)}.")
    if group_size < 1 or group_size & (group_size - 1):
        raise GraphoptError(f"--group-size {group_size} must be a power of two ({DEFAULT_GROUP_SIZE} is what LLM-TPU uses).")
    if not QUANT_MODES[quantize][0].startswith("W"):
        return
    hidden = int(config.hidden_size)
    heads, kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    # Decoder-only configs name the MLP width intermediate_size; encoder-decoder ones have one per stack.
    ffn = {k: int(getattr(config, k)) for k in ("intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim")
           if getattr(config, k, None)}
    channels = {"hidden_size": hidden, **ffn, "q heads x head_dim": heads * head_dim, "kv heads x head_dim": kv * head_dim}
    bad = {k: v for k, v in channels.items() if v % 64}
    if QUANT_MODES[quantize][0].startswith("W4") and bad:
        raise GraphoptError(f"--quantize {quantize} cannot quantize this model on BM1684X: W4 needs every weight's "
                            f"output channels to be a multiple of 64, and {', '.join(f'{k} = {v}' for k, v in bad.items())}"
                            ". Use --quantize w8bf16 or bf16 for it.")
    uneven = {k: v for k, v in channels.items() if k in ("hidden_size", *ffn, "q heads x head_dim")
              and v % group_size}
    if uneven:
        raise GraphoptError(f"--group-size {group_size} does not divide the input channels of every weight "
                            f"({', '.join(f'{k} = {v}' for k, v in uneven.items())}); use a group size that does, "
                            "such as 64.")


# --lm-head: lm_head's weight precision. bf16 is today's llm_convert (the head stays 16-bit); w8 and w4 are
# LLM-TPU's legacy compile script, which quantized lm_head with the blocks (the weight model_deploy rounds by
# --group-size; the half-precision of the activations stays --quantize's).
LM_HEAD_MODES = ("bf16", "w8", "w4")


def lm_head_mode(quantize: str, lm_head: str) -> str:
    """model_deploy --quantize of lm_head: the float mode of `quantize`, or W8/W4 with its half precision."""
    half = QUANT_MODES[quantize][1]
    return half if lm_head == "bf16" else f"{lm_head.upper()}{half}"


def default_quantize(source) -> str:
    """--quantize when it is left out: w4bf16, or for a pre-quantized checkpoint the mode that keeps it whole, its
    bits and the 16-bit float of its scales (llm_convert's choice by the checkpoint's dtype): W4F16 keeps float16
    scales exactly, where W4BF16 would round them to bfloat16."""
    scheme = source.quantization
    if scheme is None:
        return "w4bf16"
    prefixes = source.weights.quantized_prefixes()
    scales = f"{prefixes[0]}.{scheme.scales_suffix}" if prefixes else None
    half = "bf16" if scales is None or source.weights.dtype(scales) == "BF16" else "f16"
    return f"w{scheme.bits}{half}"


def check_checkpoint_codes(source, quantize: str) -> None:
    """A pre-quantized checkpoint's codes fit the mode and the chip: its bits are the mode's, every quantized
    Linear's groups fit its input channels (in order), and W4's output channels are a multiple of 64."""
    scheme = source.quantization
    if scheme is None:
        return
    weights_mode = QUANT_MODES[quantize][0]
    keep = f"w{scheme.bits}{QUANT_MODES[quantize][1].lower()}"
    if weights_mode.startswith("W") and int(weights_mode[1]) != scheme.bits:
        raise GraphoptError(
            f"--quantize {quantize} quantizes weights to {weights_mode[1]} bits, but {source.name} is a pre-quantized "
            f"checkpoint ({scheme.describe()}), whose codes graphopt keeps as they are. Give --quantize {keep}, or "
            "leave --quantize out: it then follows the checkpoint.")
    prefixes = source.weights.quantized_prefixes()
    if not prefixes:
        raise GraphoptError(
            f"{source.name}'s config.json declares {scheme.describe()} weights, but its safetensors hold no "
            f"'<module>.{scheme.suffix}' tensor. The config and the weights do not belong together: give the "
            "directory that holds the quantized checkpoint's own files.")
    for prefix in prefixes:
        n, k, _ = linear_dims(scheme, prefix, source.weights.shape)
        if scheme.bits == 4 and n % 64:
            raise GraphoptError(
                f"{prefix} has {n} output channels; BM1684X computes 4-bit codes on output channels in multiples of 64 "
                "(TPU-MLIR reports `invalid scale channel` otherwise, tpu-mlir issues 269 and 275), so this checkpoint's "
                "codes cannot be kept. Use an 8-bit checkpoint or the unquantized model for it.")
        for name in (f"{prefix}.g_idx", f"{prefix}.weight_g_idx"):
            if name in source.weights.files:
                check_groups_in_order(source.weights.read(name), k, scheme.group_size or k, name)


def bmodel_name(model: str, quantize: str, seq_length: int) -> str:
    return f"{model}_{quantize}_seq{seq_length}_{CHIP}_1dev.bmodel"
