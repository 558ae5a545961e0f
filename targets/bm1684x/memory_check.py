"""Whether the runtime's copies between nets mean, on this bmodel's memory layout, what they mean.

The chip-style runtime's programs (graphopt/runtime.py, graphopt/device_program.py) are run
twice, without running any net: once on memory where every tensor is its own (what the runtime
means: HostDevice's picture) and once on the bmodel's device addresses, as libbmrt placed them
with shared memory (`Simulator.layout`). Each byte remembers which step produced it (a write
from the host, a net's output) and at which offset; copies carry that along. Where a net reads
an input whose bytes came from elsewhere on the device than in the intended picture, the runtime
would feed it something else than it means: a hazard. So is every copy whose destination
overlaps its source: TPU-MLIR's cmodel copies forward and overwrites the source as it goes (a
first-turn copy from `embedding` into `block_0` did this, and a 48-token prompt answered other
tokens), and whether the chip's copy engine does is not documented.

Scenarios: a session of turns with prompts of 1 token, 3/4 SEQ and SEQ-1 tokens, each followed
by two decode steps, on one memory (as a chat keeps it between turns). What a net does with memory
it does not output (its scratch) is not in the layout; the simulated generation covers it for
models small enough to simulate.
"""

from __future__ import annotations

import numpy as np

from graphopt import contract as c
from graphopt.device_program import (At, Buffer, Copy, Fill, LayoutQueries, Launch, Program, Read, Same, Tensor, Write,
                                     layout_entry, layout_stages, rows_of)
from graphopt.runtime import Sampling, Seq2SeqRuntime, Shapes, runtime_on


class _Memory:
    """Byte intervals of one address space, each labelled (origin, offset within what the origin produced)."""

    def __init__(self):
        self.spans: list[tuple[int, int, object, int]] = []  # (start, end, origin, origin offset), sorted, disjoint

    def get(self, start: int, end: int) -> list[tuple[int, int, object, int]]:
        """What [start, end) holds, relative to `start`; unwritten bytes have origin None."""
        out, at = [], start
        for a, b, origin, offset in self.spans:
            if b <= start or a >= end:
                continue
            lo, hi = max(a, start), min(b, end)
            if lo > at:
                out.append((at - start, lo - start, None, 0))
            out.append((lo - start, hi - start, origin, offset + lo - a))
            at = hi
        if at < end:
            out.append((at - start, end - start, None, 0))
        return _merge(out)

    def set(self, start: int, pieces: list[tuple[int, int, object, int]]) -> None:
        end = start + (pieces[-1][1] if pieces else 0)
        kept = []
        for a, b, origin, offset in self.spans:
            if b <= start or a >= end:
                kept.append((a, b, origin, offset))
                continue
            if a < start:
                kept.append((a, start, origin, offset))
            if b > end:
                kept.append((end, b, origin, offset + end - a))
        kept += [(start + a, start + b, origin, offset) for a, b, origin, offset in pieces if origin is not None]
        self.spans = sorted(kept)


def _merge(pieces):
    """Adjacent pieces of one origin at consecutive offsets become one (so equal contents compare equal)."""
    out = []
    for piece in pieces:
        if out and out[-1][2] == piece[2] and out[-1][1] == piece[0] and (
                piece[2] is None or out[-1][3] + out[-1][1] - out[-1][0] == piece[3]):
            out[-1] = (out[-1][0], piece[1], piece[2], out[-1][3])
        else:
            out.append(piece)
    return out


class _Recorder(LayoutQueries):
    """A device that keeps the programs a runtime would run and answers token 0."""

    def __init__(self, layout: dict):
        self.layout, self.programs = layout, []

    def execute(self, program: Program) -> dict[str, np.ndarray]:
        self.programs.append(program)
        return {"next": np.zeros(1, np.int32), "logits": np.zeros(1, np.float32), "hidden": np.zeros(1, np.float32),
                "candidate_probs": np.ones(1, np.float32), "candidates": np.zeros(1, np.int32), "penalised": np.zeros(1, np.int32)}


