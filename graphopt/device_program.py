"""What a chip runtime does to device memory, as data, and a host-side executor for it.

A chip runtime (LLM-TPU's chat demos) never hands arrays to a network: it writes host data into
a net's input memory, copies bytes from one net's output memory into another net's input memory
(whole tensors, or rows at an offset), launches nets on the memory they were compiled for (or on
another net's output, bound in place), and reads a few bytes back. Two networks of one bmodel
share device memory, so *where* each tensor lives decides whether those copies mean what the
runtime means. A `Program` holds those steps in the runtime's order:

  Write(dst, value, raw)      host -> device. raw: the value's own bytes, as the runtime's host
                              code stores them (int32 ids, fp16 mask bits), whatever the net's
                              dtype; not raw: the value converted to the net's dtype first.
                              partial: fewer bytes than the tensor holds, at its start
                              (`bm_memcpy_s2d_partial`); bits: the value is uint16 bit patterns
                              of that 16-bit float ("bfloat16").
  Fill(dst)                   zeros, `bm_memset_device_ext` (the Qwen3 demo's `empty`).
  Copy(dst, src, rows...)     device -> device, `bm_memcpy_d2d_byte`: rows along axis 1
                              (a row of [1,SEQ,H] is H values), or the whole source.
  Launch(net, bind, bind_out) run `net` on its own memory, except the inputs in `bind`, which read
                              another tensor's memory in place, and the outputs in `bind_out`,
                              written into another tensor's memory (`At(cache, row)`: the Qwen3
                              demo's decode writes its new K/V straight into the cache).
                              dims: a dynamic net's lengths for this launch, (input, axis, length)
                              as `net_launch_dyn` sets them: it reads that many rows of each input
                              from the start of its memory and writes as many output rows.
  Read(src, name, rows...)    device -> host, returned under `name`.
  Same(a, b)                  what the runtime assumes without doing anything: that tensor `a`
                              is the same memory as `b` (the demo writes positions into block_0's
                              input only, and every block_i reads its own).

Three things execute a program: `HostDevice` below (every tensor its own array, networks run by
onnxruntime or as FX graphs: what the runtime means), the cmodel simulator with the bmodel's real
device memory (targets/bm1684x/sim_worker.py: what the chip does), and a static check over the
bmodel's memory layout (targets/bm1684x/memory_check.py: where the two can differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Tensor:
    """A net's input or output memory: `io` is "in" or "out", `index` its position, `stage` which of
    the net's stages (the same net compiled for other shapes: decode stages at shorter KV lengths)."""

    net: str
    io: str
    index: int
    stage: int = 0

    def to_json(self) -> list:
        return [self.net, self.io, self.index, self.stage]

    def __str__(self) -> str:
        stage = f" (stage {self.stage})" if self.stage else ""
        return f"{self.net}{stage} {'input' if self.io == 'in' else 'output'} {self.index}"


@dataclass(frozen=True)
class Buffer:
    """Device memory the runtime allocates itself (bm_malloc_device_byte), as large as `like`, or as
    `rows` rows of it (the Qwen3 cpp_demo's history-KV dev_buffer holds SEQ rows of hidden states)."""

    name: str
    like: Tensor
    rows: int | None = None

    def to_json(self) -> list:
        return ["buffer", self.name, self.like.to_json(), self.rows]

    def __str__(self) -> str:
        return f"the runtime's buffer {self.name}"


@dataclass(frozen=True)
class At:
    """The memory of `ref` from row `row` (along axis 1) on: `bm_mem_from_device(addr + offset, ...)`."""

    ref: "Tensor | Buffer"
    row: int

    def to_json(self) -> list:
        return ["at", self.ref.to_json(), self.row]

    def __str__(self) -> str:
        return f"{self.ref} from row {self.row}"


Ref = Tensor | Buffer


@dataclass(frozen=True)
class Write:
    dst: Ref
    value: np.ndarray
    raw: bool = True
    what: str = ""  # for messages: "the positions", "the prefill mask"
    partial: bool = False  # fewer values than dst holds, written at its start
    bits: str | None = None  # value holds uint16 bit patterns of this float type ("bfloat16")


@dataclass(frozen=True)
class Fill:
    """Zeros over the whole of `dst`."""

    dst: Ref


@dataclass(frozen=True)
class Copy:
    dst: Ref
    src: Ref
    dst_row: int = 0
    src_row: int = 0
    rows: int | None = None  # None: the whole source tensor


@dataclass(frozen=True)
class Launch:
    net: str
    bind: tuple[tuple[int, Ref], ...] = ()  # (input index, memory it reads instead of its own)
    bind_out: tuple[tuple[int, "At"], ...] = ()  # (output index, memory it writes instead of its own)
    stage: int = 0  # which of the net's stages runs (its shapes, its memory)
    dims: tuple[tuple[int, int, int], ...] = ()  # (input index, axis, length): a dynamic net's lengths

    def length(self, index: int, default: int) -> int:
        """The rows (axis 1) input `index` runs at: its dims, else `default` (its compiled rows)."""
        return next((n for i, axis, n in self.dims if i == index and axis == 1), default)


