"""FX → ONNX: export a rewritten network, and the form ONNX passes work on.

The TorchScript exporter (`dynamo=False`) is used because it writes opset 15 / IR 8, which
TPU-MLIR's ONNX importer (onnx 1.14) accepts; the dynamo exporter writes opset 18, whose
ReduceMean TPU-MLIR 1.30 rejects (measured). It accepts a plain GraphModule over
ATen ops, which is what the FX passes leave behind.

Weights travel out of band. For the export and the ONNX passes every weight (a floating-point
constant of `WEIGHT_MIN_ELEMENTS` or more) is a graph input, so the model the passes see is a
few kilobytes whatever the network's size: onnxsim and graphsurgeon copy models several times,
which at 8B (a 2.1 GB embedding) cost minutes and gigabytes. A weight that is an input is also
never folded by the exporter, so Linear weights keep their [out, in] layout and their names
(`linear_layout_problems` checks it: TPU-MLIR quantizes [out, in] + Transpose well, a folded
[in, out] constant badly, W8 cosine 0.99998 against 0.71 measured).
`save_onnx` binds them back as initializers, streamed tensor by tensor into the file (or its
external data), so no ONNX copy of the weights is ever built in memory.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
import warnings
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import numpy_helper

from graphopt.errors import GraphoptError
from graphopt.ir import NetworkGraph

OPSET = 15
IR_VERSION = 8
# Past this many bytes of weights a model is saved with external data, streamed tensor by tensor
# (protobuf cannot hold 2 GiB; an inline 8B block would cost two extra copies of its weights).
EXTERNAL_DATA_BYTES = 1 << 28
# Constants this large are weights (out of band); smaller ones stay in the graph for folding.
WEIGHT_MIN_ELEMENTS = 1024


@dataclass
class OnnxNetwork:
    """One network as an ONNX model, between ONNX passes."""

    name: str
    kind: str
    model: onnx.ModelProto
    properties: set[str] = field(default_factory=set)
    # Weights kept out of band: graph inputs of `model` until save_onnx binds them.
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def readable(self) -> str:
        return onnx.helper.printable_graph(self.model.graph)

    def fingerprint(self) -> Counter:
        """What the model computes, as a multiset of nodes (op, inputs, outputs, attributes): two models
        with the same fingerprint differ at most in node order and metadata."""
        return node_signatures(self.model)


def node_signatures(model: onnx.ModelProto) -> Counter:
    """Each node as (op, inputs, outputs, attribute values), and the graph's inputs and outputs."""
    return Counter((n.op_type, tuple(n.input), tuple(n.output), tuple(_attribute(a) for a in n.attribute))
                   for n in model.graph.node) + Counter(("graph input", i.name) for i in model.graph.input) + \
        Counter(("graph output", o.name) for o in model.graph.output)


def _attribute(attribute: onnx.AttributeProto):
    """An attribute by its value (two serializations of one tensor compare equal)."""
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, onnx.TensorProto):
        array = numpy_helper.to_array(value)
        value = (str(array.dtype), array.shape, array.tobytes())
    elif isinstance(value, list):
        value = tuple(v if isinstance(v, (int, float, bytes, str)) else str(v) for v in value)
    elif not isinstance(value, (int, float, bytes, str)):
        value = str(value)
    return attribute.name, value


def changed_nodes(before: Counter, after: Counter) -> int:
    """How many nodes (and graph inputs/outputs) one model's signatures have that the other's have not."""
    return sum(((before - after) + (after - before)).values())


def linear_layout_problems(model: onnx.ModelProto, weights: set[str]) -> list[str]:
    """Every 2-D weight a MatMul multiplies by must be Linear's [out, in], transposed in the graph: what
    TPU-MLIR's W4/W8 quantization (and graphopt's fake-quantized reference, fake_quant.py) assume."""
    transposed = {n.output[0]: n for n in model.graph.node if n.op_type == "Transpose"}
    problems = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        operand = node.input[1]
        if operand in weights:
            problems.append(f"MatMul '{node.name}' multiplies by weight '{operand}' as it is, not by its transpose")
        elif operand in transposed and transposed[operand].input[0] in weights:
            perm = [list(a.ints) for a in transposed[operand].attribute if a.name == "perm"]
            if perm and perm[0] != [1, 0]:
                problems.append(f"weight '{transposed[operand].input[0]}' reaches MatMul '{node.name}' through "
                                f"Transpose{perm[0]}, not [1, 0]")
    return problems


