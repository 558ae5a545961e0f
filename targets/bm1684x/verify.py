"""The bmodel checked without the chip: each net in the cmodel simulator against onnxruntime
on the same inputs, then a whole greedy generation driven like the chip runtime.

Both compare with the reference of the same precision (`quantized`: the output directory's
ONNX networks, with W4/W8 weights fake-quantized as TPU-MLIR stores them) and report the
distance to the fp32 networks as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphopt import contract as c
from graphopt.checks import (CHECK_SAMPLING, MAX_PROB_ERR, chat_prompts, chat_turns, end_to_end_prompt, long_prompt,
                             draw_error, sample_inputs)
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
    baked = dict(spec.baked)
    device = iter(spec.input_shapes)
    inputs = [TensorSpec(i["name"], baked[i["name"]] if i["name"] in baked else next(device), TensorSpec.from_json(i).dtype)
              for i in net["inputs"]]
    vocab = int(manifest["model"]["config"]["vocab_size"])
    feeds = {i.name: v.numpy() for i, v in zip(inputs, sample_inputs(inputs, manifest["seq_length"], vocab))}
    device_inputs = [i.name for i in inputs if i.name not in baked]
    dims, rows = dynamic_launch(spec, device_inputs, feeds) if baked else ((), None)
    launched = c.contract_of_manifest(manifest).spec(spec.name).launch_length
    dims, ort_feeds = length_launch(spec, device_inputs, launched, feeds) if launched else (dims, feeds)
    simulated = sim.run(bmodel, spec.name, feeds, spec.stage, dims)
    session = ort_session if not spec.stage else lambda path: ort_session_for(path, spec.input_shapes)
    reference = session(quantized / net["file"]).run(None, ort_feeds)
    fp32 = session(folder / net["file"]).run(None, ort_feeds) if spec.weight_bits else reference
    if rows is not None:  # a dynamic launch writes its rows only
        reference, fp32, simulated = ([v[:, :rows] for v in values] for values in (reference, fp32, simulated))
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


def dynamic_launch(spec: DeploySpec, device_inputs: list[str], feeds: dict[str, np.ndarray]):
    """A dynamic net checked at other lengths than it was compiled for, as the runtime launches it: 3/4 of its
    rows, after half of its cache rows (block_kv_i). Returns (the launch's dims, its rows), and sets the
    feeds' baked mask to what the net computes at those lengths."""
    rows = max(1, spec.input_shapes[0][1] * 3 // 4)
    history = max(1, spec.input_shapes[device_inputs.index(c.HISTORY_K)][1] // 2) if c.HISTORY_K in device_inputs else 0
    for name, shape in spec.baked:
        feeds[name] = c.launch_mask(shape, rows, history)
    return c.launch_dims(device_inputs, rows, history), rows


def length_launch(spec: DeploySpec, device_inputs: list[str], launched: tuple[str, ...], feeds: dict[str, np.ndarray]):
    """A net whose inputs `launched` run at the launch's length (sample_head's ids) checked at 3/4 of their
    rows: returns (the launch's dims, the feeds onnxruntime runs: those inputs cut to that length, which the
    ONNX network takes along its dynamic axis); the simulator gets the whole feeds and reads that many rows."""
    dims, cut = [], dict(feeds)
    for name in launched:
        index = device_inputs.index(name)
        rows = max(1, spec.input_shapes[index][1] * 3 // 4)
        dims.append((index, 1, rows))
        cut[name] = feeds[name][:, :rows]
    return tuple(dims), cut


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
    result = {"ok": all(r["ok"] for r in runs), "runs": runs}
    if runtimes[0].contract.has(c.BLOCK_KV):
        result["chat"] = chat_check(runtimes[0], runtimes[1], chat_prompts(vocab, rows, seq))
        result["ok"] = result["ok"] and result["chat"]["ok"]
    if runtimes[0].contract.has(c.SAMPLE_HEAD):
        prompt = end_to_end_prompt(vocab, seq)[:rows]
        ours, reference = (runtime_for(backend, manifest, sampling=CHECK_SAMPLING) for backend in (
            SimBackend(sim, bmodel), OrtBackend(quantized, manifest)))
        result["sampled"] = sampled_check(ours, reference, prompt, min(new_tokens, ours.room(prompt)))
        result["ok"] = result["ok"] and result["sampled"]["ok"]
    return result


def sampled_check(ours, reference, prompt: list[int], new_tokens: int) -> dict:
    """A sampled generation of the simulated bmodel against the same on onnxruntime, the same seed. Every
    simulated draw is from transformers' distribution on the simulated logits with the ids the chip was
    given (the chip's sample_head and the runtime's writes, to MAX_PROB_ERR); while the tokens so far are
    the same, the logits agree as a greedy generation's must (MIN_LOGIT_COSINE). How far the two draws'
    distributions are (total variation) is reported: where it is larger than the draw's margin, the tokens part."""
    got, want = ours.generate(prompt, new_tokens), reference.generate(prompt, new_tokens)
    distance, prob_err, min_cos = 0.0, 0.0, 1.0
    for step, (a, b) in enumerate(zip(got.draws, want.draws)):
        prob_err = max(prob_err, draw_error(got.logits[step], a, ours.sampling))
        if got.tokens[:step] == want.tokens[:step]:
            min_cos = min(min_cos, cosine(got.logits[step], want.logits[step]))
            p, q = (dict(zip(d.candidates.tolist(), d.probs.tolist())) for d in (a, b))
            distance = max(distance, 0.5 * sum(abs(p.get(t, 0.0) - q.get(t, 0.0)) for t in p.keys() | q.keys()))
    parted = next((i for i, (a, b) in enumerate(zip(got.tokens, want.tokens)) if a != b), None)
    return {"tokens": got.tokens, "reference_tokens": want.tokens, "tokens_identical": parted is None,
            "first_difference": parted, "max_draw_distance": distance, "max_prob_err": prob_err, "min_logit_cosine": min_cos,
            "ok": prob_err <= MAX_PROB_ERR and min_cos >= MIN_LOGIT_COSINE}


def chat_check(ours, reference, prompts: list[list[int]]) -> dict:
    """A three-turn history-KV chat on the simulated bmodel against the same chat on onnxruntime, turn by turn
    (the onnxruntime chat is held to full prefills of the conversation by the run's end-to-end check). Where
    a turn's answers part at a near-tie, the sessions' caches differ from then on: later turns are not compared."""
    turns = []
    for (conversation, got), (_, want) in zip(chat_turns(ours, prompts), chat_turns(reference, prompts)):
        turns.append({"prompt_length": len(conversation), "tokens": got.tokens, "reference_tokens": want.tokens,
                      **compare_greedy(want.tokens, want.logits, got.tokens, got.logits)})
        if not turns[-1]["tokens_identical"]:
            break
    return {"turns": turns, "ok": all(t["ok"] for t in turns)}


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