@dataclass(frozen=True)
class Read:
    src: Ref
    name: str
    row: int = 0
    rows: int | None = None


@dataclass(frozen=True)
class Same:
    a: Tensor
    b: Tensor


Step = Write | Fill | Copy | Launch | Read | Same


@dataclass
class Program:
    """A runtime's steps for one call (a prefill, a decode step, a single net)."""

    steps: list[Step] = field(default_factory=list)

    def __iadd__(self, steps) -> "Program":
        self.steps.extend(steps if isinstance(steps, (list, tuple)) else [steps])
        return self

    def to_json(self) -> tuple[list[dict], dict[str, np.ndarray]]:
        """The steps as JSON for the simulator worker, with the written values as named arrays."""
        steps, data = [], {}
        for step in self.steps:
            if isinstance(step, Write):
                key = f"d{len(data)}"
                data[key] = np.ascontiguousarray(step.value)
                steps.append({"op": "write", "dst": step.dst.to_json(), "data": key, "raw": step.raw,
                              "partial": step.partial})
            elif isinstance(step, Fill):
                steps.append({"op": "fill", "dst": step.dst.to_json()})
            elif isinstance(step, Copy):
                steps.append({"op": "copy", "dst": step.dst.to_json(), "src": step.src.to_json(),
                              "dst_row": step.dst_row, "src_row": step.src_row, "rows": step.rows})
            elif isinstance(step, Launch):
                steps.append({"op": "launch", "net": step.net, "bind": [[i, r.to_json()] for i, r in step.bind],
                              "bind_out": [[i, r.to_json()] for i, r in step.bind_out], "stage": step.stage,
                              "dims": [list(d) for d in step.dims]})
            elif isinstance(step, Read):
                steps.append({"op": "read", "src": step.src.to_json(), "name": step.name, "row": step.row,
                              "rows": step.rows})
        return steps, data


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows along axis 1 (a runtime's sequence axis); a tensor of rank < 2 is one row."""
    return shape[1] if len(shape) >= 2 else 1


@dataclass(frozen=True)
class IoSpec:
    shape: tuple[int, ...]
    dtype: np.dtype  # the host backend's dtype (float32, int64)


# A memory map, as cmodel_device.Device.layout reads it off a loaded bmodel: {net: {"addr_mode", "stages",
# "in": [{"name", "dtype", "shape", "addr", "size"}], "out": [...], "more_stages": [{"in", "out"}, ...]}},
# stage 0's inputs and outputs at the top level and a multi-stage net's further stages under "more_stages".
def layout_stages(layout: dict, net: str) -> list[dict]:
    """Every stage's {"in", "out"} of `net` in a memory map, stage 0 first."""
    return [layout[net], *layout[net].get("more_stages", [])]


def layout_entry(layout: dict, tensor: Tensor) -> dict:
    """A tensor's {"name", "dtype", "shape", "addr", "size"} in a memory map, in its stage."""
    return layout_stages(layout, tensor.net)[tensor.stage][tensor.io][tensor.index]


class LayoutQueries:
    """What a runtime asks a device about its memory, answered from a memory map `self.layout`."""

    layout: dict

    def io_alone(self, net: str) -> bool:
        return self.layout[net]["addr_mode"] == 1

    def address(self, tensor: Tensor) -> int | None:
        return layout_entry(self.layout, tensor)["addr"]

    def dtype(self, tensor: Tensor) -> str:
        return layout_entry(self.layout, tensor)["dtype"]

    def stage_rows(self, tensor: Tensor) -> list[int]:
        """The rows (axis 1) of a tensor in each of its net's stages, stage 0 first."""
        return [rows_of(tuple(s[tensor.io][tensor.index]["shape"])) for s in layout_stages(self.layout, tensor.net)]


def bits_to_float(value: np.ndarray, bits: str | None) -> np.ndarray:
    """A raw write's value as the numbers it encodes (bf16 bit patterns are not a numpy dtype)."""
    if bits == "bfloat16":
        return (np.asarray(value, np.uint16).astype(np.uint32) << 16).view(np.float32)
    if bits == "float16":
        return np.asarray(value, np.uint16).view(np.float16)
    return np.asarray(value)


HOST_DTYPES = {"float32": "f32", "float16": "f16", "int64": "i64", "int32": "i32"}


class HostDevice:
    """Runs programs for a backend that runs one network on arrays (`run(net, inputs) -> outputs`).

    Every tensor is its own array, so nothing overlaps: this is what the runtime means. `Same`
    makes two tensors one array. Values keep the backend's dtypes (float32, int64): a raw fp16
    mask value arrives as the float it encodes, int32 ids as int64. Memory outlives a program,
    as device memory does, so a decode step reads the cache the prefill wrote."""

    def __init__(self, backend, io: dict[str, dict[str, list[tuple[str, IoSpec]]]]):
        self.backend, self.io = backend, io
        self.memory: dict[Ref, np.ndarray] = {}
        self.aliases: dict[Tensor, Tensor] = {}

    def io_alone(self, net: str) -> bool:
        """Whether `net`'s inputs and outputs have memory of their own: on the host, every tensor does."""
        return True

    def address(self, tensor: Tensor) -> int | None:
        """Where a tensor is on the device: nowhere in particular on the host (no two share memory)."""
        return None

    def stage_rows(self, tensor: Tensor) -> list[int]:
        """The rows of a tensor in each stage of its net: networks on the host have one stage."""
        return [rows_of(self._spec(tensor).shape)]

    def dtype(self, tensor: Tensor) -> str:
        """The tensor's element type as the chip names it (f32, f16, bf16, i32)."""
        return HOST_DTYPES.get(self._spec(tensor).dtype.name, self._spec(tensor).dtype.name)

    def _spec(self, ref: Ref) -> IoSpec:
        tensor = ref.like if isinstance(ref, Buffer) else ref
        spec = self.io[tensor.net][tensor.io][tensor.index][1]
        if isinstance(ref, Buffer) and ref.rows is not None:
            spec = IoSpec((spec.shape[0], ref.rows, *spec.shape[2:]), spec.dtype)
        return spec

    def _flat(self, ref: Ref) -> np.ndarray:
        ref = self.aliases.get(ref, ref)
        if ref not in self.memory:
            spec = self._spec(ref)
            self.memory[ref] = np.zeros(math.prod(spec.shape), spec.dtype)
        return self.memory[ref]

    def _row(self, ref: Ref) -> int:
        shape = self._spec(ref).shape
        return math.prod(shape) // rows_of(shape)

    def execute(self, program: Program) -> dict[str, np.ndarray]:
        results = {}
        for step in program.steps:
            if isinstance(step, Same):
                self.aliases[step.a] = self.aliases.get(step.b, step.b)
            elif isinstance(step, Write):
                memory = self._flat(step.dst)
                value = bits_to_float(step.value, step.bits).reshape(-1)
                if value.size > memory.size or (value.size < memory.size and not step.partial):
                    raise ValueError(f"writing {value.size} values into {step.dst}, which holds {memory.size}")
                memory[:value.size] = value.astype(memory.dtype)
            elif isinstance(step, Fill):
                self._flat(step.dst)[:] = 0
            elif isinstance(step, Copy):
                src, dst = self._flat(step.src), self._flat(step.dst)
                count = src.size if step.rows is None else step.rows * self._row(step.src)
                start, offset = step.src_row * self._row(step.src), step.dst_row * self._row(step.dst)
                dst[offset:offset + count] = src[start:start + count]
            elif isinstance(step, Launch):
                bound = dict(step.bind)
                io = self.io[step.net]
                inputs = {name: self._flat(bound.get(i, Tensor(step.net, "in", i))).reshape(spec.shape)
                          for i, (name, spec) in enumerate(io["in"])}
                inputs.update({name: bake(step) for name, bake in io.get("baked", {}).items()})
                for i, axis, length in step.dims:  # inputs whose length is the launch's (the ONNX takes any)
                    if (name := io["in"][i][0]) in io.get("launch_length", ()):
                        inputs[name] = np.take(inputs[name], np.arange(length), axis=axis)
                outputs = self.backend.run(step.net, inputs)
                bound_out = dict(step.bind_out)
                rows = step.length(0, rows_of(io["in"][0][1].shape)) if step.dims else None
                for i, (name, spec) in enumerate(io["out"]):
                    value = np.asarray(outputs[name])
                    # A dynamic launch writes its rows only; the rest of the output memory keeps what it held.
                    value = (value[:, :rows] if rows is not None and value.ndim >= 2 else value).reshape(-1)
                    if i in bound_out:
                        at = bound_out[i]
                        memory, offset = self._flat(at.ref), at.row * self._row(at.ref)
                        if offset + value.size > memory.size:
                            raise ValueError(f"{step.net} output {i} written at {at} runs past its end")
                        memory[offset:offset + value.size] = value
                    else:
                        self._flat(Tensor(step.net, "out", i))[:value.size] = value
            elif isinstance(step, Read):
                memory = self._flat(step.src)
                row = self._row(step.src)
                count = memory.size - step.row * row if step.rows is None else step.rows * row
                results[step.name] = memory[step.row * row:step.row * row + count].copy()
        return results
