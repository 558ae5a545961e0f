"""Cycles of each net the top passes apply to, with and without them, at a model's real shape (issue 8).

fuse-flash-attention was measured on Llama-3.1-8B (chip_cycles.py) and on the tiny models, where
tiny-marian's decoder prefill got slower (12,301 -> 24,470 cycles at d_model 128, seq 64). This
bench exports one layer of a model (seeded random weights), compiles each net the contract gives
top passes to with and without them (the contract's flags otherwise), and prints total_cycle side
by side. `opus-mt` is Helsinki-NLP/opus-mt-en-de's published shape (d_model 512, 8 heads of 64,
FFN 2048, vocabulary 58,101; one encoder and one decoder layer); `llama2-7b` is Llama-2-7B's
(multi-head attention, 32 heads of 128, no GQA; one layer).

    python bench/chip_top_passes.py                                   # opus-mt, seq 256, bf16 and w4bf16
    python bench/chip_top_passes.py --model llama2-7b --seq-length 512 --quantize bf16
    python bench/chip_top_passes.py --model tiny-marian --seq-length 64
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, publish  # noqa: E402

OPUS_MT = {  # Helsinki-NLP/opus-mt-en-de's config.json, one layer each side
    "model_type": "marian", "architectures": ["MarianMTModel"], "vocab_size": 58101, "d_model": 512,
    "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 8, "decoder_attention_heads": 8,
    "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "max_position_embeddings": 512, "init_std": 0.02,
    "scale_embedding": True, "activation_function": "swish", "static_position_embeddings": True,
    "pad_token_id": 58100, "eos_token_id": 0, "decoder_start_token_id": 58100, "is_encoder_decoder": True,
}

LLAMA2_7B = {  # meta-llama/Llama-2-7b-hf's config.json, one layer: multi-head attention (no GQA) at 32 x 128
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.02,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
SHAPES = {"opus-mt": OPUS_MT, "llama2-7b": LLAMA2_7B}


def open_source(model: str):
    from graphopt.models import open_model
    from graphopt.models.source import RANDOM_SEED, ModelSource, RandomWeights, _config_from_dict

    if model in SHAPES:
        return ModelSource(f"{model}-shape-1l", _config_from_dict(SHAPES[model]), RandomWeights(RANDOM_SEED, 0.02), "bench")
    return open_model(model, random_weights=True, num_layers=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opus-mt",
                        help="opus-mt (default), llama2-7b (published shapes), or a registry name (one layer of it)")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--quantize", action="append", choices=("w4bf16", "bf16"), help="default: both")
    parser.add_argument("--json", help="where to write the JSON (default bench/results/chip_top_passes.json)")
    args = parser.parse_args()
    from graphopt.targets import get_target
    from graphopt.targets.bm1684x import contract, deploy, toolchain
    from graphopt.export import export_networks

    tools = toolchain.require()
    rows, data = [], []
    with tempfile.TemporaryDirectory(prefix="graphopt-chip-top-passes-") as work:
        start = time.perf_counter()
        source = open_source(args.model)
        results = export_networks(source, None, args.seq_length, Path(work), target=get_target("bm1684x"))
        manifest = {"networks": [{"name": r.name, "inputs": [{"shape": list(s.shape)} for s in r.inputs]}
                                 for r in results.values()]}
        for quantize in args.quantize or ["bf16", "w4bf16"]:
            for spec in contract.deploy_specs(manifest, quantize, contract.DEFAULT_GROUP_SIZE):
                if not spec.top_passes:
                    continue
                result = results[spec.onnx_network]
                unfused, fused = (deploy.deploy_network(tools, dataclasses.replace(spec, top_passes=passes),
                                                        result.files[0], result.sha256)
                                  for passes in ((), spec.top_passes))
                summary = "; ".join(r["summary"] for r in fused.top_passes)
                without, with_ = unfused.total_cycle, fused.total_cycle
                print(f"  {spec.name} {quantize}: {without:,} -> {with_:,}", file=sys.stderr)
                rows.append([spec.name, quantize, without, with_, f"{with_ / without - 1:+.1%}", summary])
                data.append({"net": spec.name, "quantize": quantize, "without": without, "with": with_,
                             "top_passes": list(spec.top_passes), "summary": summary})
        seconds = round(time.perf_counter() - start, 1)
    table = markdown_table(["net", "mode", "total_cycle without top passes", "with", "change", "what they did"], rows)
    publish("chip_top_passes", f"Top passes on {args.model}, 1 layer, seq {args.seq_length}", table,
            {"model": args.model, "seq_length": args.seq_length, "nets": data, "seconds": seconds}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