def export_onnx(net: NetworkGraph, dynamic_axes: dict | None = None, weights_out_of_band: bool = True) -> OnnxNetwork:
    gm, weights = _weights_as_inputs(net.gm) if weights_out_of_band else (net.gm, {})
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / f"{net.name}.onnx"
        try:
            torch.onnx.export(
                gm, (*net.example_inputs(), *weights.values()), str(path),
                input_names=[s.name for s in net.inputs] + list(weights), output_names=list(net.output_names),
                opset_version=OPSET, dynamo=False, do_constant_folding=True, dynamic_axes=dynamic_axes,
            )
        except torch.onnx.errors.UnsupportedOperatorError as error:
            raise GraphoptError(
                f"network '{net.name}' uses an op the ONNX exporter cannot write at opset {OPSET}: "
                f"{str(error).splitlines()[0].rstrip('.')}. Add a rule for it to the export-legalize pass "
                "(passes/export_legalize.py), or a pass of your own that rewrites it before export."
            ) from error
        model = onnx.load(str(path))
    return OnnxNetwork(net.name, net.kind, model, set(net.properties), weights)


def is_weight(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.numel() >= WEIGHT_MIN_ELEMENTS


def out_of_band_weights(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The weights export_onnx takes out of `gm` (its graph inputs), by qualified name, in graph order."""
    tensors = {node.target: functools.reduce(getattr, node.target.split("."), gm)
               for node in gm.graph.nodes if node.op == "get_attr"}
    return {name: tensor.detach() for name, tensor in tensors.items() if is_weight(tensor)}


def _weights_as_inputs(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """A view of `gm` (sharing its tensors) whose weight constants (out_of_band_weights) are extra trailing
    inputs, in that order, named by their qualified names (`layer.self_attn.q_proj.weight`)."""
    weights = out_of_band_weights(gm)
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, values))  # graph_copy returns the output's value
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs: dict[str, fx.Node] = {}
    for node in [n for n in graph.nodes if n.op == "get_attr" and n.target in weights]:
        if node.target not in inputs:
            with graph.inserting_after(placeholders[-1]):
                placeholders.append(graph.placeholder(f"weight_{len(inputs)}"))
            placeholders[-1].meta = dict(node.meta)
            inputs[node.target] = placeholders[-1]
        node.replace_all_uses_with(inputs[node.target])
        graph.erase_node(node)
    return fx.GraphModule(gm, graph), weights


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes if not t.raw_data else len(t.raw_data) for t in model.graph.initializer)


class SharedData:
    """The external data already written into one output directory, indexed by content.

    A tensor whose bytes a previous network of the directory wrote points at that file and
    offset instead of being written again: `block_cache_i` reuses `block_i`'s weights and a
    tied lm_head the embedding's, so an 8B export is 32 GB on disk instead of 60. The index
    goes by content, not names, because traced names are network-relative
    (`layer.mlp.up_proj.weight` in every block). It keys a tensor by its size and a sample of
    its bytes, and takes a hit only once the bytes in the file are the tensor's, every one:
    hashing every tensor whole (sha1) cost an 8B block 0.9 s, more than writing it, where the
    comparison reads what the page cache holds and runs only for the tensors that are there.
    It also keeps each finished file's sha256, so a data file two networks read is hashed once.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._placed: dict[tuple[int, bytes], list[tuple[str, int]]] = {}
        self._file_sha256: dict[Path, str] = {}

    def find(self, buffer: memoryview) -> tuple[tuple[int, bytes], tuple[str, int] | None]:
        """(the index's key for `buffer`, the (data file, offset) that already holds its bytes, or None).
        Data files being written must be flushed first: the bytes are compared with the file's."""
        key = (buffer.nbytes, _sampled_digest(buffer))
        for location, offset in self._placed.get(key, ()):
            if _file_holds(self.directory / location, offset, buffer):
                return key, (location, offset)
        return key, None

    def add(self, key: tuple[int, bytes], location: str, offset: int) -> None:
        self._placed.setdefault(key, []).append((location, offset))

    def written(self, path: Path, sha256: str) -> None:
        """`path` was just written whole, and this is its sha256 (hashed as it was written, not read back)."""
        self._file_sha256[path] = sha256

    def digest(self, files: list[Path]) -> str:
        """sha256 over the sha256 of each file (a network's model and the data files it reads).
        Only for files no network will write again: a network appends to its own data file only."""
        for path in files:
            if path not in self._file_sha256:
                self._file_sha256[path] = _file_sha256(path)
        return hashlib.sha256("".join(self._file_sha256[path] for path in files).encode()).hexdigest()


def _sampled_digest(buffer: memoryview, samples: int = 1 << 16) -> bytes:
    """sha1 of about `samples` bytes spread over `buffer` and of its last 4 KiB: a cheap key whose matches are
    then compared in full (two tensors of one size rarely agree on these bytes unless they are equal)."""
    data = np.frombuffer(buffer, np.uint8)
    step = max(1, data.size // samples)
    return hashlib.sha1(data[::step].tobytes() + data[-4096:].tobytes()).digest()


def _file_holds(path: Path, offset: int, buffer: memoryview, chunk: int = 1 << 24) -> bool:
    """Whether `path` holds `buffer`'s bytes at `offset`, compared chunk by chunk (16 MiB read at a time, as
    8-byte words where the size allows)."""
    word = np.uint64 if buffer.nbytes % 8 == 0 else np.uint8
    data = np.frombuffer(buffer, word)
    into = np.empty(min(chunk // data.itemsize, data.size), word)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        for start in range(0, data.size, into.size):
            part = into[: min(into.size, data.size - start)]
            if handle.readinto(part) != part.nbytes or not np.array_equal(part, data[start:start + part.size]):
                return False
    return True


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_onnx(model: onnx.ModelProto, path: Path, weights: dict[str, torch.Tensor] | None = None,
              shared: SharedData | None = None) -> list[Path]:
    """Write `path` (plus `path.data` past EXTERNAL_DATA_BYTES of weights); return the files it
    needs: the model first, then every external data file it reads.

    `weights` are graph inputs of `model` to bind as initializers, in graph-input order.
    External tensors already written in the directory `shared` indexes are referenced, not copied."""
    weights = weights or {}
    shared = shared or SharedData(path.parent)
    inputs = [i.name for i in model.graph.input if i.name in weights]
    external = initializer_bytes(model) + sum(t.numel() * t.element_size() for t in weights.values()) \
        > EXTERNAL_DATA_BYTES
    model = _without_inputs(model, set(inputs))
    if not external:
        for name in inputs:
            model.graph.initializer.append(numpy_helper.from_array(weights[name].numpy(), name))
        onnx.save_model(model, str(path))
        return [path]
    if shared.directory != path.parent:
        raise ValueError(f"{path}: the shared-data index belongs to {shared.directory}")
    # Past the limit: the model's own constants and then each weight, streamed into data files.
    own = path.with_name(path.name + ".data")
    used: dict[str, None] = {}  # data files in order of first use
    own_sha256 = hashlib.sha256()  # as it is written: the manifest's digest need not read 0.9 GB a block back
    with ExitStack() as stack:
        handle = None

        def place(tensor: onnx.TensorProto, buffer: memoryview) -> None:
            nonlocal handle
            if handle is not None:
                handle.flush()  # find compares with what the files hold, this one's tensors so far included
            key, found = shared.find(buffer)
            if found is None:
                if handle is None:
                    handle = stack.enter_context(open(own, "wb"))
                found = (own.name, handle.tell())
                handle.write(buffer)
                own_sha256.update(buffer)
                shared.add(key, *found)
            _set_external(tensor, found[0], found[1], buffer.nbytes)
            used.setdefault(found[0])

        # (Not onnx's convert_model_to_external_data: it refuses when a file of the data file's
        # name exists in the current directory, whatever directory the model is saved in.)
        for tensor in model.graph.initializer:
            if len(tensor.raw_data) >= 1024:
                place(tensor, memoryview(tensor.raw_data))
                tensor.ClearField("raw_data")
        for name in inputs:
            array = np.ascontiguousarray(weights[name].numpy())
            tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                      dims=array.shape)
            place(tensor, memoryview(array).cast("B"))
            model.graph.initializer.append(tensor)
        if handle is not None:
            shared.written(own, own_sha256.hexdigest())
    onnx.save_model(model, str(path))
    return [path, *(path.with_name(name) for name in used)]


def _without_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """`model` with the graph inputs in `names` removed (they become initializers)."""
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
