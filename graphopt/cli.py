"""The `graphopt` command: run, generate, passes, golden, inspect, toolchain."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.machine import huge_page_malloc_for_children, limit_memory
from graphopt.models.registry import REGISTRY
from graphopt.targets.bm1684x.contract import DEFAULT_GROUP_SIZE, LM_HEAD_MODES, default_quantize

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
    from graphopt.compiler import compile_model
    from graphopt.models import open_model
    from graphopt.ray_executor import address_of
    from graphopt.report import render, write_json
    from graphopt.targets import get_target

    start = time.perf_counter()
    plugins, dump_after = _plugins(args), _dump_after(args)
    target = get_target(args.target)
    if args.jobs is not None and args.jobs < 1:
        raise GraphoptError(f"--jobs {args.jobs} must be at least 1 (or left out: as many as cores and memory allow).")
    if args.max_memory is not None and args.max_memory < 2:
        raise GraphoptError(f"--max-memory {args.max_memory:g} GiB leaves nothing for the build's processes: graphopt's "
                            "own process is planned at 1 GiB, and every export process or compile needs more (an 8B "
                            "block's compile 2.6 GiB). Give 2 or more, or leave it out to plan by the memory the machine "
                            "has available.")
    limit_memory(int(args.max_memory * (1 << 30)) if args.max_memory is not None else None)
    source = open_model(args.model, args.model_path, args.random_weights, args.num_layers)
    out = Path(args.out or f"graphopt-out/{source.name}-{target.name}-seq{args.seq_length}")
    max_input_length, chunk_length = _history_kv_lengths(args)
    ray_address = address_of(args.executor, args.ray_address)
    options = {"quantize": args.quantize or default_quantize(source), "group_size": args.group_size,
               "head_weights": args.lm_head, "jobs": args.jobs, "chunk_length": chunk_length}
    # compile_model checks everything the user can get wrong before any work starts.
    dump_dir = Path(args.dump_dir) if args.dump_dir else None
    if dump_after is not None and dump_dir is None:
        dump_dir = Path(f"{out}.dump")
        print(f"graphopt: graphs after {', '.join(sorted(dump_after)) or 'no pass'} go to {dump_dir}", file=sys.stderr)
    result = compile_model(source, target, args.seq_length, out, check=not args.no_check, dump_dir=dump_dir,
                           target_options=options, jobs=args.jobs, plugins=plugins, dump_after=dump_after,
                           contract=args.contract, max_input_length=max_input_length,
                           contract_options=_contract_options(args), ray_address=ray_address)
    wall = time.perf_counter() - start
    write_json(result, wall)
    print(render(result, wall))
    return 0 if result.ok else 1


def _contract_options(args) -> tuple[str, ...]:
    from graphopt.contract import DO_SAMPLE, DYNAMIC, HISTORY_KV

    return tuple(o for o, on in ((DYNAMIC, args.dynamic), (HISTORY_KV, args.history_kv), (DO_SAMPLE, args.do_sample))
                 if on)


def _history_kv_lengths(args) -> tuple[int | None, int | None]:
    """(--max-input-length, --chunk-length) as the run takes them: with --history-kv the prefill takes one
    chunk, and the chunk defaults to a quarter of SEQ (llm_convert's --use_history_kv)."""
    if not args.history_kv:
        return args.max_input_length, args.chunk_length
    if args.max_input_length is not None:
        raise GraphoptError("--max-input-length cannot be given with --history-kv: the prefill then takes one chunk "
                            "of --chunk-length tokens at a time (a longer prompt runs as several chunks). Give "
                            "--chunk-length instead.")
    chunk = args.chunk_length or args.seq_length // 4
    if chunk < 1:
        raise GraphoptError(f"--history-kv needs a chunk of at least one token, and a quarter of --seq-length "
                            f"{args.seq_length} is 0: give --chunk-length, or a larger --seq-length.")
    return chunk, chunk


def _sim_backend(directory: Path, manifest: dict, stack):
    from graphopt.targets.bm1684x import toolchain
    from graphopt.targets.bm1684x.build import REPORT, simulator_log
    from graphopt.targets.bm1684x.simulator import SimBackend, Simulator

    report = directory / REPORT
    if not report.is_file():
        raise GraphoptError(f"{directory} holds no bmodel ({REPORT} is missing): --backend bm1684x-sim needs the "
                            "output of `graphopt run MODEL --target bm1684x --out DIR`.")
    built = json.loads(report.read_text())
    bmodel = directory / built["bmodel"]
    tools = toolchain.require()
    sim = stack.enter_context(Simulator(tools, simulator_log(), built.get("memory", {}).get("total", 0)))
    return SimBackend(sim, bmodel, manifest)


def cmd_generate(args) -> int:
    from contextlib import ExitStack

    from graphopt.runtime import OrtBackend, load_manifest, runtime_for

    from graphopt import contract as c

    prompts = [_parse_ids(ids) for ids in args.input_ids]
    directory = Path(args.dir)
    manifest = load_manifest(directory)
    vocab = int(manifest["model"]["config"]["vocab_size"])
    if (largest := max(max(p) for p in prompts)) >= vocab:
        raise GraphoptError(f"--input-ids has token id {largest} but the model's vocabulary has {vocab} tokens "
                            f"(ids 0..{vocab - 1}).")
    if args.max_new_tokens < 1:
        raise GraphoptError("--max-new-tokens must be at least 1.")
    if len(prompts) > 1 and not c.contract_of_manifest(manifest).has(c.BLOCK_KV):
        raise GraphoptError(f"--input-ids was given {len(prompts)} times, a chat of as many turns, but the networks in "
                            f"{directory} keep no session between prompts: only --history-kv networks (block_kv_i) "
                            "continue one. Give one prompt, or compile with --history-kv.")
    sampling = _sampling(args, directory) if args.do_sample else None
    if sampling is not None and not c.contract_of_manifest(manifest).has(c.SAMPLE_HEAD):
        raise GraphoptError(f"--do-sample draws through sample_head, and the networks in {directory} have none: they "
                            "were compiled without --do-sample (lm_head answers the token). Recompile with "
                            "`graphopt run ... --do-sample`, or generate greedily.")
    with ExitStack() as stack:
        backend = OrtBackend(directory, manifest) if args.backend == "onnxruntime" else \
            _sim_backend(directory, manifest, stack)
        return _generate(args, prompts, runtime_for(backend, manifest, sampling=sampling), manifest)


def _sampling(args, directory: Path):
    """What the demos' --do_sample samples with: config/generation_config.json beside the networks."""
    from graphopt.config_folder import FOLDER
    from graphopt.runtime import Sampling

    if args.rep_window < 0:
        raise GraphoptError(f"--rep-window {args.rep_window} must be 0 (penalise the whole turn) or more.")
    return Sampling.from_generation_config(directory / FOLDER / "generation_config.json", args.rep_window, args.seed)


def _generate(args, prompts, runtime, manifest) -> int:
    """Each prompt in turn on one runtime: with --history-kv networks, each turn continues the session."""
    eos = manifest["model"]["config"].get("eos_token_id")
    stops = frozenset() if args.ignore_eos or eos is None else frozenset(eos if isinstance(eos, list) else [eos])
    from graphopt.runtime import run_prompt

    # A prompt (or a turn after the others) that does not fit the cache is refused by the runtime, with how much does.
    results = [run_prompt(runtime, prompt, args.max_new_tokens, stops) for prompt in prompts]
    if args.json:
        print(json.dumps({"tokens": results[0].tokens} if len(results) == 1 else {"turns": [r.tokens for r in results]}))
    else:
        for result in results:
            print(" ".join(str(t) for t in result.tokens))
        if results[-1].stopped == "length":
            print(f"(stopped: reached the compiled sequence length {manifest['seq_length']})", file=sys.stderr)
    return 0


def _plugins(args):
    from graphopt.plugins import PassPlugins

    if args.insert_after and args.insert_before:
        raise GraphoptError("--insert-after and --insert-before both place the --pass-file passes; give one of them.")
    return PassPlugins(tuple(args.pass_file or ()), args.insert_after, args.insert_before)


def _dump_after(args) -> frozenset[str] | None:
    """--dump-after NAME (repeatable) -> those passes; 'all' -> None (every pass); not given -> None."""
    names = [n for value in (args.dump_after or ()) for n in value.split(",") if n]
    return None if not names or "all" in names else frozenset(names)


STAGE_TITLES = {"fx": "FX passes (on the traced graph)", "onnx": "ONNX passes (on the exported model)",
                "top": "top passes (on the target's own IR, between its import and its compile)"}


def cmd_passes(args) -> int:
    from graphopt.pass_manager import ALL_KINDS, STAGES, get_pass
    from graphopt.plugins import with_plugins
    from graphopt.targets import get_target

    builtin = get_target(args.target)
    target = with_plugins(builtin, _plugins(args))
    print(f"target {target.name}: {target.description}")
    for stage in STAGES:
        names = target.pipeline(stage)
        if not names:
            continue
        print(f"\n{STAGE_TITLES[stage]}:")
        for index, name in enumerate(names, start=1):
            cls = get_pass(name)
            kinds = "all networks" if cls.applies_to >= ALL_KINDS else ", ".join(sorted(cls.applies_to))
            if getattr(cls, "dynamic_only", False):
                kinds += " compiled --dynamic"
            if getattr(cls, "codes_only", False):
                kinds += " with checkpoint codes"
            if getattr(cls, "modes", None):
                kinds += f" in {', '.join(sorted(cls.modes))}"
            print(f"  {index:2d}. {name:<22} {cls.doc()}")
            detail = [f"on: {kinds}"]
            if name not in builtin.pipeline(stage):
                detail.insert(0, f"user pass from {sys.modules[cls.__module__].__file__}")
            if cls.requires:
                detail.append(f"needs: {', '.join(cls.requires)}")
            if cls.ensures:
                detail.append(f"ensures: {', '.join(cls.ensures)}")
            print(f"      {'':<22} ({'; '.join(detail)})")
    return 0


def cmd_golden(args) -> int:
    from graphopt import golden

    directory = Path(args.dir)
    if args.action == "record":
        prompt = _parse_ids(args.prompt) if args.prompt else None
        recorded = golden.record(args.model, directory, name=args.name, model_path=args.model_path, prompt=prompt,
                                 new_tokens=args.new_tokens)
        meta, logits = golden.Golden.paths(directory, recorded.name)
        print(f"recorded golden '{recorded.name}': {len(recorded.tokens)} tokens from transformers "
              f"{recorded.recorded_with['transformers']} -> {meta}, {logits}")
        return 0
    report = golden.check(args.model, directory, name=args.name, model_path=args.model_path, target=args.target,
                          seq_length=args.seq_length, plugins=_plugins(args),
                          target_options={"quantize": args.quantize} if args.quantize else None)
    print(report.table())
    return 0 if report.ok else 1


def cmd_inspect(args) -> int:
    from graphopt.output import MANIFEST
    from graphopt.targets.bm1684x import inspect_bmodel, toolchain
    from graphopt.targets.bm1684x.build import simulator_log
    from graphopt.targets.bm1684x.simulator import Simulator

    path = Path(args.file)
    if not path.is_file():
        raise GraphoptError(f"{path} does not exist or is not a file; give the path of a .bmodel.")
    tools = toolchain.require()
    header, nets = inspect_bmodel.read_info(tools, path)
    problems = inspect_bmodel.contract_problems(nets)
    if not problems:  # names and shapes are right: then where the runtime's copies land, and its mask bits
        manifest_path = path.parent / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        with Simulator(tools, simulator_log(), header.get("memory", {}).get("total", 0)) as sim:
            problems = inspect_bmodel.runtime_problems(sim.layout(path), nets, manifest)
    print(inspect_bmodel.render(path, header, nets, problems))
    return 1 if problems else 0


def cmd_toolchain(args) -> int:
    from graphopt.targets.bm1684x import toolchain

    if args.action == "status":
        print(toolchain.status())
        return 0
    if args.target != "bm1684x":
        raise GraphoptError(f"there is no toolchain for target '{args.target}'; only bm1684x needs one.")
    if args.action == "install":
        start = time.perf_counter()
        from graphopt.targets.bm1684x.selfcheck import run_selfcheck

        tools = toolchain.install(args.python, args.force, say=lambda m: print(m, file=sys.stderr), check=run_selfcheck)
        print(f"{tools.describe()} ready ({time.perf_counter() - start:.0f}s)")
        return 0
    from graphopt.targets.bm1684x.selfcheck import run_selfcheck

    tools = toolchain.require()
    print(f"{tools.describe()}: self-check {run_selfcheck(tools, toolchain.cache_root() / 'selfcheck')}")
    return 0


def _add_pass_options(parser) -> None:
    group = parser.add_argument_group("user passes (docs/writing-passes.md)")
    group.add_argument("--pass-file", action="append", metavar="FILE", help="a Python file of passes registered with "
                       "@register_pass (repeatable); installed packages add theirs through the entry point group "
                       "graphopt.passes")
    group.add_argument("--insert-after", metavar="PASS", help="place the --pass-file passes after this pass "
                       "(instead of where each pass's insert_after/insert_before says)")
    group.add_argument("--insert-before", metavar="PASS", help="place the --pass-file passes before this pass")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compile a model into per-network files for a target")
    run.add_argument("model", help=f"registry name ({', '.join(REGISTRY)}), a Hugging Face model directory, or a "
                     "Python file declaring ADAPTER = CustomDecoder(...) for your own module")
    run.add_argument("--target", default="onnx", help="target to compile for (default: onnx)")
    run.add_argument("--seq-length", type=int, default=DEFAULT_SEQ_LENGTH, help="SEQ of the network contract (default 512)")
    run.add_argument("--out", help="output directory (default: graphopt-out/MODEL-TARGET-seqN)")
    run.add_argument("--max-input-length", type=int, help="prompt tokens one prefill takes (embedding and block_i "
                     "rows), fewer than --seq-length, the tokens the cache holds (default: --seq-length; --contract "
                     "llm-tpu)")
    run.add_argument("--contract", help="the runtime the networks are for (decoder-only models): llm-tpu (today's "
                     "LLM-TPU demos and llm_convert: token-out lm_head, final norm in the last block; the default) or "
                     "llama3_1 (LLM-TPU's legacy Llama3_1 demo); README \"Runtime contracts\"")
    run.add_argument("--dynamic", action="store_true", help="--contract llm-tpu: block_i runs at the prompt's length "
                     "(the runtime sets it per launch) and computes its causal mask itself, as llm_convert --dynamic")
    run.add_argument("--history-kv", action="store_true", help="--contract llm-tpu: add block_kv_i, which prefills a "
                     "chunk of --chunk-length tokens against the cache, so a chat's later turn costs its own tokens "
                     "(llm_convert --use_history_kv; implies --dynamic; the prefill takes the chunk's rows)")
    run.add_argument("--do-sample", action="store_true", help="--contract llm-tpu: lm_head answers the logits, and "
                     "greedy_head and sample_head (repetition penalty, temperature, top_k <= 50, top_p, as transformers "
                     "samples) read them, so the demos' --do_sample draws from the model's generation config "
                     "(llm_convert --do_sample)")
    run.add_argument("--model-path", help="checkpoint directory for a registry model (config.json + *.safetensors)")
    run.add_argument("--random-weights", action="store_true", help="seeded random weights instead of a checkpoint")
    run.add_argument("--num-layers", type=int, help="keep only the first N decoder layers (dry runs, benchmarks)")
    run.add_argument("--no-check", action="store_true", help="skip the stage-by-stage numeric checks")
    run.add_argument("--executor", choices=("local", "ray"), default="local", help="where the export and the "
                     "compiles run: on this machine (default), or as tasks on an existing Ray cluster, a weight group's "
                     "export or a net's compile each, asking for its estimated memory (every node needs graphopt, the "
                     "checkpoint, the toolchain and --out's folder at the same paths; README, \"Building on a Ray "
                     "cluster\")")
    run.add_argument("--ray-address", help="--executor ray: the cluster's head, HOST:PORT (default: $RAY_ADDRESS, "
                     "or a Ray node started on this machine)")
    run.add_argument("--jobs", type=int, help="processes exporting (and, for bm1684x, compiling) networks in "
                     "parallel (default: as many as cores and memory allow; 1 for models under 200M parameters)")
    run.add_argument("--max-memory", type=float, metavar="GIB", help="memory the run may hold at once, GiB: "
                     "export processes and compiles are planned to stay under it, and a net larger than it compiles "
                     "alone (default: what the machine has available)")
    run.add_argument("--dump-dir", help="write each network's graph after every pass (or those of --dump-after) "
                     "into this directory")
    run.add_argument("--dump-after", action="append", metavar="PASS", help="write each network's graph after this "
                     "pass (repeatable, or comma-separated; 'all' for every pass) into --dump-dir (default: OUT.dump)")
    _add_pass_options(run)
    bm = run.add_argument_group("bm1684x target")
    bm.add_argument("--quantize", help="w4bf16 (default), w8bf16, w4f16, w8f16, bf16 or f16: the blocks' weights; "
                    "embedding and lm_head use the matching 16-bit float. A pre-quantized checkpoint (GPTQ, AWQ, "
                    "compressed-tensors) keeps its own codes: the default is then its bits and its scales' float")
    bm.add_argument("--lm-head", choices=LM_HEAD_MODES, default="bf16", help="lm_head's weights: bf16 (default, as "
                    "today's llm_convert), or w8 / w4 quantized by --group-size (LLM-TPU's legacy script); the report "
                    "gives its cycles and its logits' cosine against fp32")
    bm.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                    help=f"weight quantization group size (default {DEFAULT_GROUP_SIZE})")
    bm.add_argument("--chunk-length", type=int, help="decode stages (--contract llm-tpu): block_cache_i compiled "
                    "again for every multiple of this many cache rows below SEQ, so a decode step attends over the "
                    "smallest that holds the context (at most half of --seq-length); with --history-kv also the "
                    "chunk a prefill takes (default there: a quarter of --seq-length, as llm_convert)")
    run.set_defaults(func=cmd_run)

    gen = sub.add_parser("generate", help="generation (greedy, or sampled) with the emitted networks, driven like the "
                         "chip runtime")
    gen.add_argument("dir", help="an output directory of `graphopt run`")
    gen.add_argument("--input-ids", required=True, action="append", help="prompt token ids, e.g. 1,2,3; given again, "
                     "the next turn of a chat, which continues the session (--history-kv networks)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's end-of-sequence token")
    gen.add_argument("--json", action="store_true", help='print {"tokens": [...]}')
    gen.add_argument("--backend", choices=("onnxruntime", "bm1684x-sim"), default="onnxruntime",
                     help="run the ONNX networks in onnxruntime (default), or the bmodel in TPU-MLIR's simulator")
    gen.add_argument("--do-sample", action="store_true", help="draw each token through sample_head (networks compiled "
                     "with --do-sample) with the sampling parameters of DIR/config/generation_config.json, as the "
                     "demos' --do_sample does")
    gen.add_argument("--rep-window", type=int, default=64, help="--do-sample: the repetition penalty applies to the "
                     "turn's last this many tokens; 0: all of them (the demos' --rep_window, default 64)")
    gen.add_argument("--seed", type=int, default=0, help="--do-sample: the seed of the draws (the demos seed from the "
                     "system's entropy; graphopt's draws repeat)")
    gen.set_defaults(func=cmd_generate)

    passes = sub.add_parser("passes", help="print a target's pass pipeline")
    passes.add_argument("--target", default="onnx")
    _add_pass_options(passes)
    passes.set_defaults(func=cmd_passes)

    gold = sub.add_parser("golden", help="record transformers' greedy output as a golden, or check every "
                          "compiler stage against one")
    gold.add_argument("action", choices=("record", "check"))
    gold.add_argument("model", help="registry name, Hugging Face model directory, or a model file declaring ADAPTER")
    gold.add_argument("--dir", default="tests/golden", help="where goldens live (default: tests/golden)")
    gold.add_argument("--name", help="the golden's name (default: the registry name or the directory's name)")
    gold.add_argument("--model-path", help="checkpoint directory for a registry model")
    gold.add_argument("--prompt", help="record: prompt (or source) token ids, e.g. 1,2,3 (default: 8 fixed ids)")
    gold.add_argument("--new-tokens", type=int, default=32, help="record: greedy tokens to keep (default 32)")
    gold.add_argument("--target", default="onnx", help="check: the target whose stages to check (default: onnx; "
                      "bm1684x adds the bmodel in the simulator)")
    gold.add_argument("--seq-length", type=int, default=64, help="check: SEQ to compile for (default 64)")
    gold.add_argument("--quantize", help="check, bm1684x: the mode of the bmodel stage (default bf16)")
    _add_pass_options(gold)
    gold.set_defaults(func=cmd_golden)

    inspect = sub.add_parser("inspect", help="print a .bmodel's nets and check them against the runtime contract")
    inspect.add_argument("file")
    inspect.set_defaults(func=cmd_inspect)

    tool = sub.add_parser("toolchain", help="install or show the vendor toolchain a target needs")
    tool.add_argument("action", choices=("install", "status", "check"))
    tool.add_argument("target", nargs="?", default="bm1684x")
    tool.add_argument("--python", help="Python 3.10 to build the toolchain's venv with (default: found automatically)")
    tool.add_argument("--force", action="store_true", help="reinstall even if installed")
    tool.set_defaults(func=cmd_toolchain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    huge_page_malloc_for_children()
    try:
        return args.func(args)
    except GraphoptError as error:
        if os.environ.get("GRAPHOPT_TRACEBACK"):
            raise
        print(f"graphopt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphopt: interrupted; nothing was written to the output directory.", file=sys.stderr)
        return 130
