"""rope-table: replace the rotary cos/sin computation with constant tables gathered by position.

Whatever the rope variant (llama3 scaling, partial rotary, NTK, ...), cos and sin depend only
on `position_ids` and constants. This pass finds the sub-graph that depends on nothing but
`position_ids`, evaluates it once for every position 0..SEQ-1 in fp32, and replaces it with
`embedding(table, position_ids)`. On the chip this removes Cos/Sin and, more importantly,
the `position × inv_freq` product that bf16 lowering makes inexact above position 256.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.ir import NetworkGraph, shape_of
from graphopt.contract import BLOCK, BLOCK_CACHE, BLOCK_KV, POSITION_IDS
from graphopt.pass_manager import Pass, PassResult, register_pass

POSITION_INPUT = POSITION_IDS


def position_only_nodes(net: NetworkGraph, positions: fx.Node) -> set[fx.Node]:
    """Nodes computed from `positions` and constants alone (and at least from `positions`)."""
    depends: dict[fx.Node, set[fx.Node]] = {}
    for node in net.graph.nodes:
        if node.op == "placeholder":
            depends[node] = {node}
        elif node.op == "get_attr":
            depends[node] = set()
        else:
            depends[node] = set().union(*(depends[i] for i in node.all_input_nodes)) if node.all_input_nodes else set()
    return {n for n, d in depends.items() if d == {positions} and n is not positions}


def _position_axis(shape: tuple[int, ...], seq: int) -> int | None:
    for axis, size in enumerate(shape):
        if size == seq:
            return axis
        if size != 1:
            return None
    return None


@register_pass
class RopeTable(Pass):
    """Precompute rotary cos/sin for positions 0..SEQ-1 as fp32 tables gathered by position_ids."""

    name = "rope-table"
    applies_to = frozenset({BLOCK, BLOCK_CACHE, BLOCK_KV})
    requires = ("layout.free",)
    ensures = ("rope.tabled",)
    hint = ("graphopt tabulates rotary embeddings computed from the position_ids input and constants alone, "
            "whatever their formula; a block whose positions also feed something else is not tabulated.")

    def run(self, net: NetworkGraph) -> PassResult:
        positions = net.input(POSITION_INPUT)
        if positions is None:
            raise self.cannot(net, f"the network has no '{POSITION_INPUT}' input")
        batch, seq = shape_of(positions)
        inside = position_only_nodes(net, positions)
        frontier = [n for n in net.graph.nodes if n in inside and any(u not in inside for u in n.users)]
        if batch != 1 or not frontier:
            raise self.cannot(net, "found no sub-graph that depends only on position_ids "
                                 "(the rotary cos/sin computation)")
        module = net.subgraph(frontier)  # its one input: the positions
        rows = net.seq_length
        axes = [_position_axis(shape_of(f), seq) for f in frontier]
        for f, axis in zip(frontier, axes):
            if axis is None:
                raise self.cannot(net, f"position-only value '{f.name}' of shape {shape_of(f)} "
                                     "does not have the position axis first (after batch dims of 1)")
        tables = self._tables(module, seq, rows, frontier)
        self._check(module, tables, seq, rows, frontier, net)
        for f, table in zip(frontier, tables):
            const = net.constant("rope_table", table, before=f)
            with net.graph.inserting_before(f):
                gathered = net.graph.call_function(torch.ops.aten.embedding.default, (const, positions))
                value = net.graph.call_function(torch.ops.aten.reshape.default, (gathered, list(shape_of(f))))
            f.replace_all_uses_with(value)
        return PassResult(len(frontier), f"{len(frontier)} table(s) of {rows} positions replace {len(inside)} position-only nodes")

    @staticmethod
    def _tables(module, seq: int, rows: int, frontier) -> list[torch.Tensor]:
        """Evaluate the traced sub-graph chunk by chunk at its own traced shape [1, seq]."""
        chunks: list[list[torch.Tensor]] = [[] for _ in frontier]
        with torch.no_grad():
            for start in range(0, rows, seq):
                outs = module(torch.arange(start, start + seq, dtype=torch.int64).view(1, seq))
                for chunk, out in zip(chunks, outs):
                    chunk.append(out.reshape(seq, -1))
        return [torch.cat(c)[:rows].contiguous() for c in chunks]

    def _check(self, module, tables, seq: int, rows: int, frontier, net: NetworkGraph) -> None:
        """The tables must reproduce the sub-graph on positions in any order, or it is not per-position."""
        probe = torch.randint(0, rows, (1, seq), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = module(probe)
        for f, table, want in zip(frontier, tables, expected):
            got = table[probe.view(-1)].view(want.shape)
            if not torch.allclose(got, want, rtol=1e-6, atol=1e-6):
                raise self.cannot(net, f"position-only value '{f.name}' is not a function of each position on its "
                                  "own, so it cannot be tabulated")
