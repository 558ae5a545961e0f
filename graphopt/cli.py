"""The `graphopt` command: run, generate, passes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from graphopt.errors import GraphoptError

DEFAULT_SEQ_LENGTH = 512


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise GraphoptError(f"--input-ids '{text}' is not a comma-separated list of token ids; write e.g. "
                            "--input-ids 1,2,3") from None
    if not ids or any(i < 0 for i in ids):
        raise GraphoptError(f"--input-ids '{text}' must hold at least one token id, none negative; "
                            "write e.g. --input-ids 1,2,3")
    return ids


def cmd_run(args) -> int:
    from graphopt.compiler import compile_model, validate_seq_length
    from graphopt.models import open_model
    from graphopt.output import check_output_dir
    from graphopt.report import render, write_json
    from graphopt.targets import get_target

    start = time.perf_counter()
    target = get_target(args.target)
    source = open_model(args.model, args.model_path, args.random_weights)
    out = Path(args.out or f"graphopt-out/{source.name}-{target.name}-seq{args.seq_length}")
    # Everything the user can get wrong is checked before any work starts.
    _ = source.parts
    validate_seq_length(source, args.seq_length)
    check_output_dir(out)
    print(f"graphopt: {source.name} ({source.weights.describe()}) -> target {target.name}, "
          f"seq {args.seq_length}", file=sys.stderr)
    dump_dir = Path(args.dump_dir) if args.dump_dir else None
    result = compile_model(source, target, args.seq_length, out, check=not args.no_check, dump_dir=dump_dir)
    wall = time.perf_counter() - start
    write_json(result, wall)
    print(render(result, wall))
    return 0 if result.ok else 1


def cmd_generate(args) -> int:
    from graphopt.runtime import open_runtime

    prompt = _parse_ids(args.input_ids)
    directory = Path(args.dir)
    runtime, manifest = open_runtime(directory)
    vocab = next(n for n in manifest["networks"] if n["name"] == "lm_head")["outputs"][0]["shape"][-1]
    if max(prompt) >= vocab:
        raise GraphoptError(f"--input-ids has token id {max(prompt)} but the model's vocabulary has {vocab} tokens "
                            f"(ids 0..{vocab - 1}).")
    if args.max_new_tokens < 1:
        raise GraphoptError("--max-new-tokens must be at least 1.")
    eos = manifest["model"]["config"].get("eos_token_id")
    stops = frozenset() if args.ignore_eos or eos is None else frozenset(eos if isinstance(eos, list) else [eos])
    result = runtime.generate(prompt, args.max_new_tokens, stops)
    if args.json:
        print(json.dumps({"tokens": result.tokens}))
    else:
        print(" ".join(str(t) for t in result.tokens))
        if result.stopped == "length":
            print(f"(stopped: reached the compiled sequence length {manifest['seq_length']})", file=sys.stderr)
    return 0


def cmd_passes(args) -> int:
    from graphopt.pass_manager import get_pass
    from graphopt.targets import get_target

    target = get_target(args.target)
    print(f"target {target.name}: {target.description}")
    for phase, names in (("FX passes (on the traced graph)", target.fx_pipeline),
                         ("ONNX passes (on the exported model)", target.onnx_pipeline)):
        print(f"\n{phase}:")
        for index, name in enumerate(names, start=1):
            cls = get_pass(name)
            kinds = "all networks" if len(cls.applies_to) > 5 else ", ".join(sorted(cls.applies_to))
            print(f"  {index:2d}. {name:<22} {cls.doc()}")
            detail = [f"on: {kinds}"]
            if cls.requires:
                detail.append(f"needs: {', '.join(cls.requires)}")
            if cls.ensures:
                detail.append(f"ensures: {', '.join(cls.ensures)}")
            print(f"      {'':<22} ({'; '.join(detail)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compile a model into per-network files for a target")
    run.add_argument("model", help="registry name (tiny-llama, llama3.1-8b) or a Hugging Face model directory")
    run.add_argument("--target", default="onnx", help="target to compile for (default: onnx)")
    run.add_argument("--seq-length", type=int, default=DEFAULT_SEQ_LENGTH, help="SEQ of the network contract (default 512)")
    run.add_argument("--out", help="output directory (default: graphopt-out/MODEL-TARGET-seqN)")
    run.add_argument("--model-path", help="checkpoint directory for a registry model (config.json + *.safetensors)")
    run.add_argument("--random-weights", action="store_true", help="seeded random weights instead of a checkpoint")
    run.add_argument("--no-check", action="store_true", help="skip the stage-by-stage numeric checks")
    run.add_argument("--dump-dir", help="write each network's graph after every pass into this directory")
    run.set_defaults(func=cmd_run)

    gen = sub.add_parser("generate", help="greedy generation with the emitted networks, driven like the chip runtime")
    gen.add_argument("dir", help="an output directory of `graphopt run`")
    gen.add_argument("--input-ids", required=True, help="prompt token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's end-of-sequence token")
    gen.add_argument("--json", action="store_true", help='print {"tokens": [...]}')
    gen.set_defaults(func=cmd_generate)

    passes = sub.add_parser("passes", help="print a target's pass pipeline")
    passes.add_argument("--target", default="onnx")
    passes.set_defaults(func=cmd_passes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GraphoptError as error:
        print(f"graphopt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphopt: interrupted; nothing was written to the output directory.", file=sys.stderr)
        return 130
