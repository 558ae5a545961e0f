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

from graphopt.ir import NetworkGraph, TensorSpec
from graphopt.networks import MASK_VALUE, causal_mask, decode_mask


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
    values = []
    for spec in inputs:
        if spec.name == "input_ids":
            values.append(torch.randint(0, vocab, spec.shape, generator=g))
        elif spec.name == "position_ids":
            steps = spec.shape[1]
            values.append((torch.arange(steps) if steps > 1 else torch.tensor([seq // 2])).view(spec.shape))
        elif spec.name == "attention_mask" and len(spec.shape) == 2:  # an encoder's: 1 = token, 0 = padding
            mask = torch.ones(spec.shape, dtype=spec.dtype)
            mask[:, spec.shape[1] * 3 // 4:] = 0
            values.append(mask)
        elif spec.name == "encoder_attention_mask":  # additive, the source's last quarter padding
            mask = torch.zeros(spec.shape)
            mask[..., spec.shape[-1] * 3 // 4:] = MASK_VALUE
            values.append(mask)
        elif spec.name == "attention_mask":
            steps, keys = spec.shape[2], spec.shape[3]
            if steps == keys:
                values.append(causal_mask(steps, keys, steps))
            else:  # decode, for a new token halfway into the cache
                values.append(decode_mask(seq, seq // 2))
        elif spec.name in ("top_p", "temperature", "penalty"):
            values.append(torch.full(spec.shape, {"top_p": 0.8, "temperature": 0.7, "penalty": 1.1}[spec.name]))
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


END_TO_END_PROMPT = [1, 17, 300, 42, 5, 900, 64, 7]


def end_to_end_prompt(vocab: int, seq_length: int) -> list[int]:
    """The fixed prompt (or source) the end-to-end checks generate from, fitted to the vocabulary and SEQ."""
    return [t % int(vocab) for t in END_TO_END_PROMPT][: seq_length - 1]


def long_prompt(vocab: int, seq_length: int) -> list[int]:
    """A seeded prompt of 3/4 SEQ tokens: a runtime's copies of the prompt's rows between nets reach
    far into their tensors, where a short prompt leaves everything past its first rows untouched."""
    return np.random.default_rng(0).integers(0, int(vocab), seq_length * 3 // 4).tolist()


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
        if name == "input_states":
            feeds[name] = prefill_feeds[name][:, row:row + 1]
        elif name == "position_ids":
            feeds[name] = np.array([[row]], dtype=prefill_feeds[name].dtype)
        elif name == "attention_mask":
            feeds[name] = decode_mask(seq_length, row).numpy()
        elif name == "encoder_attention_mask":  # one row of the prefill's source mask
            feeds[name] = prefill_feeds[name][:, :, row:row + 1]
        elif name in ("history_k", "history_v"):
            cache = prefill_outputs["past_" + name[-1]].copy()
            stale = cache[:, row:]
            cache[:, row:] = rng.standard_normal(stale.shape).astype(cache.dtype) * float(np.std(cache) or 1.0)
            feeds[name] = cache
        else:  # cross_k, cross_v: the same for every row
            feeds[name] = prefill_feeds[name]
    return feeds


def decode_check(run_decode, decode_inputs: list[TensorSpec], decode_outputs: list[str],
                 prefill_feeds: dict[str, np.ndarray], prefill_outputs: dict[str, np.ndarray],
                 seq_length: int) -> Check:
    """`run_decode(feeds) -> outputs` (in `decode_outputs` order) at every row of `decode_rows`,
    against the prefill's row: the largest error over all of them."""
    rng = np.random.default_rng(0)
    rows = decode_rows(seq_length)
    reference, candidate = [], []
    for row in rows:
        outputs = run_decode(decode_feeds(decode_inputs, prefill_feeds, prefill_outputs, seq_length, row, rng))
        for name, got in zip(decode_outputs, outputs):
            reference.append(prefill_outputs[name][:, row:row + 1])
            candidate.append(got)
    return compare(f"decode vs prefill (rows {', '.join(map(str, rows))})", reference, candidate)