def sessions(layout: dict) -> list[list[Program]]:
    """The programs of a chat session (or, for an encoder-decoder model, of three translations),
    with the shapes read off the bmodel's own nets, so a bmodel from anywhere can be checked; where
    the bmodel can sample, a second session that samples (the demo picks one mode when it loads)."""
    recorder = _Recorder(layout)
    first_block = c.LLM_TPU.network(c.BLOCK, 0)
    contract = c.contract_of_nets(layout, len(layout[first_block]["in"]) if first_block in layout else None)
    decode = next(s for s in contract.networks if s.kind in c.DECODE_BLOCKS)
    history = layout[decode.network(0)]["in"][decode.input_index(c.HISTORY_K)]["shape"]
    shapes = Shapes(seq_length=history[1], num_layers=len(contract.layers(layout)),
                    hidden=layout[contract.network(c.LM_HEAD)]["in"][0]["shape"][-1], kv_heads=history[2],
                    head_dim=history[3], max_input=layout[contract.prefill_block.network(0)]["in"][0]["shape"][1])
    _session(runtime_on(recorder, shapes, contract), contract, shapes)
    runs = [recorder.programs]
    if contract.has(c.SAMPLE_HEAD):  # the demo's --do_sample: sample_head's writes and copies instead of greedy_head's
        recorder.programs = []
        _session(runtime_on(recorder, shapes, contract, sampling=Sampling()), contract, shapes)
        runs.append(recorder.programs)
    return runs


