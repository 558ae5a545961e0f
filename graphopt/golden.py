"""Golden outputs: record transformers' greedy generation once, then hold every compiler stage to it.

A golden is two files in a directory: `NAME.json` (model, prompt, tokens, the versions that
recorded it) and `NAME.logits.npz` (the logits of every step). `check` compiles the model and
drives each stage the way the chip runtime would (pad to SEQ, prefill, decode with the cache):

  reference  transformers today: a new release that moves the numbers fails here, by itself
  fx         the rewritten FX graphs, in torch
  onnx       the emitted ONNX files, in onnxruntime
  target     a hardware target's own artifact (bm1684x: the bmodel in TPU-MLIR's simulator)

Float stages must give the golden tokens exactly and its logits within their tolerance; 16-bit
target stages may resolve a near-tie the other way (verify.compare_greedy). On failure the report
adds, per network, the compile's own stage checks, to say where the numbers moved.
`graphopt golden record|check` and the pytest fixture `golden_check` (graphopt.pytest_plugin) use it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphopt.checks import END_TO_END_PROMPT
from graphopt.errors import GraphoptError

DEFAULT_PROMPT = END_TO_END_PROMPT
DEFAULT_NEW_TOKENS = 32
DEFAULT_SEQ_LENGTH = 64
# Largest logit error each float stage may add (all in fp32; 1e-4 on logits of order 1).
TOLERANCES = {"reference": 1e-4, "fx": 1e-4, "onnx": 1e-4}


@dataclass
class Golden:
    name: str
    model: str  # what it was recorded from: a registry name or a Hugging Face directory
    prompt: list[int]
    tokens: list[int]
    logits: np.ndarray  # [new_tokens, vocab]
    recorded_with: dict = field(default_factory=dict)

    @staticmethod
    def paths(directory: Path, name: str) -> tuple[Path, Path]:
        return directory / f"{name}.json", directory / f"{name}.logits.npz"

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        meta, logits = self.paths(directory, self.name)
        data = {"model": self.model, "prompt": self.prompt, "new_tokens": len(self.tokens), "tokens": self.tokens,
                "recorded_with": self.recorded_with}
        _write_atomically(logits, lambda f: np.savez_compressed(f, logits=self.logits.astype(np.float32)))
        _write_atomically(meta, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))

    @classmethod
    def load(cls, directory: Path, name: str) -> "Golden":
        meta, logits = cls.paths(directory, name)
        if not meta.is_file() or not logits.is_file():
            raise GraphoptError(f"there is no golden '{name}' in {directory} ({meta.name} and {logits.name}); record "
                                f"one with `graphopt golden record MODEL --dir {directory}`.")
        data = json.loads(meta.read_text())
        return cls(name, data["model"], data["prompt"], data["tokens"], np.load(logits)["logits"],
                   data.get("recorded_with", {}))


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        write(f)
    partial.replace(path)


def golden_name(model: str) -> str:
    """A registry name, a Hugging Face directory's name, or a model file's stem."""
    path = Path(model)
    return path.stem if path.suffix == ".py" else path.name if path.is_dir() else model


def record(model: str, directory: Path, *, name: str | None = None, model_path: str | None = None,
           prompt: list[int] | None = None, new_tokens: int = DEFAULT_NEW_TOKENS) -> Golden:
    """transformers' greedy generation on `model` (its seeded weights, or the checkpoint's), saved as a golden."""
    import torch
    import transformers

    from graphopt.models import open_model

    prompt = list(prompt or DEFAULT_PROMPT)
    reference = open_model(model, model_path).greedy(prompt, new_tokens)
    golden = Golden(name or golden_name(model), model, prompt, reference["tokens"], np.stack(reference["logits"]),
                    {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]})
    golden.save(Path(directory))
    return golden


@dataclass
class StageResult:
    stage: str
    tokens: list[int]
    max_logit_err: float
    ok: bool
    detail: str = ""


@dataclass
class GoldenReport:
    golden: Golden
    stages: list[StageResult]
    networks: list[tuple[str, str, float, bool]]  # (network, compile check, max abs error, ok)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)

    def table(self) -> str:
        g = self.golden
        lines = [f"golden '{g.name}' ({g.model}, {len(g.tokens)} tokens, recorded with "
                 f"{', '.join(f'{k} {v}' for k, v in g.recorded_with.items())})",
                 f"  {'stage':<10} {'tokens':<24} {'max logit error':>16}  {'':<4} detail"]
        for s in self.stages:
            same = sum(a == b for a, b in zip(s.tokens, g.tokens))
            tokens = "identical" if s.tokens == g.tokens else f"{same}/{len(g.tokens)} equal"
            lines.append(f"  {s.stage:<10} {tokens:<24} {s.max_logit_err:>16.2e}  {'ok' if s.ok else 'FAIL':<4} "
                         f"{s.detail}")
        if not self.ok and self.networks:
            lines.append("  per network, the compile's own stage checks (max abs error against the stage before):")
            lines += [f"    {net:<24} {stage:<30} {err:>10.2e}  {'ok' if ok else 'FAIL'}"
                      for net, stage, err, ok in self.networks]
        return "\n".join(lines)


def check(model: str, directory: Path, *, name: str | None = None, model_path: str | None = None,
          target: str = "onnx", seq_length: int = DEFAULT_SEQ_LENGTH, plugins=None, tolerances: dict | None = None,
          target_options: dict | None = None) -> GoldenReport:
    """Compile `model` for `target` (with user passes from `plugins`) and compare every stage with the golden."""
    from graphopt.compiler import compile_model
    from graphopt.models import open_model
    from graphopt.runtime import FxBackend, OrtBackend, run_prompt, runtime_for
    from graphopt.targets import get_target
    from graphopt.targets.bm1684x.contract import DEFAULT_GROUP_SIZE

    golden = Golden.load(Path(directory), name or golden_name(model))
    tolerances = {**TOLERANCES, **(tolerances or {})}
    source = open_model(model, model_path)
    new_tokens = len(golden.tokens)
    stages = [_float_stage("reference", golden, source.greedy(golden.prompt, new_tokens), tolerances)]
    options = {"quantize": "bf16", "group_size": DEFAULT_GROUP_SIZE, "jobs": None, **(target_options or {})}
    with tempfile.TemporaryDirectory(prefix="graphopt-golden-") as scratch:
        build = compile_model(source, get_target(target), seq_length, Path(scratch) / "out", keep_fx=True,
                              show_progress=False, plugins=plugins, target_options=options)
        for stage, backend in (("fx", FxBackend(build.fx_networks)), ("onnx", OrtBackend(build.out_dir, build.manifest))):
            result = run_prompt(runtime_for(backend, build.manifest, backend.head_logits()), golden.prompt, new_tokens)
            stages.append(_float_stage(stage, golden, {"tokens": result.tokens, "logits": result.logits}, tolerances))
        if build.target is not None:
            stages.append(_target_stage(build, golden))
    networks = [(n.name, c.stage, c.max_abs_err, c.ok) for n in build.networks for c in n.checks]
    return GoldenReport(golden, stages, networks)


def _float_stage(stage: str, golden: Golden, got: dict, tolerances: dict) -> StageResult:
    tokens, logits = got["tokens"], got["logits"]
    steps = min(len(logits), len(golden.logits))
    err = float(np.max(np.abs(np.stack(logits[:steps]) - golden.logits[:steps]))) if steps else float("inf")
    ok = tokens == golden.tokens and err <= tolerances[stage]
    return StageResult(stage, tokens, err, ok, f"tolerance {tolerances[stage]:.0e}")


def _target_stage(build, golden: Golden) -> StageResult:
    """The target's artifact, driven like the chip: bm1684x's bmodel in the simulator."""
    from graphopt.runtime import head_logits_for, run_prompt, runtime_for
    from graphopt.targets.bm1684x import toolchain
    from graphopt.targets.bm1684x.build import simulator_log
    from graphopt.targets.bm1684x.simulator import SimBackend, Simulator
    from graphopt.targets.bm1684x.verify import compare_greedy

    bmodel = build.out_dir / build.target.bmodel
    with Simulator(toolchain.require(), simulator_log(), build.target.memory.get("total", 0)) as sim:
        # A token-out lm_head answers no logits: they are its reference head's over the row the chip fed it.
        runtime = runtime_for(SimBackend(sim, bmodel, build.manifest), build.manifest,
                              head_logits_for(build.out_dir, build.manifest))
        result = run_prompt(runtime, golden.prompt, len(golden.tokens))
    verdict = compare_greedy(golden.tokens, list(golden.logits), result.tokens, result.logits)
    detail = (f"{build.target.quantize}; min logit cosine {verdict['min_logit_cosine']:.5f}" +
              ("" if verdict["tokens_identical"] else f"; differs from token {verdict['first_difference']} "
               f"(golden top-2 margin {verdict['margin_at_difference']:.3f})"))
    # The build's own checks (every net against onnxruntime, the contract) count too.
    detail += "" if build.target.ok else "; the target's own checks FAILED (see bm1684x.json)"
    return StageResult("target", result.tokens, verdict["max_abs_logit_err"], verdict["ok"] and build.target.ok,
                       detail)
