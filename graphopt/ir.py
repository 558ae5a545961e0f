"""The graph every pass reads and writes: one network as a plain FX GraphModule over ATen ops.

Weights are `get_attr` nodes (not lifted placeholders), placeholders are exactly the
network's inputs in contract order, and the output node returns a flat tuple whose names
are `output_names`. After each pass the pass manager calls `NetworkGraph.finalize()`, which
removes dead nodes, re-compiles the module and re-propagates shapes, so every pass can rely
on `node.meta["val"]` (a FakeTensor) being current.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).replace("torch.", "")}

    @classmethod
    def from_json(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], tuple(data["shape"]), getattr(torch, data["dtype"]))


@dataclass
class NetworkGraph:
    """One network (embedding, block_3, block_cache_3, lm_head, ...) between passes."""

    name: str
    kind: str  # one of graphopt.contract's network kinds (ALL_KINDS)
    gm: fx.GraphModule
    output_names: list[str]
    seq_length: int
    # Properties established by passes so far ("attention.canonical", "rope.tabled", ...).
    properties: set[str] = field(default_factory=set)

    # ---- inputs -------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def input(self, name: str) -> fx.Node | None:
        return next((n for n in self.placeholders() if n.name == name), None)

    @property
    def inputs(self) -> list[TensorSpec]:
        return [_spec(n.name, n.meta["val"]) for n in self.placeholders()]

    def add_input(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> fx.Node:
        """Append a placeholder after the existing ones (inputs keep contract order)."""
        last = self.placeholders()[-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(name)
        assert node.name == name, f"input name {name!r} is taken in {self.name}"
        node.meta["val"] = _fake(shape, dtype)
        return node

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        node = self.input(name)
        node.meta["val"] = _fake(shape, node.meta["val"].dtype)

    # ---- outputs ------------------------------------------------------------------------
    @property
    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def output_values(self) -> list[fx.Node]:
        return list(self.output_node.args[0])

    def add_output(self, name: str, value: fx.Node) -> None:
        out = self.output_node
        out.args = (tuple(out.args[0]) + (value,),)
        self.output_names.append(name)

    @property
    def outputs(self) -> list[TensorSpec]:
        return [_spec(name, v.meta["val"]) for name, v in zip(self.output_names, self.output_values())]

    # ---- nodes --------------------------------------------------------------------------
    def calls(self, *targets) -> Iterator[fx.Node]:
        """The call_function nodes whose target is one of `targets`, in graph order."""
        return (n for n in list(self.graph.nodes) if n.op == "call_function" and n.target in targets)

    def computed_from(self, source: fx.Node | None) -> set[fx.Node]:
        """Every node whose value depends on `source` (itself included; empty for None)."""
        reached = {source} if source is not None else set()
        for node in self.graph.nodes:  # topological order
            if any(arg in reached for arg in node.all_input_nodes):
                reached.add(node)
        return reached

    def subgraph(self, outputs) -> fx.GraphModule:
        """A module computing the tuple of `outputs` (nodes of this graph) from the inputs they read alone,
        its placeholders in the network's order, holding only the constants they read."""
        needed, stack = set(), list(outputs)
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        graph, copied = fx.Graph(), {}
        for node in self.graph.nodes:
            if node in needed:
                copied[node] = graph.node_copy(node, lambda n: copied[n])
        graph.output(tuple(copied[o] for o in outputs))
        return fx.GraphModule(self.gm, graph)

    def constant(self, attr: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        """Register `value` on the module under a fresh name and return a get_attr node for it."""
        name, k = attr, 0
        while hasattr(self.gm, name):
            k += 1
            name = f"{attr}_{k}"
        self.gm.register_buffer(name, value)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(name)
        node.meta["val"] = _fake(tuple(value.shape), value.dtype)
        return node

    # ---- housekeeping -------------------------------------------------------------------
    def finalize(self) -> None:
        """Drop dead nodes and unused constants, re-compile, re-propagate shapes."""
        self.graph.eliminate_dead_code()
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        tensors = [*self.gm.named_buffers(), *self.gm.named_parameters()]
        for name in [name for name, _ in tensors if name not in used]:
            owner, _, attr = name.rpartition(".")
            delattr(self.gm.get_submodule(owner) if owner else self.gm, attr)
        self.graph.lint()
        self.gm.recompile()
        self.propagate_shapes()

    def propagate_shapes(self) -> None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        args = [mode.from_tensor(torch.empty(s.shape, dtype=s.dtype)) for s in self.inputs]
        FakeTensorProp(self.gm, mode).propagate(*args)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Zero-filled inputs of the right shapes, for exporters that trace by running."""
        return tuple(torch.zeros(s.shape, dtype=s.dtype) for s in self.inputs)

    def run(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(self.gm(*args))

    def readable(self) -> str:
        """The graph as Python code, for --dump-after and debugging."""
        return self.gm.code

    def fingerprint(self) -> str:
        """What the network computes, as its generated code: a pass that changes nothing leaves it equal."""
        return self.gm.code


def _fake(shape, dtype):
    return FakeTensorMode(allow_non_fake_inputs=True).from_tensor(torch.empty(shape, dtype=dtype))


def _spec(name: str, val) -> TensorSpec:
    return TensorSpec(name, tuple(int(d) for d in val.shape), val.dtype)


def shape_of(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(d) for d in node.meta["val"].shape)
