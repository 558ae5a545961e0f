"""A model source: a config, a weightless skeleton of the model, and a weight provider.

The skeleton's parameters are built on the meta device, so building it costs nothing whatever the
model size; its buffers are built on the CPU by the modules' own constructors (`weightless`, the
technique of accelerate's `init_empty_weights(include_buffers=False)`), so those a checkpoint does
not store (a scaled embedding's factor, a custom rotary's frequencies) hold what `__init__` computes.
A network's modules are given real weights only while that network is traced (`materialized`),
then returned to meta: peak memory is one network, not the model.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

import torch
import torch.nn as nn

from graphopt.errors import GraphoptError
from graphopt.models.custom import CustomConfig, CustomDecoder, load_adapter, resolve
from graphopt.models.decoder import DecoderParts, decoder_parts, sliding_window
from graphopt.models.seq2seq import Seq2SeqParts, seq2seq_parts
from graphopt.models.quantized import QuantizedLinear, QuantScheme, scheme_of
from graphopt.models.registry import REGISTRY
from graphopt.models.weights import RandomWeights, SafetensorsWeights, WeightProvider

# Config attributes that count a mixture of experts' experts (Mixtral; Qwen2/3-MoE; DeepSeek).
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
# graphopt never downloads: a model is a registry name or a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RANDOM_SEED = 0
# Models up to this many parameters are also run whole: against transformers end to end after the
# export, and net by net in a target's simulator (an 8B prefill block took over 20 minutes there).
SMALL_MODEL_PARAMS = 200_000_000


@dataclass
class ModelSource:
    name: str
    config: object  # a transformers PretrainedConfig
    weights: WeightProvider
    origin: str
    adapter_file: str | None = None  # a user's own model: the file that declares its CustomDecoder
    _live: tuple = field(default=((), ()), repr=False, compare=False)  # (ids, modules) filled now

    # ---- structure ----------------------------------------------------------------------
    @cached_property
    def skeleton(self) -> nn.Module:
        """The whole model with parameters on the meta device (no memory), buffers as its constructor made them."""
        with weightless():
            model = self.adapter.build() if self.adapter else _model_from_config(self.config, traceable=True)
        if isinstance(self.weights, SafetensorsWeights) and not self.adapter:
            renamings, converters = _checkpoint_conversions(model)
            self.weights.rename(renamings)
            self.weights.convert(converters)
        return model.float().eval()

    @cached_property
    def _constructed_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers checkpoints do not store (non-persistent), by full name, as the constructor computed them."""
        found = {}
        for module_name, module in self.skeleton.named_modules(remove_duplicate=False):
            for name in module._non_persistent_buffers_set:
                buffer = getattr(module, name)
                full = f"{module_name}.{name}" if module_name else name
                if buffer is not None and buffer.is_meta:
                    raise GraphoptError(
                        f"{full} ({type(module).__name__}) is a buffer checkpoints do not store, and its module's "
                        "constructor computed it from parameters, which are weightless while graphopt builds the "
                        "model, so graphopt cannot rebuild it. Compute it in __init__ from the config (as "
                        "transformers' rotary embeddings do), or register it as a persistent buffer so that "
                        "checkpoints hold it.")
                if buffer is not None:
                    found[full] = buffer.detach().clone()
        return found

    @cached_property
    def adapter(self) -> CustomDecoder | None:
        """A user's model: where its networks' modules are (None for a transformers model)."""
        return load_adapter(Path(self.adapter_file)) if self.adapter_file else None

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.config, "is_encoder_decoder", False))

    @cached_property
    def parts(self) -> DecoderParts:
        if self.adapter:
            a, model = self.adapter, self.skeleton
            return DecoderParts(resolve(model, a.embed, "embed"), resolve(model, a.layers, "layers"),
                                resolve(model, a.norm, "norm"), resolve(model, a.head, "head"), rotary=None,
                                call_block=a.call_block)
        return decoder_parts(self.skeleton)

    @cached_property
    def seq2seq_parts(self) -> Seq2SeqParts:
        return seq2seq_parts(self.skeleton)

    def check_structure(self) -> None:
        """Raise GraphoptError now if the adapter does not recognise the model (before any work)."""
        _ = self.seq2seq_parts if self.is_encoder_decoder else self.parts

    def load_tensor(self, name: str) -> torch.Tensor | None:
        """One named parameter or buffer with its real values (None if the model has none of that name),
        for tensors that live outside the modules a network wraps (a seq2seq model's final_logits_bias)."""
        meta = dict([*self.skeleton.named_parameters(), *self.skeleton.named_buffers()]).get(name)
        if meta is None:
            return None
        tensor = torch.empty(meta.shape, dtype=meta.dtype)
        self.weights.fill(self._tensor_names[name], tensor)
        return tensor

    @cached_property
    def rotary(self) -> nn.Module:
        """The rotary embedding with real buffers: it has no weights, only tables from config."""
        return type(self.parts.rotary)(config=self.config).float().eval()

    @cached_property
    def _tensor_names(self) -> dict[str, list[str]]:
        """Each parameter/buffer name -> every name of the same tensor (tied weights share)."""
        groups: dict[int, list[str]] = {}
        for name, tensor in [*self.skeleton.named_parameters(remove_duplicate=False),
                             *self.skeleton.named_buffers(remove_duplicate=False)]:
            groups.setdefault(id(tensor), []).append(name)
        return {name: names for names in groups.values() for name in names}

    @cached_property
    def _module_names(self) -> dict[int, str]:
        return {id(m): name for name, m in self.skeleton.named_modules(remove_duplicate=False)}

    # ---- weights ------------------------------------------------------------------------
    @contextmanager
    def materialized(self, *modules: nn.Module):
        """Give `modules` (parts of the skeleton) real weights for the duration of the block.

        They stay filled after it until other modules are asked for (or `release()`): block_i and
        block_cache_i are the same layer, so the second trace reuses the weights the first read
        (8B: 1.4 s of random draws, or a block's reads from disk, per layer)."""
        key = tuple(id(m) for m in modules)
        if key != self._live[0]:
            self.release()
            try:
                for module in modules:
                    self._fill(module)
            except BaseException:
                for module in modules:
                    module.to_empty(device="meta")
                raise
            self._live = (key, modules)
        yield

    def release(self) -> None:
        """Return the filled modules to the meta device (no memory), and let go of the checkpoint's files."""
        for module in self._live[1]:
            module.to_empty(device="meta")
        self._live = ((), ())
        self.weights.close()

    def _fill(self, module: nn.Module) -> None:
        prefix = self._module_names[id(module)]
        prefix = f"{prefix}." if prefix else ""
        names = self._tensor_names  # before to_empty, which unties tied weights (embedding = lm_head)
        constructed = self._constructed_buffers
        module.to_empty(device="cpu")
        computed = set()
        with torch.no_grad():
            for name, tensor in [*module.named_parameters(remove_duplicate=False),
                                 *module.named_buffers(remove_duplicate=False)]:
                full = prefix + name
                if full in constructed:
                    tensor.copy_(constructed[full])
                    continue
                if self._is_computed(full):
                    computed.add(name.rpartition(".")[0])
                    continue
                self.weights.fill(names[full], tensor.detach())
            for owner in sorted(computed):  # the model's own init computes them from the config
                self.skeleton._init_weights(module.get_submodule(owner))

    @property
    def quantization(self) -> QuantScheme | None:
        """The checkpoint's quantization (None: its weights are floats)."""
        return getattr(self.weights, "quantization", None)

    def quantized_linears(self, modules) -> dict[str, QuantizedLinear]:
        """The checkpoint's codes of every quantized Linear weight in `modules`, by the weight's full name."""
        if self.quantization is None:
            return {}
        found = {}
        for module in modules:
            prefix = self._module_names[id(module)]
            for name, _ in module.named_parameters(remove_duplicate=False):
                full = f"{prefix}.{name}" if prefix else name
                if (linear := self.weights.quantized_linear(self._tensor_names[full])) is not None:
                    found[full] = linear
        return found

    def _is_computed(self, name: str) -> bool:
        """A tensor the model computes from its config instead of storing it: transformers leaves it
        out of checkpoints (`_keys_to_ignore_on_save`; Marian's sinusoidal position tables)."""
        patterns = getattr(self.skeleton, "_keys_to_ignore_on_save", None) or ()
        return any(re.search(pattern, name) for pattern in patterns)

    def greedy(self, prompt: list[int], new_tokens: int) -> dict:
        """The reference's greedy tokens and per-step logits: transformers' generate, or a user model's forward."""
        from graphopt.models.reference import custom_greedy, hf_greedy

        if self.adapter:
            return custom_greedy(self.reference_model(), self.adapter, prompt, new_tokens)
        return hf_greedy(self.reference_model(), prompt, new_tokens)

    def reference_model(self) -> nn.Module:
        """The whole model with these weights, on CPU in fp32 (tiny models, tests, checks)."""
        model = (self.adapter.build() if self.adapter else _model_from_config(self.config)).float().eval()
        stored = set(model.state_dict())  # parameters and persistent buffers (final_logits_bias)
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(remove_duplicate=False),
                                 *model.named_buffers(remove_duplicate=False)]:
                if name in stored and not self._is_computed(name):  # (computed ones keep the model's init)
                    self.weights.fill(self._tensor_names[name], tensor.detach())
        return model

    def __getstate__(self) -> dict:
        """Only the fields travel to worker processes: they rebuild the skeleton (meta device, free)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_live"}

    # ---- description --------------------------------------------------------------------
    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def experts(self) -> int:
        """How many experts each mixture-of-experts layer has (0: a dense model), from the config."""
        return max((int(getattr(self.config, name, 0) or 0) for name in EXPERT_COUNTS), default=0)

    @cached_property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.skeleton.parameters())

    @property
    def is_small(self) -> bool:
        """Small enough to be run whole as a reference, and simulated net by net (SMALL_MODEL_PARAMS)."""
        return self.parameter_count <= SMALL_MODEL_PARAMS

    def check_seq_length(self, seq_length: int) -> None:
        """--seq-length must fit the model's positions, and its attention window if it has one."""
        if not 2 <= seq_length <= self.max_positions:
            raise GraphoptError(f"--seq-length {seq_length} is outside what {self.name} supports: give a value from 2 "
                                f"to its max_position_embeddings, {self.max_positions}.")
        # The runtime's fixed causal mask lets a token see every earlier one. A model attending within
        # a window behaves the same only while the whole sequence fits in the window.
        window = sliding_window(self.config)
        if window is not None and seq_length > window:
            raise GraphoptError(f"{self.name} attends within a sliding window of {window} tokens (config "
                                f"sliding_window), but the runtime's fixed causal mask lets each token see all "
                                f"{seq_length} positions, so networks for --seq-length {seq_length} would compute "
                                f"something else than the model. Give --seq-length {window} or less.")

    def describe(self) -> dict:
        return {"name": self.name, "origin": self.origin, "weights": self.weights.describe(),
                "model_type": self.config.model_type, "config": self.config.to_diff_dict()}


