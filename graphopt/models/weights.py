"""Where a network's weights come from, one tensor at a time.

A provider answers `fill(names, out)`: it writes the tensor into `out` (a parameter already
allocated), so a tensor costs its own size once, not twice; `names` are every name the tensor
has in the model (tied weights have two, e.g. `model.embed_tokens.weight` and
`lm_head.weight`). Nothing here holds the whole model: a network asks for its own tensors only.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Protocol, Sequence

import torch
from safetensors import safe_open

from graphopt.errors import GraphoptError
from graphopt.models.quantized import QuantizedLinear, QuantScheme, read_linear


class WeightProvider(Protocol):
    def fill(self, names: Sequence[str], out: torch.Tensor) -> None: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


def get(provider: WeightProvider, names: Sequence[str], shape: tuple[int, ...]) -> torch.Tensor:
    """A provider's tensor as a new fp32 tensor."""
    out = torch.empty(shape, dtype=torch.float32)
    provider.fill(names, out)
    return out


class RandomWeights:
    """Deterministic random weights, each tensor seeded by (seed, its name).

    Seeding per name makes a tensor independent of the order networks are built in and of
    how a transformers release initialises modules, so goldens stay valid across releases.
    Norm scales are 1 + noise (not all ones) so a pass that drops one is caught; norm biases are
    noise like any other bias.
    """

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed, self.std = seed, std

    def fill(self, names: Sequence[str], out: torch.Tensor) -> None:
        name = min(names)  # a tied group draws once, under one name
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        torch.randn(out.shape, generator=generator, dtype=out.dtype, out=out)
        if out.dim() == 1 and "norm" in name and name.endswith("weight"):  # a norm's scale, not its bias
            out.mul_(0.1).add_(1.0)
        else:
            out.mul_(self.std)

    def describe(self) -> str:
        return f"random (seed {self.seed}, std {self.std})"

    def close(self) -> None:
        pass  # nothing is held between fills


class SafetensorsWeights:
    """Tensors read lazily from a Hugging Face checkpoint directory (sharded or not).

    A pre-quantized checkpoint (`quantization`, from its config) stores a Linear's weight as codes
    (`<module>.qweight` or `.weight_packed`, scales, zero points): the model's `<module>.weight` is
    then their dequantized value, and `quantized_linear` gives the codes themselves, which the
    bm1684x target keeps in the bmodel as they are."""

    def __init__(self, directory: Path, quantization: QuantScheme | None = None):
        self.directory, self.quantization = directory, quantization
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(directory.glob("*.safetensors")):
                with safe_open(file, framework="pt") as handle:
                    self.files.update({name: file for name in handle.keys()})
        if not self.files:
            raise GraphoptError(
                f"{directory} has no *.safetensors weights. graphopt reads Hugging Face checkpoints in "
                "safetensors format (model.safetensors, or shards with model.safetensors.index.json); "
                "re-save the model with `save_pretrained(dir, safe_serialization=True)`."
            )
        self._handles: dict[Path, object] = {}
        self.stored_as: dict[str, str] = {}  # a model's name for a tensor -> the checkpoint's (`rename`)
        self.converters: list = []

    def rename(self, renamings: Sequence[tuple[str, str]]) -> None:
        """Also find each tensor under the name the model gives it where the checkpoint keeps another:
        `renamings` are (regex over checkpoint names, replacement), as transformers renames on load
        (`conversion_mapping`: GPT-NeoX's `embed_out.` is the model's `lm_head.`)."""
        for stored in list(self.files):
            name = stored
            for pattern, replacement in renamings:
                name = re.sub(pattern, replacement, name)
            if name != stored and name not in self.files:
                self.files[name], self.stored_as[name] = self.files[stored], stored

    def convert(self, converters: Sequence) -> None:
        """Tensors the model keeps as one that the checkpoint keeps as several (transformers 5's
        WeightConverter rules: a mixture of experts' per-expert weights, stacked and joined), built with the
        rule's own operations when a network asks for them."""
        self.converters = list(converters)

    def _converted(self, name: str) -> torch.Tensor | None:
        for rule in self.converters:
            target = next((t for t in rule.target_patterns if name.endswith(t)), None)
            if target is None:
                continue
            prefix, parts = name[:-len(target)], {}
            for source in rule.source_patterns:
                pattern = re.compile(re.escape(prefix + source).replace(r"\*", r"(\d+)") + "$")
                found = sorted((int(m.group(1)), key) for key in self.files if (m := pattern.match(key)))
                if found:
                    parts[source] = [self.read(key) for _, key in found]
            if len(parts) != len(rule.source_patterns):
                continue
            for operation in rule.operations:
                parts = operation.convert(parts, rule.source_patterns, rule.target_patterns)
            (tensor,) = parts.values()
            return tensor
        return None

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def close(self) -> None:
        """Let go of the files' mappings. safetensors maps a whole file and reads tensors out of it; every page
        read stays in this process's resident memory while the file is open (an 8B export process grew 0.4 GiB
        a layer, 3 GiB in eight). The next read opens the file again."""
        self._handles.clear()

    def read(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(self.stored_as.get(name, name))  # in the checkpoint's dtype

    def shape(self, name: str) -> tuple[int, ...]:
        """A stored tensor's shape, read from the file's header only."""
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """A stored tensor's dtype as safetensors names it (F16, BF16, I32, ...), from the header only."""
        return self._slice(name).get_dtype()

    def _slice(self, name: str):
        return self._handle(name).get_slice(self.stored_as.get(name, name))

    def quantized_prefixes(self) -> list[str]:
        """The modules the checkpoint stores as codes (`<module>.qweight` or `.weight_packed`)."""
        if self.quantization is None:
            return []
        tail = f".{self.quantization.suffix}"
        return sorted(name[:-len(tail)] for name in self.files if name.endswith(tail))

    def quantized_linear(self, names: Sequence[str]) -> QuantizedLinear | None:
        """The codes of the Linear weight named `names` (None where the checkpoint stores it unquantized)."""
        if self.quantization is None:
            return None
        for name in names:
            prefix, _, last = name.rpartition(".")
            if last == "weight" and f"{prefix}.{self.quantization.suffix}" in self.files:
                return read_linear(self.quantization, prefix, self.read, self.files.__contains__)
        return None

    def fill(self, names: Sequence[str], out: torch.Tensor) -> None:
        name = next((n for n in names if n in self.files), None)
        if name is None and (linear := self.quantized_linear(names)) is not None:
            return self._copy(names[0], "dequantized codes", linear.dequantized(), out)
        if name is None and (tensor := next((t for n in names if (t := self._converted(n)) is not None), None)) is not None:
            return self._copy(names[0], "converted tensors", tensor, out)
        if name is None:
            raise GraphoptError(
                f"the checkpoint in {self.directory} has no tensor named {' or '.join(names)}. "
                "Check that config.json matches the weights (same architecture and layer count)."
            )
        self._copy(name, self.files[name].name, self.read(name), out)

    @staticmethod
    def _copy(name: str, where: str, tensor: torch.Tensor, out: torch.Tensor) -> None:
        if tuple(tensor.shape) != tuple(out.shape):
            raise GraphoptError(
                f"tensor {name} in {where} has shape {tuple(tensor.shape)} but the config implies "
                f"{tuple(out.shape)}; config.json and the weights do not belong together."
            )
        out.copy_(tensor)  # converts to fp32 in place

    def describe(self) -> str:
        kept = f" ({self.quantization.describe()} codes)" if self.quantization else ""
        return f"safetensors in {self.directory}{kept}"
