"""One bmodel from the per-network bmodels, written as `model_tool --combine` writes it, in little memory.

TPU-MLIR's combine holds the whole output in memory (its binary section is one growing vector): 7.54 GiB of
resident memory for the 5.93 GB Llama-3.1-8B bmodel, the largest process of the whole build. This writes the
same file (the same bytes, but the build time in the header) while holding only the nets' FlatBuffers:
- every net's stages are copied into one FlatBuffer, a net's stages from several files joined under its name
  (bmodel_format packs them as model_tool's object API does);
- every `Binary` the copied nets point to is placed in the new binary section in the order model_tool visits
  them, each at a 4 KiB boundary; one whose bytes equal an earlier one's (block_cache_i's weights are block_i's;
  each file's kernel module) is stored once and pointed to twice;
- the binary section is then copied from the input files with `copy_file_range`, so the weights go from file
  to file through the page cache and never through this process's memory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import flatbuffers

from graphopt.errors import GraphoptError
from graphopt.targets.bm1684x import bmodel_format as fmt

ALIGN = 4096  # each binary, and the binary section itself, begins at a 4 KiB boundary (what model_tool 1.30 does)
SCHEMA = Path("include/tpu_mlir/Builder/BM168x/bmodel.fbs")  # under TPUC_ROOT
_LARGEST_CHUNK = 1 << 23


def schema_path(tpuc_root: Path) -> Path:
    return tpuc_root / SCHEMA


@dataclass
class _Piece:
    """A binary of the output: where its bytes are in an input file, and where they go in the section."""
    source: int  # index of the input file
    offset: int  # in that file
    size: int
    start: int  # in the output's binary section


@dataclass
class _Section:
    """The output's binary section as it is planned: model_tool's WriteBinary, with the bytes left on disk."""
    handles: list
    pieces: list[_Piece] = field(default_factory=list)
    by_size: dict[int, list[_Piece]] = field(default_factory=dict)
    end: int = 0
    shared: int = 0  # binaries found equal to an earlier one, and stored once

    def place(self, source: int, offset: int, size: int) -> int:
        """The section offset for `size` bytes at `offset` of input `source`: an earlier equal binary's, or a
        new one at the section's end."""
        for piece in self.by_size.get(size, ()):
            if self._same(piece, source, offset, size):
                self.shared += 1
                return piece.start
        piece = _Piece(source, offset, size, self.end)
        self.pieces.append(piece)
        self.by_size.setdefault(size, []).append(piece)
        self.end += -(-size // ALIGN) * ALIGN
        return piece.start

    def _same(self, piece: _Piece, source: int, offset: int, size: int) -> bool:
        # Chunks from 64 KiB up: binaries of one size but other bytes (the blocks' weights) part in the first.
        done, chunk = 0, 1 << 16
        while done < size:
            n = min(chunk, size - done)
            if os.pread(self.handles[piece.source], n, piece.offset + done) != \
                    os.pread(self.handles[source], n, offset + done):
                return False
            done, chunk = done + n, min(chunk * 2, _LARGEST_CHUNK)
        return True


def _binaries(schema: fmt.Schema, table: fmt.Table, obj: dict, place) -> None:
    """Every Binary of `obj` replaced by its place in the output, in the order model_tool's update_table
    walks the copied net: fields by id, depth first; a Binary vector's empty entries are not written."""
    for f in table.fields:
        if f.name not in obj:
            continue
        value = obj[f.name]
        if f.type == "Binary":
            obj[f.name] = [place(b) if b[1] else b for b in value] if f.vector else place(value)
        elif f.type in schema.tables:
            for item in (value if f.vector else [value]):
                _binaries(schema, schema.tables[f.type], item, place)


@dataclass
class _Net:
    name: bytes
    addr_mode: int
    stages: list[dict]


def _join(files: list[fmt.BmodelFile]) -> list[_Net]:
    """The nets of all files, in order; a name met again adds a stage to its net (model_tool's AddNet), which
    must then agree with the net's other stages on what the runtime reads from all of them."""
    nets: dict[bytes, _Net] = {}
    for f in files:
        for net in f.model["net"]:
            name = net["name"]
            if "cascade" in net:
                raise GraphoptError(f"{f.path} holds {name.decode()}, a net of a model split over several devices "
                                    "(a cascade); graphopt combines one-device nets. Combine it with TPU-MLIR's "
                                    "model_tool --combine.")
            for stage in net.get("parameter", []):
                if name not in nets:
                    nets[name] = _Net(name, net.get("addr_mode", 0), [stage])
                    continue
                _check_stage(nets[name], net.get("addr_mode", 0), stage, f.path)
                nets[name].stages.append(stage)
    return list(nets.values())


def _check_stage(net: _Net, addr_mode: int, stage: dict, path: Path) -> None:
    name = net.name.decode()

    def tensors(s, io):
        return [(t["name"], t.get("data_type", 0), [tuple(d.get("dim", [])) for d in t.get("shape", [])])
                for t in s.get(io, [])]

    for other in net.stages:
        why = None
        if addr_mode != net.addr_mode:
            why = f"its address mode is {addr_mode}, the net's other stage's {net.addr_mode}"
        elif stage.get("is_dynamic", 0) != other.get("is_dynamic", 0):
            why = "one stage is dynamic and the other static"
        elif [t[:2] for t in tensors(stage, "input_tensor")] != [t[:2] for t in tensors(other, "input_tensor")] \
                or [t[0] for t in tensors(stage, "output_tensor")] != [t[0] for t in tensors(other, "output_tensor")]:
            why = "its inputs or outputs are not the other stage's (names and types)"
        elif tensors(stage, "input_tensor") == tensors(other, "input_tensor"):
            why = "its input shapes are the other stage's, so the runtime could not choose between them"
        if why:
            raise GraphoptError(f"{path} adds a stage to net {name} that cannot join it: {why}. Two files give "
                                f"a net of that name; compile them with the same inputs or under other names.")


def combine(tpuc_root: Path, inputs: list[Path], out: Path, progress=None) -> dict:
    """Writes the bmodel of `inputs`' nets into `out` (under a temporary name, renamed when complete).
    `progress(copied, total)` is told the bytes of the binary section copied so far. Returns what it did: nets,
    stages, bytes, binaries, and how many binaries were found equal to an earlier one and stored once."""
    schema = fmt.Schema.load(schema_path(tpuc_root))
    files = [fmt.read(schema, path) for path in inputs]
    if not files:
        raise GraphoptError("there are no bmodels to combine.")
    nets = _join(files)
    handles = [os.open(f.path, os.O_RDONLY) for f in files]
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        section = _Section(handles)
        kernel = next((i for i, f in enumerate(files) if "kernel_module" in f.model), None)
        kernel_binary = (0, 0)
        if kernel is not None:
            k = files[kernel]
            start, size = k.model["kernel_module"]["binary"]
            kernel_binary = (section.place(kernel, k.binary_offset + start, size), size)
        # model_tool copies every stage's binaries after all nets are in its FlatBuffer, file by file.
        for index, f in enumerate(files):
            def place(binary, index=index, base=f.binary_offset):
                return (section.place(index, base + binary[0], binary[1]), binary[1])
            for net in f.model["net"]:
                for stage in net.get("parameter", []):
                    _binaries(schema, schema.tables["NetParameter"], stage, place)
        flatbuffer = _model_flatbuffer(schema, files, nets, kernel, kernel_binary)
        head = fmt.HEADER.size + len(flatbuffer)
        padded = -(-head // ALIGN) * ALIGN
        with open(partial, "wb") as handle:
            handle.write(fmt.HEADER.pack(fmt.MAGIC, fmt.HEADER.size, padded - fmt.HEADER.size, section.end))
            handle.write(flatbuffer + bytes(padded - head))
            for piece in section.pieces:
                _copy(handles[piece.source], piece.offset, handle.fileno(), padded + piece.start, piece.size)
                if progress:
                    progress(piece.start + piece.size, section.end)
            handle.truncate(padded + section.end)
        partial.rename(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        for handle in handles:
            os.close(handle)
    return {"nets": len(nets), "stages": sum(len(n.stages) for n in nets), "bytes": out.stat().st_size,
            "binaries": len(section.pieces), "stored_once": section.shared}


def _copy(source: int, offset: int, target: int, at: int, size: int) -> None:
    while size:
        n = os.copy_file_range(source, target, size, offset, at)
        if n <= 0:
            raise GraphoptError(f"copying into the bmodel stopped {size} bytes short (disk full?).")
        offset, at, size = offset + n, at + n, size - n


def _model_flatbuffer(schema: fmt.Schema, files: list[fmt.BmodelFile], nets: list[_Net], kernel: int | None,
                      kernel_binary: tuple[int, int]) -> bytes:
    """The output's FlatBuffer, built in model_tool's order: every stage packed as it is met, then (ModelGen's
    Finish) the nets, the model's strings, the kernel and cpu-op modules and the model table."""
    b = flatbuffers.Builder(1 << 20)
    tables = schema.tables
    stage_offsets = {id(stage): fmt.pack_table(schema, b, tables["NetParameter"], stage)
                     for f in files for net in f.model["net"] for stage in net.get("parameter", [])}
    net_table, model_table = tables["Net"], tables["Model"]
    net_offsets = []
    for net in nets:
        b.StartVector(4, len(net.stages), 4)
        for stage in reversed(net.stages):
            b.PrependUOffsetTRelative(stage_offsets[id(stage)])
        parameters = b.EndVector()
        name = b.CreateString(net.name)
        b.StartObject(len(net_table.fields))
        _add(b, net_table, "name", name)
        _add(b, net_table, "parameter", parameters)
        fmt.add_scalar(b, _field(net_table, "addr_mode"), net.addr_mode)
        net_offsets.append(b.EndObject())
    first = files[0].model
    kind = b.CreateString(first["type"])
    version = b.CreateString(first["version"])
    b.StartVector(4, len(net_offsets), 4)
    for offset in reversed(net_offsets):
        b.PrependUOffsetTRelative(offset)
    net_vector = b.EndVector()
    chip = b.CreateString(first["chip"])
    stamp = b.CreateString(time.ctime().encode() + b"\n")  # C's ctime(), as ModelGen writes it
    module = files[kernel].model["kernel_module"] if kernel is not None else {}
    module_name = b.CreateString(module.get("file_name", b""))
    binary = schema.structs["Binary"]
    kernel_table = tables["KernelModule"]
    b.StartObject(len(kernel_table.fields))
    _add(b, kernel_table, "file_name", module_name)
    fmt.add_struct(binary, b, _field(kernel_table, "binary").id, kernel_binary)
    fmt.add_scalar(b, _field(kernel_table, "mode"), module.get("mode", 0))
    kernel_module = b.EndObject()
    cpuop_table = tables["CpuopModule"]
    b.StartObject(len(cpuop_table.fields))
    _add(b, cpuop_table, "file_name", module_name)  # the kernel module's name: ModelGen gives both the one name
    fmt.add_struct(binary, b, _field(cpuop_table, "binary").id, (0, 0))
    cpuop_module = b.EndObject()
    b.StartObject(len(model_table.fields))
    _add(b, model_table, "chip", chip)
    _add(b, model_table, "type", kind)
    _add(b, model_table, "time", stamp)
    _add(b, model_table, "version", version)
    _add(b, model_table, "net", net_vector)
    fmt.add_scalar(b, _field(model_table, "neuron_size"),
                   max(s.get("ctx_size", 0) for n in nets for s in n.stages))
    _add(b, model_table, "kernel_module", kernel_module)
    fmt.add_scalar(b, _field(model_table, "device_num"), max(f.model.get("device_num", 0) for f in files))
    _add(b, model_table, "cpuop_module", cpuop_module)
    fmt.add_struct(binary, b, _field(model_table, "lib_backend").id, (0, 0))
    b.Finish(b.EndObject())
    return bytes(b.Output())


def _field(table: fmt.Table, name: str) -> fmt.Field:
    return next(f for f in table.fields if f.name == name)


def _add(builder: flatbuffers.Builder, table: fmt.Table, name: str, offset: int) -> None:
    builder.PrependUOffsetTRelativeSlot(_field(table, name).id, offset, 0)
