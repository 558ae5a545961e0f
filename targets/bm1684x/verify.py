"""The bmodel checked without the chip: each net in the cmodel simulator against onnxruntime
on the same inputs, then a whole greedy generation driven like the chip runtime.

Both compare with the reference of the same precision (`quantized`: the output directory's
ONNX networks, with W4/W8 weights fake-quantized as TPU-MLIR stores them) and report the
distance to the fp32 networks as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphopt.checks import end_to_end_prompt, long_prompt, sample_inputs
from graphopt.ir import TensorSpec
from graphopt.runtime import OrtBackend, head_logits_for, ort_session, run_prompt, runtime_for
from graphopt.targets.bm1684x.contract import MIN_COSINE, MIN_COSINE_VS_FP32, MIN_LOGIT_COSINE, DeploySpec
from graphopt.targets.bm1684x.simulator import SimBackend, Simulator


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm == 0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norm)


def network_similarity(sim: Simulator, bmodel: Path, spec: DeploySpec, manifest: dict, folder: Path,
                       quantized: Path) -> dict:
    """One net of the bmodel against onnxruntime: cosine per float output, the share of equal
    values per integer output (token ids)."""
    net = next(n for n in manifest["networks"] if n["name"] == spec.onnx_network)
    inputs = [TensorSpec(i["name"], shape, TensorSpec.from_json(i).dtype)
              for i, shape in zip(net["inputs"], spec.input_shapes)]
    vocab = int(manifest["model"]["config"]["vocab_size"])
    feeds = {i.name: v.numpy() for i, v in zip(inputs, sample_inputs(inputs, manifest["seq_length"], vocab))}
    simulated = sim.run(bmodel, spec.name, feeds, spec.stage)
    session = ort_session if not spec.stage else lambda path: ort_session_for(path, spec.input_shapes)
    reference = session(quantized / net["file"]).run(None, feeds)
    fp32 = session(folder / net["file"]).run(None, feeds) if spec.weight_bits else reference
    outputs = {}
    for out, ref, full, got in zip(net["outputs"], reference, fp32, simulated):
        if np.issubdtype(ref.dtype, np.floating):
            outputs[out["name"]] = {"cosine": cosine(ref, got), "cosine_fp32": cosine(full, got)}
        else:
            outputs[out["name"]] = {"equal": float(np.mean(ref.reshape(got.shape) == got))}
    worst = min(v.get("cosine", v.get("equal")) for v in outputs.values())
    worst_fp32 = min(v.get("cosine_fp32", v.get("equal")) for v in outputs.values())
    floor = MIN_COSINE_VS_FP32.get(spec.precision, 0.0)
    return {"precision": spec.precision, "threshold": MIN_COSINE, "threshold_fp32": floor or None,
            "outputs": outputs, "worst": worst, "worst_fp32": worst_fp32,
            "ok": worst >= MIN_COSINE and worst_fp32 >= floor}


def ort_session_for(path: Path, shapes) -> object:
    """An onnxruntime session of `path` with its inputs at `shapes`: a decode stage's shorter cache (the
    network's Reshapes hold no sequence length, which is why TPU-MLIR compiles the same file for it)."""
    import onnx

    model = onnx.load(str(path))
    for value, shape in zip(model.graph.input, shapes):
        for dim, size in zip(value.type.tensor_type.shape.dim, shape):
            dim.Clear()
            dim.dim_value = int(size)
    for value in model.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            dim.Clear()
    del model.graph.value_info[:]
    return ort_session(model.SerializeToString())


def generation_check(sim: Simulator, bmodel: Path, manifest: dict, folder: Path, quantized: Path,
                     new_tokens: int = 16) -> dict:
    """Greedy tokens of the simulated bmodel, driven as the chip runtime drives it (on the bmodel's own
    device memory, with the runtime's bits), against the ONNX networks in onnxruntime under the same
    driver: for a short prompt and one of 3/4 SEQ (sources, for an encoder-decoder model). One runtime
    per backend serves both prompts, as one chat session does on the chip."""
    vocab, seq = manifest["model"]["config"]["vocab_size"], manifest["seq_length"]
    runtimes = [runtime_for(backend, manifest, head_logits_for(directory, manifest)) for backend, directory in (
        (SimBackend(sim, bmodel), quantized), (OrtBackend(quantized, manifest), quantized),
        (OrtBackend(folder, manifest), folder))]
    runs = []
    rows = runtimes[0].shapes.prefill_rows  # the prefill's rows: SEQ, or --max-input-length
    for prompt in (end_to_end_prompt(vocab, seq)[:rows], long_prompt(vocab, rows)):
        steps = min(new_tokens, runtimes[0].room(prompt))
        ours, reference, fp32 = (run_prompt(runtime, prompt, steps) for runtime in runtimes)
        runs.append({"prompt_length": len(prompt), "tokens": ours.tokens, "reference_tokens": reference.tokens,
                     **compare_greedy(reference.tokens, reference.logits, ours.tokens, ours.logits),
                     "fp32_tokens": fp32.tokens,
                     "fp32_agreement": sum(a == b for a, b in zip(fp32.tokens, ours.tokens)) / len(fp32.tokens)})
    return {"ok": all(r["ok"] for r in runs), "runs": runs}


def compare_greedy(ref_tokens, ref_logits, tokens, logits) -> dict:
    """Greedy decoding must not change, except at a near-tie: where the reference's best two
    logits are closer than twice the candidate's logit error, 16-bit arithmetic may pick either.
    That excuse holds only while the logits otherwise agree (cosine >= MIN_LOGIT_COSINE): logits
    that are wrong altogether make every margin look small."""
    same = [a == b for a, b in zip(ref_tokens, tokens)]
    first_diff = same.index(False) if False in same else None
    # Logits are comparable up to the first differing token; after it the histories differ.
    steps = len(same) if first_diff is None else first_diff + 1
    pairs = list(zip(ref_logits[:steps], logits[:steps]))
    result = {"tokens_identical": all(same), "first_difference": first_diff,
              "min_logit_cosine": min(cosine(a, b) for a, b in pairs),
              "max_abs_logit_err": max(float(np.max(np.abs(a - b))) for a, b in pairs)}
    if first_diff is not None:
        top2 = np.sort(ref_logits[first_diff])[-2:]
        result["margin_at_difference"] = float(top2[1] - top2[0])
    result["ok"] = first_diff is None or (result["margin_at_difference"] < 2 * result["max_abs_logit_err"]
                                          and result["min_logit_cosine"] >= MIN_LOGIT_COSINE)
    return result
