"""The .bmodel file: read, and packed again, from TPU-MLIR's own schema (`bmodel.fbs` in the toolchain).

A bmodel is a 64-byte header, a FlatBuffer (the nets: tensors, addresses, where each command and weight
lies) and a binary section that the FlatBuffer's `Binary {start, size}` structs point into. graphopt reads
the schema the installed TPU-MLIR was built with, so a field it adds is carried through, and reads or packs
any table of it generically; `combine.py` is what uses this.

The packing is the C++ object API's (`NetParameter::Pack`, what model_tool does to every net it copies):
a table's strings, vectors and sub-tables are made first, in field order, then its fields are added by
size, largest first, each size group last field first; an empty optional vector or string is left out. The
`flatbuffers` package's Builder lays bytes out as the C++ builder does, so the result is the same bytes.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import flatbuffers

from graphopt.errors import GraphoptError

MAGIC = 0xFF55AAEE  # a bmodel written by TPU-MLIR's ModelGen (0xFF55AAFF is the older bmtap2 format)
HEADER = struct.Struct("<IIIQ44x")  # magic, header_size, flatbuffers_size, binary_size, 11 reserved words

# Schema scalar names → (struct code, bytes).
SCALARS = {name: (code, struct.calcsize(code)) for names, code in (
    (("bool",), "?"), (("byte", "int8"), "b"), (("ubyte", "uint8"), "B"), (("short", "int16"), "h"),
    (("ushort", "uint16"), "H"), (("int", "int32"), "i"), (("uint", "uint32"), "I"), (("long", "int64"), "q"),
    (("ulong", "uint64"), "Q"), (("float", "float32"), "f"), (("double", "float64"), "d")) for name in names}
OFFSET_BYTES = 4  # uoffset_t: what a string, vector, table or struct field counts as when fields are sorted by size


@dataclass(frozen=True)
class Field:
    name: str
    id: int
    type: str  # a scalar's name, "string", or a struct's or table's name
    vector: bool
    default: float
    required: bool


@dataclass(frozen=True)
class Struct:
    """A fixed-size struct of scalars (Binary, RelEntry): read and written as a tuple."""
    name: str
    fields: tuple[Field, ...]

    @property
    def format(self) -> str:
        return "<" + "".join(SCALARS[f.type][0] for f in self.fields)

    @property
    def alignment(self) -> int:
        return max(SCALARS[f.type][1] for f in self.fields)

    @property
    def size(self) -> int:
        return struct.calcsize(self.format)


@dataclass(frozen=True)
class Table:
    name: str
    fields: tuple[Field, ...]  # by id


class Schema:
    """The tables and structs of a .fbs file (the subset bmodel.fbs uses: no unions, enums or nested structs)."""

    def __init__(self, text: str, source: str):
        self.source = source
        self.structs: dict[str, Struct] = {}
        self.tables: dict[str, Table] = {}
        text = re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", text), flags=re.S)
        for kind, name, body in re.findall(r"\b(struct|table)\s+(\w+)\s*\{(.*?)\}", text, flags=re.S):
            fields = []
            for position, (fname, ftype, default, attributes) in enumerate(re.findall(
                    r"(\w+)\s*:\s*(\[?\s*\w+\s*\]?)\s*(?:=\s*([-+\w.]+))?\s*(?:\(([^)]*)\))?\s*;", body)):
                attrs = dict((a.split(":") + [""])[:2] for a in attributes.replace(" ", "").split(",") if a)
                if "deprecated" in attrs:
                    raise GraphoptError(f"{source}: {name}.{fname} is deprecated, which graphopt's bmodel reader "
                                        "does not handle; use the TPU-MLIR version graphopt installs.")
                vector = ftype.startswith("[")
                fields.append(Field(fname, int(attrs.get("id", position)), ftype.strip("[] "), vector,
                                    float(default) if default else 0, "required" in attrs))
            fields.sort(key=lambda f: f.id)
            if kind == "struct":
                self.structs[name] = Struct(name, tuple(fields))
            else:
                self.tables[name] = Table(name, tuple(fields))
        root = re.search(r"root_type\s+(\w+)", text)
        if not root or root[1] not in self.tables:
            raise GraphoptError(f"{source} names no root table; it is not a bmodel schema.")
        self.root = self.tables[root[1]]

    @classmethod
    def load(cls, path: Path) -> "Schema":
        if not path.is_file():
            raise GraphoptError(f"TPU-MLIR's bmodel schema is not at {path}: graphopt reads the bmodel format from "
                                "it. Install the toolchain graphopt manages (graphopt toolchain install bm1684x).")
        return cls(path.read_text(), str(path))

    def slot_bytes(self, field: Field) -> int:
        if field.vector or field.type == "string" or field.type in self.tables or field.type in self.structs:
            return OFFSET_BYTES
        return SCALARS[field.type][1]


# ---- reading -------------------------------------------------------------------------------

def read_table(schema: Schema, table: Table, buf: bytes, pos: int) -> dict:
    """A table as a dict of its present fields (what the object API's UnPack keeps; absent scalars are left out
    and read as their default)."""
    vtable = pos - struct.unpack_from("<i", buf, pos)[0]
    vtable_bytes = struct.unpack_from("<H", buf, vtable)[0]
    out = {}
    for f in table.fields:
        entry = 4 + 2 * f.id
        offset = struct.unpack_from("<H", buf, vtable + entry)[0] if entry < vtable_bytes else 0
        if offset:
            out[f.name] = _read_value(schema, f, buf, pos + offset)
    return out


def _read_value(schema: Schema, f: Field, buf: bytes, at: int):
    if f.vector:
        start = at + struct.unpack_from("<I", buf, at)[0]
        count = struct.unpack_from("<I", buf, start)[0]
        first = start + 4
        if f.type in SCALARS:
            code, size = SCALARS[f.type]
            return list(struct.unpack_from(f"<{count}{code}", buf, first))
        if f.type in schema.structs:
            s = schema.structs[f.type]
            return [struct.unpack_from(s.format, buf, first + i * s.size) for i in range(count)]
        if f.type == "string":
            return [_read_string(buf, first + 4 * i) for i in range(count)]
        table = schema.tables[f.type]
        return [read_table(schema, table, buf, first + 4 * i + struct.unpack_from("<I", buf, first + 4 * i)[0])
                for i in range(count)]
    if f.type in SCALARS:
        return struct.unpack_from("<" + SCALARS[f.type][0], buf, at)[0]
    if f.type == "string":
        return _read_string(buf, at)
    if f.type in schema.structs:
        return struct.unpack_from(schema.structs[f.type].format, buf, at)
    return read_table(schema, schema.tables[f.type], buf, at + struct.unpack_from("<I", buf, at)[0])


def _read_string(buf: bytes, at: int) -> bytes:
    start = at + struct.unpack_from("<I", buf, at)[0]
    return bytes(buf[start + 4:start + 4 + struct.unpack_from("<I", buf, start)[0]])


@dataclass
class BmodelFile:
    """One bmodel on disk: its header's numbers and its FlatBuffer read into dicts; the binary section stays
    on disk (`binary_offset` is where it begins in the file)."""
    path: Path
    model: dict
    binary_offset: int
    binary_size: int


def read(schema: Schema, path: Path) -> BmodelFile:
    with open(path, "rb") as handle:
        head = handle.read(HEADER.size)
        if len(head) < HEADER.size or HEADER.unpack(head)[0] != MAGIC:
            raise GraphoptError(f"{path} is not a bmodel written by TPU-MLIR's model_deploy (its first bytes are "
                                "not the bmodel magic number 0xFF55AAEE). Compile it again.")
        _, header_size, flatbuffer_size, binary_size = HEADER.unpack(head)
        handle.seek(header_size)
        flatbuffer = handle.read(flatbuffer_size)
    if len(flatbuffer) != flatbuffer_size or path.stat().st_size < header_size + flatbuffer_size + binary_size:
        raise GraphoptError(f"{path} is cut short: its header says {header_size + flatbuffer_size + binary_size} "
                            f"bytes, the file has {path.stat().st_size}. Compile it again.")
    root = struct.unpack_from("<I", flatbuffer, 0)[0]
    return BmodelFile(path, read_table(schema, schema.root, flatbuffer, root), header_size + flatbuffer_size,
                      binary_size)


# ---- packing -------------------------------------------------------------------------------

def pack_table(schema: Schema, builder: flatbuffers.Builder, table: Table, obj: dict) -> int:
    """`obj` (as read_table gives it) into `builder` the way the C++ object API's Pack does; returns its offset."""
    refs = {}
    for f in table.fields:
        value = obj.get(f.name)
        if f.vector:
            if value or f.required:
                refs[f.name] = _pack_vector(schema, builder, f, value or [])
        elif f.type == "string":
            if value or f.required:
                refs[f.name] = builder.CreateString(value or b"")
        elif f.type in schema.tables and value is not None:
            refs[f.name] = pack_table(schema, builder, schema.tables[f.type], value)
    builder.StartObject(len(table.fields))
    for size in (8, 4, 2, 1):
        for f in reversed(table.fields):
            if schema.slot_bytes(f) != size:
                continue
            if f.name in refs:
                builder.PrependUOffsetTRelativeSlot(f.id, refs[f.name], 0)
            elif f.type in schema.structs and not f.vector:
                if obj.get(f.name) is not None:
                    add_struct(schema.structs[f.type], builder, f.id, obj[f.name])
            elif f.type in SCALARS and not f.vector:
                add_scalar(builder, f, obj.get(f.name, f.default))
    return builder.EndObject()