def _session(runtime, contract: c.Contract, shapes: Shapes) -> None:
    seq = shapes.seq_length
    lengths = sorted({1, shapes.prefill_rows * 3 // 4, min(seq - 1, shapes.prefill_rows)})
    if contract.has(c.BLOCK_KV):  # the session goes on: later prompts run through block_kv_i, one in two chunks
        lengths.append(shapes.prefill_rows + 1)
    for length in lengths:
        if contract.has(c.BLOCK_KV) and runtime.room([1] * length) < 3:
            break
        prompt = [1] * max(1, length)
        if isinstance(runtime, Seq2SeqRuntime):
            runtime.encode(prompt)
            prompt = [runtime.decoder_start]
        runtime.prefill(prompt)
        for _ in range(min(2, runtime.room(prompt))):
            runtime.decode(0)


def _describe_origin(origin, layout: dict) -> str:
    if origin is None:
        return "nothing the runtime wrote"
    if origin[0] == "write":
        return f"{origin[1] or 'a host write'} (written into {origin[2]})"
    net, index = origin[1], origin[2]
    return f"{net} output {index} ({layout[net]['out'][index]['name']})"


def _tensor_name(ref, layout: dict) -> str:
    if isinstance(ref, Buffer):
        return str(ref)
    entry = layout_entry(layout, ref)
    return f"{ref} ({entry['name']}, {entry['size']} bytes at {entry['addr']:#x})"


def hazards(layout: dict, programs: list[Program]) -> list[str]:
    """Every way the programs' copies and reads would mean something else on this layout than intended."""
    device, intended = _Memory(), _Memory()
    buffers: dict[str, int] = {}
    top = max((t["addr"] + t["size"] for net in layout for stage in layout_stages(layout, net)
               for io in ("in", "out") for t in stage[io]), default=0)
    aliases: dict[Tensor, Tensor] = {}
    spaces: dict[object, int] = {}
    found: list[str] = []

    def size(ref) -> int:
        ref = ref.ref if isinstance(ref, At) else ref
        tensor = ref.like if isinstance(ref, Buffer) else ref
        entry = layout_entry(layout, tensor)
        if isinstance(ref, Buffer) and ref.rows is not None:  # `rows` rows of its `like`
            return entry["size"] // rows_of(tuple(entry["shape"])) * ref.rows
        return entry["size"]

    def rows(ref) -> int:
        ref = ref.ref if isinstance(ref, At) else ref
        if isinstance(ref, Buffer) and ref.rows is not None:
            return ref.rows
        tensor = ref.like if isinstance(ref, Buffer) else ref
        return rows_of(tuple(layout_entry(layout, tensor)["shape"]))

    def used(entry: dict, launch: Launch, index: int | None) -> int:
        """The bytes of an input (or, index None, an output) a launch reads or writes: a dynamic launch,
        its rows only (outputs: as many as input 0)."""
        full = rows_of(tuple(entry["shape"]))
        return entry["size"] // full * launch.length(0 if index is None else index, full) if launch.dims else entry["size"]

    def at_device(ref) -> int:
        nonlocal top
        if isinstance(ref, At):
            return at_device(ref.ref) + ref.row * (size(ref) // rows(ref))
        if isinstance(ref, Buffer):
            if ref.name not in buffers:
                top = (top + 4095) // 4096 * 4096
                buffers[ref.name], top = top, top + size(ref)
            return buffers[ref.name]
        return layout_entry(layout, ref)["addr"]

    def at_intended(ref) -> int:
        if isinstance(ref, At):
            return at_intended(ref.ref) + ref.row * (size(ref) // rows(ref))
        ref = aliases.get(ref, ref)
        return spaces.setdefault(ref, (len(spaces) + 1) << 40)

    def note(message: str) -> None:
        if message not in found:
            found.append(message)

    for p, program in enumerate(programs):
        for s, step in enumerate(program.steps):
            if isinstance(step, Same):
                aliases[step.a] = aliases.get(step.b, step.b)
            elif isinstance(step, (Write, Fill)):
                what = step.what if isinstance(step, Write) else "zeros"
                count = step.value.nbytes if isinstance(step, Write) and step.partial else size(step.dst)
                label = [(0, count, ("write", what, str(step.dst), p, s), 0)]
                device.set(at_device(step.dst), label)
                intended.set(at_intended(step.dst), label)
            elif isinstance(step, Copy):
                row_src, row_dst = size(step.src) // rows(step.src), size(step.dst) // rows(step.dst)
                count = size(step.src) if step.rows is None else step.rows * row_src
                src, dst = at_device(step.src) + step.src_row * row_src, at_device(step.dst) + step.dst_row * row_dst
                whole_src, whole_dst = (at_device(step.src), size(step.src)), (at_device(step.dst), size(step.dst))
                if whole_src != whole_dst and _overlap(whole_src, whole_dst):
                    note(f"the runtime copies {_tensor_name(step.src, layout)} into {_tensor_name(step.dst, layout)}, "
                         "and the destination overlaps the source, so the copy overwrites bytes it has yet to read")
                if count > size(step.dst) - step.dst_row * row_dst:
                    note(f"the runtime copies {count} bytes of {step.src} into {_tensor_name(step.dst, layout)}, "
                         "past its end")
                device.set(dst, device.get(src, src + count))
                src_i = at_intended(step.src) + step.src_row * row_src
                intended.set(at_intended(step.dst) + step.dst_row * row_dst, intended.get(src_i, src_i + count))
            elif isinstance(step, Launch):
                bound = dict(step.bind)
                for i, entry in enumerate(layout_stages(layout, step.net)[step.stage]["in"]):
                    ref = bound.get(i, Tensor(step.net, "in", i, step.stage))
                    # Only bytes the runtime means something by: what it never wrote (the padding rows
                    # past a prompt's length in a later block) is whatever memory holds, in either picture.
                    want = [w for w in intended.get(at_intended(ref), at_intended(ref) + used(entry, step, i))
                            if w[2] is not None]
                    got = [g for w in want for g in _shift(device.get(at_device(ref) + w[0], at_device(ref) + w[1]), w[0])]
                    if want != _merge(got):
                        wrong = next((g for g in got if g not in want), got[0])
                        meant = ", ".join(dict.fromkeys(_describe_origin(w[2], layout) for w in want))
                        note(f"{step.net} input {i} ({entry['name']}, at {at_device(ref):#x}): the runtime means it to "
                             f"hold {meant}, but on this bmodel bytes {wrong[0]}..{wrong[1]} of it hold "
                             f"{_describe_origin(wrong[2], layout)}")
                bound_out = dict(step.bind_out)
                for i, entry in enumerate(layout_stages(layout, step.net)[step.stage]["out"]):
                    label = [(0, used(entry, step, None), ("out", step.net, i, p, s), 0)]
                    ref = bound_out.get(i, Tensor(step.net, "out", i, step.stage))
                    device.set(at_device(ref), label)
                    intended.set(at_intended(ref), label)
            elif isinstance(step, Read):
                pass  # the host reading bytes changes nothing
    return found


def _shift(pieces, by: int):
    return [(a + by, b + by, origin, offset) for a, b, origin, offset in pieces]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def check(layout: dict) -> list[str]:
    """Hazards of a chat session's programs on `layout` (see the module's docstring)."""
    found = [hazards(layout, programs) for programs in sessions(layout)]
    return list(dict.fromkeys(h for each in found for h in each))

