"""What every run checks, network by network: seeded inputs a runtime could send, stage-against-stage
comparisons, and each decode block against its prefill block.

Decode blocks are the one network with nothing independent to compare with: their rewritten form
has inputs the traced layer does not (the cache), so "fx-rewritten vs traced" cannot be run, and
onnxruntime against the rewritten FX graph only proves the export. `decode_check` holds them to
what they must compute: decoding row r, with the cache the prefill produced for rows < r, gives
row r of the prefill (hidden states and the new K/V), on the same weights. The cache rows from r on
hold noise, as a runtime's cache holds stale rows there that the mask must hide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphopt import contract as c
from graphopt.ir import NetworkGraph, TensorSpec
from graphopt.runtime import Sampling


@dataclass
class Check:
    """Largest error of one stage against the one before, on the same inputs."""

    stage: str
    max_abs_err: float  # over floating-point outputs
    scale: float  # largest magnitude in the reference's floating-point outputs
    integers_equal: bool = True  # integer outputs (token ids) must match exactly

    @property
    def ok(self) -> bool:
        return self.integers_equal and self.max_abs_err <= 1e-4 * max(1.0, self.scale)

    def to_json(self) -> dict:
        return {"stage": self.stage, "max_abs_err": self.max_abs_err, "scale": self.scale,
                "integers_equal": self.integers_equal, "ok": self.ok}


def check_inputs(net: NetworkGraph, vocab: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return sample_inputs(net.inputs, net.seq_length, vocab, seed)


def sample_inputs(inputs: list[TensorSpec], seq_length: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded inputs a runtime could really send: token ids in the vocabulary, causal masks, ..."""
    g = torch.Generator().manual_seed(seed)
    seq = seq_length
    sampling = {c.TOP_P: 0.8, c.TEMPERATURE: 0.7, c.PENALTY: 1.1, c.TOP_K: 7}
    values = []
    for spec in inputs:
        if spec.name == c.INPUT_IDS:
            values.append(torch.randint(0, vocab, spec.shape, generator=g))
        elif spec.name == c.POSITION_IDS:
            steps = spec.shape[1]
            values.append((torch.arange(steps) if steps > 1 else torch.tensor([seq // 2])).view(spec.shape))
        elif spec.name == c.SOURCE_VALID and len(spec.shape) == 2:  # an encoder's: 1 = token, 0 = padding
            mask = torch.ones(spec.shape, dtype=spec.dtype)
            mask[:, spec.shape[1] * 3 // 4:] = 0
            values.append(mask)
        elif spec.name == c.ENCODER_ATTENTION_MASK:  # additive, the source's last quarter padding
            values.append(torch.from_numpy(c.source_mask(spec.shape[-1], spec.shape[-1] * 3 // 4, spec.shape[2])))
        elif spec.name == c.ATTENTION_MASK:
            steps, keys = spec.shape[2], spec.shape[3]
            # prefill: every row a prompt row; decode: a new token halfway into the cache (of keys - 1 rows:
            # SEQ, or a decode stage's fewer); a history-KV chunk: every row new, after half a cache
            values.append(torch.from_numpy(c.causal_mask(steps, keys, steps) if steps == keys else
                                           c.decode_mask(keys - 1, (keys - 1) // 2) if steps == 1 else
                                           c.chunk_mask(steps, keys - steps, steps, (keys - steps) // 2)))
        elif spec.name in sampling:
            values.append(torch.full(spec.shape, sampling[spec.name], dtype=spec.dtype))
        else:
            values.append(torch.randn(spec.shape, generator=g, dtype=spec.dtype))
    return tuple(values)


def compare(stage: str, reference, candidate) -> Check:
    check = Check(stage, 0.0, 0.0)
    for ref, got in zip(reference, candidate):
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape != got.shape:
            return Check(stage, float("inf"), 0.0, False)
        if not np.issubdtype(ref.dtype, np.floating):
            check.integers_equal &= bool(np.array_equal(ref, got))
            continue
        check.max_abs_err = max(check.max_abs_err, float(np.max(np.abs(ref.astype(np.float64) - got))))
        check.scale = max(check.scale, float(np.max(np.abs(ref))))
    return check


END_TO_END_PROMPT = [1, 17, 300, 42, 5, 900, 64, 7]  # also the goldens' (graphopt/golden.py)


def end_to_end_prompt(vocab: int, seq_length: int) -> list[int]:
    """The fixed prompt (or source) the end-to-end checks generate from, fitted to the vocabulary and SEQ."""
    return [t % int(vocab) for t in END_TO_END_PROMPT][: seq_length - 1]


def long_prompt(vocab: int, rows: int) -> list[int]:
    """A seeded prompt of 3/4 of the prefill's rows (SEQ, or --max-input-length): a runtime's copies of
    the prompt's rows between nets reach far into their tensors, where a short prompt leaves everything
    past its first rows untouched."""
    return np.random.default_rng(0).integers(0, int(vocab), rows * 3 // 4).tolist()


def decode_rows(seq_length: int) -> list[int]:
    """The rows a decode block is checked at: the first two, the middle and the last."""
    return sorted({0, min(1, seq_length - 1), seq_length // 2, seq_length - 1})


def decode_feeds(decode_inputs: list[TensorSpec], prefill_feeds: dict[str, np.ndarray],
                 prefill_outputs: dict[str, np.ndarray], seq_length: int, row: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The inputs a runtime gives the decode block for row `row` after prefilling rows < row."""
    feeds = {}
    for spec in decode_inputs:
        name = spec.name
        if name == c.INPUT_STATES:
            feeds[name] = prefill_feeds[name][:, row:row + 1]
        elif name == c.POSITION_IDS:
            feeds[name] = np.array([[row]], dtype=prefill_feeds[name].dtype)
        elif name == c.ATTENTION_MASK:
            feeds[name] = c.decode_mask(seq_length, row)
        elif name == c.ENCODER_ATTENTION_MASK:  # one row of the prefill's source mask
            feeds[name] = prefill_feeds[name][:, :, row:row + 1]
        elif name in c.HISTORY_INPUTS:  # SEQ rows: the prefill's before `row`, stale (noise) from it on
            feeds[name] = _cache(name, spec.shape[1], prefill_outputs, row, rng)
        else:  # cross_k, cross_v: the same for every row
            feeds[name] = prefill_feeds[name]
    return feeds


def _cache(name: str, rows: int, prefill_outputs: dict[str, np.ndarray], written: int,
           rng: np.random.Generator) -> np.ndarray:
    """A cache input (history_k/v) of `rows` rows as a runtime holds it after prefilling `written` rows: those
    rows the prefill's K/V, the rest stale (noise of the K/V's scale), which the mask must hide."""
    prefill = prefill_outputs[c.KV_OUTPUTS[c.HISTORY_INPUTS.index(name)]]
    cache = rng.standard_normal((prefill.shape[0], rows, *prefill.shape[2:])).astype(prefill.dtype)
    cache *= float(np.std(prefill) or 1.0)
    cache[:, :written] = prefill[:, :written]
    return cache


def decode_check(run_decode, decode_inputs: list[TensorSpec], decode_outputs: list[str],
                 prefill_feeds: dict[str, np.ndarray], prefill_outputs: dict[str, np.ndarray],
                 seq_length: int) -> Check:
    """`run_decode(feeds) -> outputs` (in `decode_outputs` order) at every row of `decode_rows`,
    against the prefill's row: the largest error over all of them."""
    rng = np.random.default_rng(0)
    rows = decode_rows(prefill_feeds[c.INPUT_STATES].shape[1])  # the prefill's rows (--max-input-length)
    reference, candidate = [], []
    for row in rows:
        outputs = run_decode(decode_feeds(decode_inputs, prefill_feeds, prefill_outputs, seq_length, row, rng))
        for name, got in zip(decode_outputs, outputs):
            reference.append(prefill_outputs[name][:, row:row + 1])
            candidate.append(got)
    return compare(f"decode vs prefill (rows {', '.join(map(str, rows))})", reference, candidate)


def history_splits(rows: int) -> list[int]:
    """The cache rows a history-KV chunk is checked after: one, and half of the prefill's rows."""
    return sorted({min(1, rows - 1), rows // 2} - {0}) or [0]


def history_feeds(inputs: list[TensorSpec], prefill_feeds: dict[str, np.ndarray], prefill_outputs: dict[str, np.ndarray],
                  history: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The inputs a runtime gives block_kv_i for the prefill's rows from `history` on, as one chunk, after
    prefilling the rows before: the chunk at the top of its rows (the rest padding: zero positions, noise),
    the cache's first `history` rows the prefill's, the rest of it noise."""
    rows = prefill_feeds[c.INPUT_STATES].shape[1]
    chunk = rows - history
    feeds = {}
    for spec in inputs:
        name = spec.name
        if name == c.INPUT_STATES:
            value = rng.standard_normal(spec.shape).astype(prefill_feeds[name].dtype)
            value[:, :chunk] = prefill_feeds[name][:, history:]
            feeds[name] = value
        elif name == c.POSITION_IDS:
            value = np.zeros(spec.shape, prefill_feeds[name].dtype)
            value[:, :chunk] = np.arange(history, rows)
            feeds[name] = value
        elif name == c.ATTENTION_MASK:
            steps, keys = spec.shape[2], spec.shape[3]
            feeds[name] = c.chunk_mask(steps, keys - steps, chunk, history)
        elif name in c.HISTORY_INPUTS:
            feeds[name] = _cache(name, spec.shape[1], prefill_outputs, history, rng)
    return feeds


def history_check(run_chunk, inputs: list[TensorSpec], outputs: list[str], prefill_feeds: dict[str, np.ndarray],
                  prefill_outputs: dict[str, np.ndarray]) -> Check:
    """`run_chunk(feeds) -> outputs` (block_kv_i) for the prefill's rows after each of `history_splits`, as a
    chunk against the cache the prefill made of the rows before: its rows are the prefill's."""
    rng = np.random.default_rng(0)
    rows = prefill_feeds[c.INPUT_STATES].shape[1]
    splits = history_splits(rows)
    reference, candidate = [], []
    for history in splits:
        got = run_chunk(history_feeds(inputs, prefill_feeds, prefill_outputs, history, rng))
        for name, value in zip(outputs, got):
            reference.append(prefill_outputs[name][:, history:])
            candidate.append(np.asarray(value)[:, :rows - history])
    return compare(f"history chunk vs prefill (after {', '.join(map(str, splits))} rows)", reference, candidate)


CHAT_NEW_TOKENS = 4  # answered per turn of the chat check


def chat_prompts(vocab: int, rows: int, seq_length: int) -> list[list[int]]:
    """Three seeded turns of a chat for a history-KV session: the first longer than a prefill chunk (`rows`),
    so it runs as two chunks (block_i, then block_kv_i after the first), the others short; all of them with
    their answers fit in SEQ."""
    rng = np.random.default_rng(1)
    lengths = [min(rows + max(1, rows // 2), seq_length // 3), max(1, min(6, seq_length // 8)),
               max(1, min(5, seq_length // 8))]
    return [rng.integers(0, int(vocab), n).tolist() for n in lengths]


def chat_turns(runtime, prompts: list[list[int]], new_tokens: int = CHAT_NEW_TOKENS):
    """A history-KV chat on `runtime` (cleared first): each prompt continues the session. Yields (the
    conversation so far, as an exactly counted cache holds it with this turn's prompt, the turn's
    Generation); the answer's last token never enters the cache, so the next turn follows the others."""
    runtime.clear()
    conversation: list[int] = []
    for prompt in prompts:
        generation = runtime.generate(prompt, new_tokens)
        conversation += prompt
        yield list(conversation), generation
        conversation += generation.tokens[:-1]


def chat_check(runtime, greedy, prompts: list[list[int]], new_tokens: int = CHAT_NEW_TOKENS) -> dict:
    """Three turns of a history-KV chat against one full prefill of the whole conversation at each turn
    (`greedy(tokens, n) -> {"tokens", "logits"}`: the model's own generation). The runtime counts the
    cache's rows here (`exact_history`), not as LLM-TPU's cpp_demo does, one past them after a second turn."""
    runtime.exact_history = True
    turns = [{"prompt_length": len(conversation), **_against_reference(greedy(conversation, len(ours.tokens)), ours)}
             for conversation, ours in chat_turns(runtime, prompts, new_tokens)]
    return {"turns": turns, "ok": all(t["ok"] for t in turns)}


def _against_reference(reference: dict, ours) -> dict:
    """A Generation against the model's own greedy generation (`{"tokens", "logits"}`): the same tokens, and
    logits within 1e-3."""
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(reference["logits"], ours.logits))
    same = reference["tokens"] == ours.tokens
    return {"tokens": ours.tokens, "reference_tokens": reference["tokens"], "tokens_identical": same,
            "max_abs_logit_err": err, "ok": same and err <= 1e-3}


# What the sampling checks sample with: every parameter away from its no-op value, and a penalty window
# shorter than the prompt (only the turn's last tokens penalised).
CHECK_SAMPLING = Sampling(penalty=1.3, temperature=0.7, top_k=10, top_p=0.9, window=6, seed=0)
MAX_PROB_ERR = 1e-5  # a sample head's probabilities against transformers' processors on the same logits


def transformers_probs(logits: np.ndarray, penalised: np.ndarray, sampling) -> tuple[np.ndarray, np.ndarray]:
    """The distribution transformers' generate(do_sample=True) draws from, given a step's logits and the ids
    its repetition penalty sees (its own logits processors, in its order, then a softmax), and the scores
    its top_k and top_p chose from (after the penalty and the temperature). One change: top_k keeps exactly
    top_k tokens (torch.topk's), where TopKLogitsWarper keeps the tokens tied with the top_k-th as well; a
    demo reads top_k candidates (graphopt.networks.decoder.SampleHead)."""
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopPLogitsWarper)

    ids, scores = torch.from_numpy(penalised.astype(np.int64))[None], torch.from_numpy(logits.astype(np.float32))[None]
    scores = TemperatureLogitsWarper(sampling.temperature)(ids, RepetitionPenaltyLogitsProcessor(sampling.penalty)(ids, scores))
    scaled = scores[0].numpy().copy()
    kept = torch.topk(scores, sampling.top_k).indices
    scores = torch.full_like(scores, -float("inf")).scatter(1, kept, scores.gather(1, kept))
    scores = TopPLogitsWarper(sampling.top_p)(ids, scores)
    return scores.softmax(-1)[0].numpy(), scaled


def draw_error(logits: np.ndarray, draw, sampling) -> float:
    """How far a draw (a sample head's candidates and probabilities) is from transformers' distribution on the
    same logits: the largest difference of probabilities, every token of the vocabulary, none outside the
    candidates. Tokens of equal scores are interchangeable (which of a tie TopK or torch.sort puts first is
    theirs to pick, and top_k or top_p may cut between them): the two are compared as sorted probabilities,
    once the tokens one keeps and the other does not are found to be such ties (else the error is 1)."""
    want, scaled = transformers_probs(logits, draw.penalised, sampling)
    ours = np.zeros_like(want)
    ours[draw.candidates] = draw.probs
    only_ours, only_want = (ours > 0) & (want == 0), (want > 0) & (ours == 0)
    if sorted(scaled[only_ours]) != sorted(scaled[only_want]):
        return 1.0
    return float(np.max(np.abs(np.sort(ours) - np.sort(want))))


def sampling_check(runtime, greedy, prompt: list[int], new_tokens: int) -> dict:
    """Tokens drawn through sample_head as the demos' --do_sample draws them (`runtime` samples), each step
    held two ways: the draw is from transformers' distribution (`draw_error`) on the logits lm_head gave,
    with the ids the penalty saw, to MAX_PROB_ERR; and those logits equal the model's own
    (`greedy(tokens, 1)`) along the sampled tokens, to the greedy checks' 1e-3."""
    generation = runtime.generate(prompt, new_tokens)
    prob_err = logit_err = 0.0
    for step, (logits, draw) in enumerate(zip(generation.logits, generation.draws)):
        prob_err = max(prob_err, draw_error(logits, draw, runtime.sampling))
        reference = greedy(prompt + generation.tokens[:step], 1)["logits"][0]
        logit_err = max(logit_err, float(np.max(np.abs(reference - logits))))
    return {"tokens": generation.tokens, "sampling": runtime.sampling.describe, "max_prob_err": prob_err,
            "max_abs_logit_err": logit_err, "ok": prob_err <= MAX_PROB_ERR and logit_err <= 1e-3}


def end_to_end_check(source, folder, manifest: dict, new_tokens: int = 8) -> dict:
    """Greedy tokens of the ONNX networks (driven like the chip) against the model's own generation
    (graphopt/models/reference.py); with history-KV networks, a three-turn chat as well, each turn
    against a full prefill of the conversation so far; with sampling heads, a sampled generation whose
    every draw is from transformers' distribution."""
    from graphopt.runtime import OrtBackend, run_prompt, runtime_for

    backend = OrtBackend(folder, manifest)
    runtime = runtime_for(backend, manifest, backend.head_logits())
    prompt = end_to_end_prompt(source.config.vocab_size, manifest["seq_length"])[:runtime.shapes.prefill_rows]
    new_tokens = min(new_tokens, runtime.room(prompt))
    result = {"prompt": prompt, **_against_reference(source.greedy(prompt, new_tokens),
                                                     run_prompt(runtime, prompt, new_tokens))}
    if runtime.contract.has(c.BLOCK_KV):
        prompts = chat_prompts(source.config.vocab_size, runtime.shapes.prefill_rows, manifest["seq_length"])
        result["chat"] = chat_check(runtime, source.greedy, prompts)
        result["ok"] = result["ok"] and result["chat"]["ok"]
    if runtime.contract.has(c.SAMPLE_HEAD):
        sampler = runtime_for(backend, manifest, sampling=CHECK_SAMPLING)
        result["sampled"] = sampling_check(sampler, source.greedy, prompt, new_tokens)
        result["ok"] = result["ok"] and result["sampled"]["ok"]
    return result
