"""Small helpers over TPU-MLIR's `mlir` Python bindings, for the top passes (toolchain Python only)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from mlir.ir import (ArrayAttr, Attribute, FloatAttr, InsertionPoint, IntegerAttr, Location, Operation,
                     RankedTensorType, Value)


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
    """The net's weight file (the .npz model_transform wrote, named in the module's `module.weight_file`),
    read when a pass first asks and written back by run.py only when a pass added to it."""

    def __init__(self, path: str):
        self.path, self._data, self.changed = path, None, False

    def _load(self) -> dict:
        if self._data is None:
            with np.load(self.path) as data:
                self._data = dict(data)
        return self._data

    def __getitem__(self, name: str) -> np.ndarray:
        return self._load()[name]

    def add(self, name: str, value: np.ndarray) -> None:
        data = self._load()
        if name in data:
            raise ValueError(f"the weight file already holds '{name}'")
        data[name] = value
        self.changed = True

    def save(self) -> None:
        if self.changed:
            partial = f"{self.path}.partial.npz"
            np.savez(partial, **self._data)
            os.replace(partial, self.path)


@dataclass
class Context:
    """What a pass knows about the net besides its MLIR: its weights, whether it is compiled --dynamic, and
    the file of its checkpoint codes (graphopt/checkpoint_codes.py; None for a float checkpoint)."""

    weights: Weights
    dynamic: bool = False
    codes: str | None = None
