"""Small helpers over TPU-MLIR's `mlir` Python bindings, for the top passes (toolchain Python only)."""

from __future__ import annotations

import functools
import os
import zipfile
from dataclasses import dataclass

import numpy as np
from mlir.ir import (ArrayAttr, Attribute, F32Type, FloatAttr, InsertionPoint, IntegerAttr, IntegerType, Location,
                     Operation, RankedTensorType, Value)


class NoMatch(Exception):
    """A pattern did not match; the message says where and why."""


def op(x) -> Operation:
    """The Operation behind an OpView (registered ops come back as views)."""
    return x.operation if hasattr(x, "operation") else x


def producer(value: Value) -> Operation | None:
    owner = value.owner
    return op(owner) if not hasattr(owner, "arguments") else None  # a block argument has no producer


def is_op(value: Value, name: str) -> Operation | None:
    made = producer(value)
    return made if made is not None and made.name == name else None


def users(value: Value) -> list[Operation]:
    return [op(use.owner) for use in value.uses]


def shape(value: Value) -> list[int]:
    return list(RankedTensorType(value.type).shape)


def ints(operation: Operation, name: str) -> list[int]:
    return [IntegerAttr(a).value for a in ArrayAttr(operation.attributes[name])]


def int_attr(operation: Operation, name: str) -> int:
    return IntegerAttr(operation.attributes[name]).value


def float_attr(operation: Operation, name: str) -> float:
    return FloatAttr(operation.attributes[name]).value


def bool_attr(operation: Operation, name: str) -> bool:
    return name in operation.attributes and str(operation.attributes[name]) == "true"


def name_of(operation: Operation) -> str:
    """The tensor name TPU-MLIR keeps in an op's location, `loc("name")`."""
    text = str(operation.location)
    return text[text.find('"') + 1:text.rfind('"')] if '"' in text else text


def tensor_type(like: Value, dims: list[int]):
    return RankedTensorType.get(dims, RankedTensorType(like.type).element_type)


def create(name: str, result_type, operands: list[Value], attributes: dict[str, str], loc_name: str,
           before: Operation) -> Operation:
    """A new op right before `before`. TPU-MLIR names tensors by location, and names must be unique."""
    return Operation.create(name, results=[result_type], operands=operands,
                            attributes={k: Attribute.parse(v) for k, v in attributes.items()},
                            loc=Location.name(loc_name), ip=InsertionPoint(before))


def to_a16_matmul(block, matmul: Operation, weights: "Weights", parts: dict[str, np.ndarray], group: int,
                  bits: int) -> Operation:
    """top.MatMul(x, W, bias) -> top.A16MatMul(x, codes, scales, zero points, bias), right-transposed: `parts` names
    the new weights, in that order ([N, K*bits/8] uint8, [N, K/group] float32, [N, K/group] uint8), which go into
    `weights`. W stays, for the caller to drop or keep."""
    first = block.operations[1]  # after top.None: weights come before any reader
    operands = []
    for (name, array), element in zip(parts.items(), (IntegerType.get_unsigned(8), F32Type.get(),
                                                       IntegerType.get_unsigned(8))):
        weights.add(name, array)
        operands.append(create("top.Weight", RankedTensorType.get(list(array.shape), element), [], {}, name,
                               first).results[0])
    out = matmul.results[0]
    a16 = create("top.A16MatMul", out.type, [matmul.operands[0], *operands, matmul.operands[2]],
                 {"right_transpose": "true", "q_group_size": f"{group} : i64", "weight_bits": f"{bits} : i64"},
                 name_of(matmul), matmul)
    out.replace_all_uses_with(a16.results[0])
    matmul.erase()
    return a16


def erase_dead(block) -> int:
    """Erase ops whose results nobody reads (inputs, weights and the return stay), last first."""
    keep = {"func.return", "top.Input", "top.None", "top.Weight"}
    erased, changed = 0, True
    while changed:
        changed = False
        for candidate in reversed(list(block.operations)):
            candidate = op(candidate)
            if candidate.name not in keep and all(not list(r.uses) for r in candidate.results):
                candidate.erase()
                erased += 1
                changed = True
    return erased


class Weights:
    """The net's weight file (the .npz model_transform wrote, named in the module's `module.weight_file`): each
    weight read when a pass first asks for it, and the file written again by run.py only when a pass added or
    took one (with the weights it did not touch copied over)."""

    def __init__(self, path: str):
        self.path, self.changed = path, False
        self._read: dict[str, np.ndarray] = {}  # read or added
        self._taken: set[str] = set()

    @functools.cached_property
    def _stored(self) -> frozenset[str]:
        """The names the file holds (it changes only when run.py saves it, at the end)."""
        with np.load(self.path) as data:
            return frozenset(data.files)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._taken:
            raise KeyError(f"'{name}' was taken from the weight file")
        if name not in self._read:
            self._read[name] = stored_array(self.path, name)
        return self._read[name]

    def take(self, name: str) -> np.ndarray:
        """The weight, dropped from the file (its reader is gone); a read-only array."""
        value = self[name]
        del self._read[name]
        self._taken.add(name)
        self.changed = True
        return value

    def add(self, name: str, value: np.ndarray) -> None:
        if name in self._read or (name not in self._taken and name in self._stored):
            raise ValueError(f"the weight file already holds '{name}'")
        self._taken.discard(name)
        self._read[name] = value
        self.changed = True

    def save(self) -> None:
        if self.changed:
            with np.load(self.path) as data:
                kept = {name: self._read[name] if name in self._read else data[name]
                        for name in data.files if name not in self._taken}
            partial = f"{self.path}.partial.npz"
            np.savez(partial, **kept, **{k: v for k, v in self._read.items() if k not in kept})
            os.replace(partial, self.path)


def stored_array(npz: str, name: str) -> np.ndarray:
    """One array of an .npz, mapped read-only from the file where np.savez stored it uncompressed (np.load reads
    it through zipfile: a copy and a CRC, 2.2 s of an 8B block's 873 MB), else as np.load reads it."""
    with zipfile.ZipFile(npz) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(npz) as data:
            return data[name]
    with open(npz, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)  # the local file header: its name and extra field lengths at 26 and 28
        name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = readers[version](handle) if version in readers else ((), False, np.dtype(object))
        offset = handle.tell()
    if dtype.hasobject or not shape or 0 in shape:  # (a format this does not map: as np.load reads it)
        with np.load(npz) as data:
            return data[name]
    return np.memmap(npz, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


@dataclass
class Context:
    """What a pass knows about the net besides its MLIR: its weights, whether it is compiled --dynamic, and
    the file of its checkpoint codes (graphopt/checkpoint_codes.py; None for a float checkpoint)."""

    weights: Weights
    dynamic: bool = False
    codes: str | None = None
    weight_bits: int = 0  # model_deploy's weight-only mode: 4 for W4BF16/W4F16, 8 for W8..., 0 for a float mode
    q_group_size: int = 0  # its --q_group_size
