"""Registry names users type on the command line."""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.models import configs


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    config: dict
    # Tiny models are defined by their seed; real ones need a checkpoint (--model-path).
    random_weights: bool


REGISTRY = {
    e.name: e
    for e in (
        RegistryEntry("tiny-llama", "Llama-3.1 in miniature (GQA, llama3 rope, 2 layers), seeded random weights",
                      configs.TINY_LLAMA, random_weights=True),
        RegistryEntry("tiny-qwen2.5", "Qwen2.5 in miniature (q/k/v bias, tied embeddings, 2 layers), seeded random weights",
                      configs.TINY_QWEN2_5, random_weights=True),
        RegistryEntry("tiny-qwen3", "Qwen3 in miniature (per-head q/k RMSNorm, tied embeddings, 2 layers), seeded random weights",
                      configs.TINY_QWEN3, random_weights=True),
        RegistryEntry("tiny-mistral", "Mistral-7B-v0.3 in miniature (2 layers), seeded random weights",
                      configs.TINY_MISTRAL, random_weights=True),
        RegistryEntry("tiny-marian", "Marian (opus-mt) in miniature: encoder-decoder, sinusoidal positions, seeded random weights",
                      configs.TINY_MARIAN, random_weights=True),
        RegistryEntry("tiny-bart", "BART in miniature: encoder-decoder, learned positions, seeded random weights",
                      configs.TINY_BART, random_weights=True),
        RegistryEntry("llama3.1-8b", "Llama-3.1-8B-Instruct; weights from --model-path DIR",
                      configs.LLAMA_3_1_8B, random_weights=False),
        RegistryEntry("qwen2.5-7b", "Qwen2.5-7B-Instruct; weights from --model-path DIR",
                      configs.QWEN2_5_7B, random_weights=False),
        RegistryEntry("qwen3-8b", "Qwen3-8B; weights from --model-path DIR",
                      configs.QWEN3_8B, random_weights=False),
        RegistryEntry("mistral-7b", "Mistral-7B-Instruct-v0.3; weights from --model-path DIR",
                      configs.MISTRAL_7B_V0_3, random_weights=False),
    )
}
