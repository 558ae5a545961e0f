"""The whole-model baseline graphopt is measured against.

What LLM-TPU's `models/Llama3_1/compile/export_onnx.py` does, on unpatched transformers: load
the whole model in fp32, then `torch.onnx.export` (TorchScript exporter, opset 15, constant
folding) the embedding, each block in its prefill and decode forms, and the lm head, one after
another. The block wrappers call the transformers decoder layer with a DynamicCache, which is
what the patched `modeling_llama.py` replaces; the cost that matters here (the whole model in
memory, one TorchScript export per network) is the same.

No checkpoint can be downloaded here, so seeded random init of the whole fp32 model stands in
for `from_pretrained(torch_dtype=torch.float)`; it is timed on its own as "load".

    python bench/baseline_whole_model.py llama3.1-8b --out /tmp/baseline [--num-layers N] [--discard]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache


def registry_config(name: str, num_layers: int | None):
    from graphopt.models.registry import REGISTRY  # only for the config, so both flows build the same model

    values = dict(REGISTRY[name].config)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    if num_layers:
        config.num_hidden_layers = num_layers
    return config


class Block(nn.Module):
    """Prefill: the layer over SEQ positions; returns hidden states and the layer's K/V."""

    def __init__(self, model, index: int):
        super().__init__()
        self.layer, self.rotary, self.index = model.model.layers[index], model.model.rotary_emb, index

    def forward(self, input_states, position_ids, attention_mask):
        cache = DynamicCache()
        hidden = self.layer(input_states, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True,
                            position_embeddings=self.rotary(input_states, position_ids))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return (hidden, *_kv(cache, self.index))


class BlockCache(Block):
    """Decode: one new position over SEQ cached ones; returns the new position's K/V."""

    def forward(self, input_states, position_ids, attention_mask, history_k, history_v):
        cache = DynamicCache()
        cache.update(history_k, history_v, self.index)
        hidden = self.layer(input_states, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True,
                            position_embeddings=self.rotary(input_states, position_ids))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        keys, values = _kv(cache, self.index)
        return hidden, keys[:, :, -1:], values[:, :, -1:]


def _kv(cache: DynamicCache, index: int):
    layer = cache.layers[index] if hasattr(cache, "layers") else None  # transformers 5.x
    return (layer.keys, layer.values) if layer is not None else (cache.key_cache[index], cache.value_cache[index])


class Embedding(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.model.embed_tokens

    def forward(self, input_ids):
        return self.embed(input_ids)


class LmHead(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm, self.head = model.model.norm, model.lm_head

    def forward(self, hidden_states):
        return self.head(self.norm(hidden_states))


def networks(model, config, seq: int):
    """(name, module, example inputs, input names, output names), in LLM-TPU's order."""
    hidden, kv = config.hidden_size, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    positions = torch.arange(seq).unsqueeze(0)
    yield "embedding", Embedding(model), (torch.zeros(1, seq, dtype=torch.long),), ["input_ids"], ["input_embed"]
    for i in range(config.num_hidden_layers):
        yield (f"block_{i}", Block(model, i),
               (torch.randn(1, seq, hidden), positions, torch.zeros(1, 1, seq, seq)),
               ["input_states", "position_ids", "attention_mask"], ["hidden_states", "past_k", "past_v"])
        yield (f"block_cache_{i}", BlockCache(model, i),
               (torch.randn(1, 1, hidden), torch.tensor([[seq - 1]]), torch.zeros(1, 1, 1, seq + 1),
                torch.randn(1, kv, seq, head_dim), torch.randn(1, kv, seq, head_dim)),
               ["input_states", "position_ids", "attention_mask", "history_k", "history_v"],
               ["hidden_states", "past_k", "past_v"])
    yield "lm_head", LmHead(model), (torch.randn(1, hidden),), ["hidden_states"], ["m_logits"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a graphopt registry name (its config is used)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--discard", action="store_true", help="delete each ONNX once written (disk space)")
    parser.add_argument("--networks", type=int, help="stop after this many networks (machines that cap a command's "
                        "time; bench/export.py extrapolates the rest from their mean)")
    parser.add_argument("--stats", help="write per-stage seconds here as JSON")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = registry_config(args.model, args.num_layers)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    model.requires_grad_(False)
    seconds["load"] = time.perf_counter() - start
    print(f"load {seconds['load']:.1f}s", file=sys.stderr, flush=True)
    start = time.perf_counter()
    written, per_network = 0, {}
    total = 2 * config.num_hidden_layers + 2
    for name, module, example, inputs, outputs in networks(model, config, args.seq_length):
        if args.networks is not None and len(per_network) == args.networks:
            break
        began = time.perf_counter()
        folder = out / name  # one folder per network: >2 GB networks bring their external data files
        folder.mkdir(exist_ok=True)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(folder / f"{name}.onnx"), input_names=inputs,
                              output_names=outputs, opset_version=15, do_constant_folding=True, dynamo=False)
        written += sum(f.stat().st_size for f in folder.iterdir())
        if args.discard:
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
        per_network[name] = time.perf_counter() - began
        print(f"{name} {per_network[name]:.1f}s", file=sys.stderr, flush=True)
    seconds["export"] = time.perf_counter() - start
    if args.stats:
        Path(args.stats).write_text(json.dumps({"seconds": seconds, "onnx_bytes": written, "networks": per_network,
                                                "networks_total": total}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