@contextmanager
def weightless():
    """Build modules with their parameters on the meta device and their buffers as the constructors compute
    them, on the CPU: each parameter moves to meta as it is registered (before any init runs on it, so
    init costs nothing). Written here rather than taken from accelerate's init_empty_weights, which moves
    a parameter again when a tie assigns it to a second module, making a copy: the tie comes apart."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), **{"requires_grad": param.requires_grad, **param.__dict__})
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _checkpoint_conversions(model: nn.Module) -> tuple[list[tuple[str, str]], list]:
    """What transformers does to a checkpoint's tensors when it loads this model (transformers 5's
    conversion_mapping; nothing before it): its renamings, as (regex, replacement), and its converters
    (several stored tensors made one: a mixture of experts' weights)."""
    try:
        from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_model_conversion_mapping
    except ImportError:
        return [], []
    renamings, converters = [], []
    for rule in get_model_conversion_mapping(model):
        if isinstance(rule, WeightRenaming):
            targets = rule.target_patterns
            renamings += [(source, targets[0] if len(targets) == 1 else target)
                          for source, target in zip(rule.source_patterns, targets * len(rule.source_patterns))]
        elif isinstance(rule, WeightConverter):
            converters.append(rule)
    return renamings, converters


def _model_from_config(config, traceable: bool = False) -> nn.Module:
    """The transformers model of `config`, with SDPA attention; `traceable`: as the networks are traced (a
    mixture of experts in a form torch.export follows), not as the reference runs (transformers' default)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    # A mixture of experts computes the chosen experts by gathering their weights per token (transformers'
    # batched_mm), not by a loop over the experts the tokens chose, whose length depends on the data.
    experts = {"experts_implementation": "batched_mm"} if traceable and hasattr(config, "_experts_implementation") else {}
    try:
        try:
            return auto.from_config(config, attn_implementation="sdpa", **experts)
        except ValueError as error:
            if "scaled_dot_product_attention" not in str(error):
                raise
            # transformers has no SDPA for this architecture: its attention as eager code writes it out, which
            # the attention-explicit pass reads.
            return auto.from_config(config, attn_implementation="eager", **experts)
    except ValueError as error:
        raise GraphoptError(
            f"graphopt cannot build a model from this config (model_type '{config.model_type}'): "
            f"{str(error).splitlines()[0]} graphopt compiles decoder-only causal LMs and encoder-decoder LMs "
            f"that transformers can build with {auto.__name__} and SDPA attention."
        ) from None


def _config_from_dict(values: dict):
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _config_from_directory(directory: Path):
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise GraphoptError(
            f"{directory} is not a Hugging Face model directory: it has no config.json. Point graphopt at the "
            "folder that holds config.json and the *.safetensors weights (what `save_pretrained` writes)."
        )
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as error:
        raise GraphoptError(f"cannot read {directory / 'config.json'}: {str(error).splitlines()[0]}") from None


def open_model(model: str, model_path: str | None = None, random_weights: bool = False,
               num_layers: int | None = None) -> ModelSource:
    """Resolve what the user typed: a registry name or a local Hugging Face directory.

    `num_layers` keeps the first N decoder layers (then the final norm and the head): a smaller
    model of the same shape, for dry runs and benchmarks. Random weights are seeded by tensor
    name, so its layers are the full model's first N."""
    source = _open_model(model, model_path, random_weights)
    if num_layers is not None and source.adapter:
        raise GraphoptError("--num-layers works on transformers configs; for your own model file, build it with "
                            "fewer layers in its ADAPTER instead.")
    if num_layers is not None:
        _truncate_layers(source, num_layers)
    return source


def _truncate_layers(source: ModelSource, num_layers: int) -> None:
    config = source.config
    total = int(config.num_hidden_layers)
    if not 1 <= num_layers <= total:
        raise GraphoptError(f"--num-layers {num_layers} is outside what {source.name} has: give a value from 1 to "
                            f"its num_hidden_layers, {total}.")
    config.num_hidden_layers = num_layers
    for key, value in vars(config).items():  # per-layer lists (layer_types, ...) follow the layers
        if isinstance(value, list) and len(value) == total and key.startswith("layer"):
            setattr(config, key, value[:num_layers])
    if num_layers < total:
        source.name = f"{source.name}-{num_layers}l"


def _open_model(model: str, model_path: str | None, random_weights: bool) -> ModelSource:
    path = Path(model).expanduser()
    if path.suffix == ".py":
        return _open_custom(path, model_path)
    if path.is_dir():
        config = _config_from_directory(path)
        return ModelSource(path.resolve().name, config, SafetensorsWeights(path, scheme_of(config)), str(path.resolve()))
    if model not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise GraphoptError(
            f"unknown model '{model}': it is neither a registry name nor an existing directory. "
            f"Known names: {known}. Or pass the path of a local Hugging Face model directory "
            "(config.json + *.safetensors)."
        )
    entry = REGISTRY[model]
    if model_path:
        directory = Path(model_path).expanduser()
        if not directory.is_dir():
            raise GraphoptError(f"--model-path {model_path} is not a directory. Give the folder that holds the "
                                f"{model} checkpoint (config.json + *.safetensors).")
        config = _config_from_directory(directory) if (directory / "config.json").exists() else _config_from_dict(entry.config)
        return ModelSource(model, config, SafetensorsWeights(directory, scheme_of(config)),
                           f"registry:{model} + {directory.resolve()}")
    config = _config_from_dict(entry.config)
    if entry.random_weights or random_weights:
        # (Marian and BART call their initializer's scale init_std)
        std = getattr(config, "initializer_range", None) or getattr(config, "init_std", 0.02)
        return ModelSource(model, config, RandomWeights(RANDOM_SEED, std), f"registry:{model}")
    raise GraphoptError(
        f"'{model}' needs its weights: pass --model-path DIR with the Hugging Face checkpoint (config.json + "
        "*.safetensors, e.g. what `huggingface-cli download meta-llama/Llama-3.1-8B-Instruct` fetches), "
        "or --random-weights for a dry run with seeded random weights."
    )


def _open_custom(path: Path, model_path: str | None) -> ModelSource:
    """A user's own model: the file's CustomDecoder, random weights or --model-path's safetensors."""
    if not path.is_file():
        raise GraphoptError(f"{path} does not exist; give the Python file that declares your model's "
                            "ADAPTER = CustomDecoder(...).")
    adapter = load_adapter(path)
    with torch.device("meta"):
        layers = len(resolve(adapter.build(), adapter.layers, "layers"))
    config, name = CustomConfig(adapter, layers), adapter.name or path.stem
    if model_path:
        directory = Path(model_path).expanduser()
        if not directory.is_dir():
            raise GraphoptError(f"--model-path {model_path} is not a directory; give the folder with the model's "
                                "*.safetensors (its state_dict, e.g. written by safetensors.torch.save_model).")
        return ModelSource(name, config, SafetensorsWeights(directory), f"{path.resolve()} + {directory.resolve()}",
                           adapter_file=str(path.resolve()))
    return ModelSource(name, config, RandomWeights(RANDOM_SEED, adapter.init_std), str(path.resolve()),
                       adapter_file=str(path.resolve()))
