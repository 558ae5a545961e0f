"""Top passes: rewrites of TPU-MLIR's top-level MLIR, between model_transform and model_deploy.

Some forms TPU-MLIR compiles best have no ONNX spelling (opset ≤ 17 has no attention op), so
they are made at its own level, in the file model_transform wrote. Each is declared here as a
TopPass (name, the network kinds it applies to, what it ensures), so the target's pipeline lists
and orders it like any pass; its code is one file beside this one, run in the toolchain's Python
by `run.py` (it needs TPU-MLIR's `mlir` bindings, not graphopt):

  keep_checkpoint_codes.py a pre-quantized checkpoint's Linears -> top.A16MatMul with its own codes
  quantize_weights.py      a W4 net's other Linears -> top.A16MatMul, quantized here as model_deploy would
  fuse_flash_attention.py  MatMul/Softmax/MatMul attention -> top.FAttention
  merge_cache_concat.py    a decode block's cache concat merged in place (only_merge), no copy
  small_causal_mask.py     a dynamic net's baked causal mask -> FAttention's small mask (any length)
  dynamic_sequence.py      a dynamic net's Reshapes and Slices open along its sequence axes

The first runs on nets that have checkpoint codes only (`codes_only`: a pre-quantized model's), the
second on nets compiled in an int4 weight mode only (`modes`); the last two on dynamic nets only
(`dynamic_only`: --dynamic block_i, block_kv_i), which model_deploy then compiles with --dynamic.

Each pass reports how many candidates it changed and, for every candidate it left alone, why.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from graphopt.contract import BLOCK, BLOCK_KV, BLOCKS, CROSS_KV, DECODE_BLOCKS, DYNAMIC, ENCODER, LM_HEAD
from graphopt.pass_manager import TopPass, get_pass, register_pass

HERE = Path(__file__).resolve().parent


@register_pass
class KeepCheckpointCodes(TopPass):
    """A pre-quantized checkpoint's Linears become top.A16MatMul with the checkpoint's own codes.

    Its scales and zero points too, which model_deploy keeps instead of quantizing the weights again."""

    name = "keep-checkpoint-codes"
    target = "bm1684x"
    module = "keep_checkpoint_codes"
    applies_to = BLOCKS | {ENCODER, CROSS_KV, LM_HEAD}
    codes_only = True
    ensures = ("weights.checkpoint-codes",)


@register_pass
class QuantizeWeights(TopPass):
    """An int4 net's Linears become top.A16MatMul with codes quantized here by TPU-MLIR's own arithmetic.

    model_deploy then lowers them instead of quantizing element by element (8 s of an 8B block's 10.5 s lowering);
    the bmodel is the same bytes."""

    name = "quantize-weights"
    target = "bm1684x"
    module = "quantize_weights"
    applies_to = BLOCKS | {ENCODER, CROSS_KV, LM_HEAD}
    modes = frozenset({"W4BF16", "W4F16"})  # model_deploy's --quantize where it would make int4 A16MatMuls
    # After keep-checkpoint-codes: a checkpoint's own codes stay its own, the rest are quantized here.
    ensures = ("weights.int4",)


@register_pass
class FuseFlashAttention(TopPass):
    """MatMul/Softmax/MatMul attention (attention-lower's) becomes one top.FAttention, TPU-MLIR's own LLM attention op."""

    name = "fuse-flash-attention"
    target = "bm1684x"
    module = "fuse_flash_attention"  # the file beside this one that rewrites the MLIR
    applies_to = BLOCKS | {ENCODER}
    ensures = ("attention.fused",)


@register_pass
class MergeCacheConcat(TopPass):
    """A decode block's (and block_kv_i's) [history ; new rows] cache concat merged in place (only_merge): no copy of the cache."""

    name = "merge-cache-concat"
    target = "bm1684x"
    module = "merge_cache_concat"
    applies_to = DECODE_BLOCKS | {BLOCK_KV}
    # After fuse-flash-attention, which redoes the cache concat along the sequence in [1,S,KV,D].
    requires = ("attention.fused",)
    ensures = ("cache.merged",)


@register_pass
class SmallCausalMask(TopPass):
    """A dynamic net's baked causal mask becomes FAttention's small mask, which holds at whatever lengths the runtime sets."""

    name = "small-causal-mask"
    target = "bm1684x"
    module = "small_causal_mask"
    applies_to = frozenset({BLOCK, BLOCK_KV})
    dynamic_only = True
    requires = ("attention.fused",)
    ensures = ("mask.any-length",)


@register_pass
class DynamicSequence(TopPass):
    """A dynamic net's Reshapes and Slices open along its sequence axes (followed from its inputs), so it runs at any length."""

    name = "dynamic-sequence"
    target = "bm1684x"
    module = "dynamic_sequence"
    applies_to = frozenset({BLOCK, BLOCK_KV})
    dynamic_only = True
    requires = ("attention.fused",)  # FAttention's own shapes are its kernel's to adapt
    ensures = ("shapes.any-length",)


TOP_PIPELINE = ("keep-checkpoint-codes", "quantize-weights", "fuse-flash-attention", "merge-cache-concat",
                "small-causal-mask", "dynamic-sequence")


def passes_for(kind: str, pipeline: tuple[str, ...] = TOP_PIPELINE, dynamic: bool = False,
               codes: bool = False, mode: str = "") -> tuple[str, ...]:
    """The passes of `pipeline` that apply to networks of `kind` (compiled --dynamic or not, with checkpoint
    codes or not, in model_deploy's --quantize `mode`), in order."""
    return tuple(name for name in pipeline if kind in get_pass(name).applies_to
                 and (dynamic or not getattr(get_pass(name), "dynamic_only", False))
                 and (codes or not getattr(get_pass(name), "codes_only", False))
                 and mode in getattr(get_pass(name), "modes", {mode}))


def digest() -> str:
    """A hash of the passes' source: compiled nets cached under an older version are not reused."""
    sha = hashlib.sha256()
    for path in sorted(HERE.glob("*.py")):
        if not path.name.endswith("_test.py"):
            sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()[:16]


def apply(toolchain, mlir: Path, passes: tuple[str, ...], log: Path, dynamic: bool = False,
          codes: Path | None = None, weight_bits: int | None = None, q_group_size: int | None = None,
          threads: int | None = None) -> list[dict]:
    """Rewrites `mlir` in place (the original kept as NAME_unfused.mlir); returns each pass's report.
    `dynamic`: the net is compiled --dynamic; `codes`: its checkpoint codes file; `weight_bits` and `q_group_size`:
    model_deploy's weight-only mode (4 for W4BF16) and its groups; `threads`: the compile job's share of the cores.
    A failure raises CalledProcessError with the output in `log`."""
    original = mlir.with_name(f"{mlir.stem}_unfused.mlir")
    mlir.replace(original)
    modules = [f"{get_pass(name).module}:{name}" for name in passes]
    command = [str(toolchain.python), str(HERE / "run.py"), str(original), str(mlir),
               json.dumps({DYNAMIC: dynamic, "codes": str(codes.absolute()) if codes else None,
                           "weight_bits": weight_bits or 0, "q_group_size": q_group_size or 0}),
               *modules]  # the JSON is run.py's Context(dynamic=..., codes=..., weight_bits=..., q_group_size=...)
    with open(log, "a") as handle:
        handle.write(f"$ top passes: {' '.join(passes)}\n")
        handle.flush()
        done = subprocess.run(command, cwd=mlir.parent, env=toolchain.environ(threads), stdout=subprocess.PIPE,
                              stderr=handle, stdin=subprocess.DEVNULL, text=True)
        handle.write(done.stdout)
    if done.returncode:
        original.replace(mlir)
        raise subprocess.CalledProcessError(done.returncode, command)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
