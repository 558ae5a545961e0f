"""dynamic-sequence: a dynamic net's shapes say "any length" along its sequence axes, not its compiled one.

model_transform writes every shape at the lengths it was given, and so does graphopt's ONNX: a
Reshape of q to heads reads [1, 64, -1, 32] at 64 rows. Run at 10 rows, that Reshape asks for 64
and the runtime fails (the simulator asserts in a broadcast). Here every tensor's sequence axes are
followed from the net's inputs (axis 1 of each: the rows a runtime sets with `net_launch_dyn`, the
cache's rows for block_kv_i), op by op, and every Reshape gets -1 on its sequence axis (the other
axes spelled out), every Slice an open end along it. An op the walk does not know, or one that
would mix the sequence axis with another (a Reshape that merges it, a Slice that cuts it), stops the
pass with its name: such a net cannot run at other lengths.
"""

from __future__ import annotations

from math import prod

from mlir.ir import Attribute

from _mlir import NoMatch, bool_attr, int_attr, ints, name_of, op, shape

NAME = "dynamic-sequence"
OPEN_END = 2147483647
KEEP_SHAPE = {"top.RMSNorm", "top.LayerNorm", "top.SiLU", "top.GELU", "top.Sigmoid", "top.MulConst", "top.AddConst",
              "top.SubConst", "top.Cast", "top.Sqrt", "top.Rsqrt", "top.Reciprocal", "top.Exp", "top.Tanh", "top.Active",
              "top.Abs", "top.Clip", "top.Relu", "top.Pow", "top.Softmax"}
BROADCAST = {"top.Add", "top.Mul", "top.Sub", "top.Div", "top.Max", "top.Min"}
RESHAPES = {"top.Reshape", "top.Squeeze", "top.Unsqueeze", "top.Flatten"}
JOINED = "joined"  # history rows and new rows concatenated: only attention reads it


def run(block, none, context) -> dict:
    if not context.dynamic:
        return {"changed": 0, "summary": "not a dynamic net", "skipped": []}
    axes: dict = {}  # value -> {axis: its compiled length, or JOINED}
    rewritten = []
    for operation in [op(o) for o in block.operations]:
        if operation.name in ("top.Weight", "top.None", "func.return"):
            continue
        if operation.name == "top.Input":
            dims = shape(operation.results[0])
            axes[operation.results[0]] = {1: dims[1]} if len(dims) >= 2 else {}
            continue
        known = [axes.get(v, {}) for v in operation.operands]
        if not any(known):
            continue
        try:
            out, note = _follow(operation, known)
        except NoMatch as reason:
            raise RuntimeError(f"{NAME}: {operation.name} {name_of(operation)}: {reason}. A dynamic net's ops must keep "
                               "its sequence axes whole.") from None
        for result in operation.results:
            axes[result] = out
        if note:
            rewritten.append(note)
    return {"changed": len(rewritten), "summary": f"{len(rewritten)} reshape(s)/slice(s) open along the sequence",
            "rewritten": rewritten, "skipped": []}


def _follow(operation, known: list[dict]) -> tuple[dict, str | None]:
    name, out_shape = operation.name, shape(operation.results[0])
    first = known[0]
    if name in RESHAPES:
        return _reshape(operation, first, out_shape)
    if name == "top.Permute":
        order = ints(operation, "order")
        return {k: first[a] for k, a in enumerate(order) if a in first}, None
    if name == "top.Slice":
        return first, _slice(operation, first)
    if name == "top.Gather":
        if known[0] or int_attr(operation, "axis") != 0:
            raise NoMatch("gathers along the sequence, or from a table that has one")
        return dict(known[1]), None
    if name in ("top.MatMul", "top.A16MatMul"):  # (A16MatMul: a Linear with int4 codes, its right operand a weight)
        if len(known) > 1 and known[1]:
            raise NoMatch("multiplies by a sequence-long right operand (an attention left unfused)")
        rank = len(shape(operation.operands[0]))
        return {a: n for a, n in first.items() if a != rank - 1}, None
    if name == "top.FAttention":
        return {1: first[1]}, None
    if name == "top.Concat":
        axis = int_attr(operation, "axis") % len(out_shape)
        joined = {a: n for k in known for a, n in k.items()}
        if any(axis in k for k in known):
            joined[axis] = JOINED
        return joined, None
    if name == "top.Reduce":  # an RMSNorm tpuc-opt left unfused (tiny-llama's) reduces over the hidden axis
        rank = len(shape(operation.operands[0]))
        reduced = {a % rank for a in ints(operation, "axes")}
        if reduced & set(first):
            raise NoMatch("reduces along the sequence")
        if bool_attr(operation, "keepdims"):
            return first, None
        return {a - sum(r < a for r in reduced): n for a, n in first.items()}, None
    if name in BROADCAST:
        out = {}
        for value, k in zip(operation.operands, known):
            offset = len(out_shape) - len(shape(value))
            for a, n in k.items():
                if shape(value)[a] != out_shape[a + offset]:
                    raise NoMatch("broadcasts its sequence axis")
                out[a + offset] = n
        return out, None
    if name in KEEP_SHAPE and all(shape(v) == out_shape for v, k in zip(operation.operands, known) if k):
        if name == "top.Softmax" and int_attr(operation, "axis") % len(out_shape) in first:
            raise NoMatch("normalizes along the sequence")
        return first, None
    raise NoMatch("is not an op the walk knows to keep the sequence axis")


def _reshape(operation, known: dict, out_shape: list[int]) -> tuple[dict, str | None]:
    in_shape = shape(operation.operands[0])
    out = {}
    for axis, length in known.items():
        if length == JOINED:
            raise NoMatch("reshapes history and new rows together")
        before = prod(in_shape[:axis])
        match = [b for b in range(len(out_shape)) if prod(out_shape[:b]) == before and out_shape[b] == length]
        if not match:
            raise NoMatch(f"merges or splits the sequence axis ({in_shape} -> {out_shape})")
        out[match[0]] = length
    if len(out) > 1:
        raise NoMatch("has more than one sequence axis, and a Reshape takes one -1")
    if operation.name != "top.Reshape" or not out:
        return out, None
    spelled = [-1 if b in out else d for b, d in enumerate(out_shape)]
    if "shape" in operation.attributes and ints(operation, "shape") == spelled:
        return out, None
    operation.attributes["shape"] = Attribute.parse(f"[{', '.join(map(str, spelled))}]")
    return out, f"{name_of(operation)}: shape {spelled}"


def _slice(operation, known: dict) -> str | None:
    in_shape = shape(operation.operands[0])
    offset, steps, ends = (ints(operation, k) for k in ("offset", "steps", "ends"))
    changed = False
    for axis in known:
        if offset[axis] != 0 or steps[axis] != 1 or ends[axis] < in_shape[axis]:
            raise NoMatch("cuts the sequence axis")
        if ends[axis] != OPEN_END:
            ends[axis], changed = OPEN_END, True
    if not changed:
        return None
    operation.attributes["ends"] = Attribute.parse(f"[{', '.join(map(str, ends))}]")
    return f"{name_of(operation)}: open end along the sequence"