def add_scalar(builder: flatbuffers.Builder, f: Field, value) -> None:
    if value != f.default:  # what the C++ builder leaves out (force_defaults off)
        code, size = SCALARS[f.type]
        builder.Prep(size, 0)
        builder.head -= size
        struct.pack_into("<" + code, builder.Bytes, builder.head, value)
        builder.Slot(f.id)


def add_struct(s: Struct, builder: flatbuffers.Builder, slot: int, value: tuple) -> None:
    _place_struct(s, builder, value)
    builder.Slot(slot)


def _place_struct(s: Struct, builder: flatbuffers.Builder, value: tuple) -> None:
    builder.Prep(s.alignment, s.size)
    builder.head -= s.size
    struct.pack_into(s.format, builder.Bytes, builder.head, *value)


def _pack_vector(schema: Schema, builder: flatbuffers.Builder, f: Field, items: list) -> int:
    if f.type == "string" or f.type in schema.tables:
        offsets = [builder.CreateString(i) if f.type == "string" else
                   pack_table(schema, builder, schema.tables[f.type], i) for i in items]
        builder.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            builder.PrependUOffsetTRelative(offset)
        return builder.EndVector()
    if f.type in schema.structs:
        s = schema.structs[f.type]
        builder.StartVector(s.size, len(items), s.alignment)
        for item in reversed(items):
            _place_struct(s, builder, item)
        return builder.EndVector()
    code, size = SCALARS[f.type]
    builder.StartVector(size, len(items), size)
    builder.head -= size * len(items)
    struct.pack_into(f"<{len(items)}{code}", builder.Bytes, builder.head, *items)
    return builder.EndVector()
