"""model_transform once per graph: block_i's top MLIR and weights for every block of the same graph.

Every block_i of a model is one graph with other weights, and so is every block_cache_i; TPU-MLIR's
model_transform (its ONNX converter, then tpuc-opt's top passes) does the same work for each of them:
3.5-7.4 s of a Llama-3.1-8B block's compile at 2 jobs, 64 times. On the nets graphopt writes, what it does to the
weights is copy an initializer or fold the Transpose that reads it (a Linear's [out, in] weight becomes
a `*_Transpose_folder` [in, out]). So the first net of a graph runs model_transform, and `Recipe.learn`
reads off its output which initializer each weight the top MLIR reads is, as it is or transposed (the
weights file may hold more: the converter's, which the transform server leaves as the top MLIR's, also holds
the constants tpuc-opt folded away); the second net runs it too, and the recipe must rebuild that net's
output exactly (`Recipe.differences`);
then every later net of the graph gets its top MLIR as the first's text with its own name, and its
weights file by the same copies and transposes of its own initializers (`Recipe.apply`, 0.9-1.2 s). A graph
of fewer than three nets is not learned from (no net would gain). deploy_all starts a graph's later nets after
its first two where it can (`TransformReuse.teachers`): one started while the second still compiles runs the tool.

What holds it: the nets' ONNX graphs are the same but for the initializers' data (`graph_key`); every
initializer the recipe does not take from the net is byte-for-byte the first net's (so whatever
model_transform folded from one into the MLIR text is right for the net too); a graph whose output holds
a weight that is not one initializer, copied or transposed, gets no recipe, nor one that the second net
contradicts: each of its nets runs model_transform.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

# What model_transform leaves in its directory that the rest of the compile reads: the top MLIR (model_deploy,
# the top passes), the converter's MLIR beside it (kept in the net cache, as a compiled net's), the weights.
TEXTS = (".mlir", "_origin.mlir")
WEIGHT_FILE = re.compile(r'module\.weight_file = "([^"]+)"')
WEIGHT_OP = re.compile(r'"top\.Weight"\(\) : \(\) -> \S+ loc\((#loc\d+|"[^"]*")\)')
LOCATION = re.compile(r'^(#loc\d+) = loc\("([^"]*)"\)', re.MULTILINE)
NET_PLACEHOLDER = "\0NET\0"


def named_weights(top_mlir: str) -> set[str]:
    """The weights a top MLIR's ops read (its top.Weight ops' names). A weights file may hold more: the converter's,
    which a net's top MLIR names when tpuc-opt wrote none (transform_server.py), also holds the constants tpuc-opt
    folded away."""
    aliases = dict(LOCATION.findall(top_mlir))
    names = set()
    for loc in WEIGHT_OP.findall(top_mlir):
        if loc.startswith("#") and loc not in aliases:
            raise NoRecipe(f"a weight's location {loc} names no weight")
        names.add(aliases[loc] if loc.startswith("#") else loc.strip('"'))
    return names


def graph_key(onnx_path: Path, transform_args: list[str]) -> str:
    """What model_transform's output depends on but the net's name and its initializers' data: the graph (nodes,
    inputs, outputs, the initializers' names, types and shapes) and the command's flags and shapes."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.name = ""
    for tensor in graph.initializer:
        name, dims, data_type = tensor.name, list(tensor.dims), tensor.data_type
        tensor.Clear()
        tensor.name, tensor.data_type = name, data_type
        tensor.dims.extend(dims)
    args = list(transform_args)
    for flag in ("--model_name", "--model_def", "--mlir"):
        if flag in args:
            del args[args.index(flag):args.index(flag) + 2]
    digest = hashlib.sha256(graph.SerializeToString(deterministic=True))
    digest.update(json.dumps([args, model.opset_import[0].version if model.opset_import else 0]).encode())
    return digest.hexdigest()


class Initializers:
    """An ONNX file's initializers by name, each read from its file when asked for: the recipe holds one weight
    at a time, not the net's (a block's are 0.9 GB)."""

    def __init__(self, onnx_path: Path):
        self.folder = onnx_path.parent
        self._tensors = {t.name: t for t in onnx.load(str(onnx_path), load_external_data=False).graph.initializer}

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].dims)

    def kind(self, name: str) -> tuple[np.dtype, int]:
        """Its element type and count, without reading it."""
        tensor = self._tensors[name]
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)), int(np.prod(tensor.dims, dtype=np.int64))

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor).copy()  # writable: torch takes it for the transpose
        return self._read(name, self.kind(name)[1]).reshape(tuple(tensor.dims))

    def first_row(self, name: str) -> np.ndarray:
        """Its elements [0, ...] (the first row of a matrix; a vector whole), reading only those."""
        tensor = self._tensors[name]
        count = int(np.prod(tensor.dims[1:], dtype=np.int64)) if len(tensor.dims) > 1 else self.kind(name)[1]
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor).reshape(-1)[:count]
        return self._read(name, count)

    def _read(self, name: str, count: int) -> np.ndarray:
        info = {entry.key: entry.value for entry in self._tensors[name].external_data}
        with open(self.folder / info["location"], "rb") as data:
            data.seek(int(info.get("offset", 0)))
            return np.fromfile(data, dtype=self.kind(name)[0], count=count)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(_bytes(array)).hexdigest()


def _bytes(array: np.ndarray) -> np.ndarray:
    """The array's bytes, in C order: what "the same" means for a weight (0.0 and -0.0 differ)."""
    return np.ascontiguousarray(array).view(np.uint8).reshape(-1)


def _transposed(array: np.ndarray) -> np.ndarray:
    """A 2-D array's transpose, contiguous (torch transposes a 14336 x 4096 matrix 4x faster than numpy's copy)."""
    return torch.from_numpy(array).t().contiguous().numpy()


@dataclass(frozen=True)
class WeightRule:
    """One weight of the top weights file: the initializer it is, as it is or transposed (2-D)."""

    key: str  # its name in the weights file
    source: str  # the initializer
    transposed: bool
    shape: tuple[int, ...]  # as the weights file holds it (tpuc-opt writes them flat)

    def array(self, arrays: Initializers) -> np.ndarray:
        """The weight, contiguous."""
        source = arrays[self.source]
        return np.ascontiguousarray(_transposed(source) if self.transposed else source).reshape(self.shape)


class NoRecipe(Exception):
    """Why a graph's nets each run model_transform: what the first net's output holds that a recipe cannot make."""


@dataclass(frozen=True)
class Recipe:
    reference: str  # the net it was learned from
    texts: dict[str, str]  # file suffix (TEXTS) -> the reference's text, its name replaced by NET_PLACEHOLDER
    weight_file: str  # the weights file's name, with NET_PLACEHOLDER
    weights: tuple[WeightRule, ...]  # in the reference's file order
    fixed: dict[str, str]  # initializer the recipe does not take -> the sha256 of the reference's bytes

    @classmethod
    def learn(cls, name: str, onnx_path: Path, work: Path) -> Recipe:
        """The recipe of model_transform's output for net `name` in `work`, made from `onnx_path`; NoRecipe says
        why there is none."""
        texts = {suffix: (work / f"{name}{suffix}").read_text() for suffix in TEXTS}
        found = WEIGHT_FILE.search(texts[".mlir"])
        if not found or not found.group(1).startswith(f"{name}_"):
            raise NoRecipe(f"{name}.mlir names no weights file of its own (module.weight_file)")
        weight_file = found.group(1)
        templates = {}
        for suffix, text in texts.items():
            template = text.replace(f"module @{name} ", f"module @{NET_PLACEHOLDER} ").replace(
                f'"{name}_', f'"{NET_PLACEHOLDER}_')
            if name in template:
                line = next(line for line in template.splitlines() if name in line)
                raise NoRecipe(f"{name}{suffix} names the net outside its module name and weights file: {line[:120]}")
            templates[suffix] = template
        sources = Initializers(onnx_path)
        rules, named = [], named_weights(texts[".mlir"])
        with np.load(work / weight_file) as stored:
            if named - set(stored.files):
                raise NoRecipe(f"{weight_file} lacks weight(s) {sorted(named - set(stored.files))[:3]} of {name}.mlir")
            for key in stored.files:
                if key in named:
                    rules.append(_rule(key, stored[key], sources))
        taken = {rule.source for rule in rules}
        return cls(name, templates, weight_file.replace(name, NET_PLACEHOLDER, 1), tuple(rules),
                   {k: _digest(sources[k]) for k in sources.names() if k not in taken})

    def same_as(self, other: Recipe) -> bool:
        """The same recipe, whichever net each was learned from."""
        return (self.texts, self.weight_file, self.weights, self.fixed) == \
            (other.texts, other.weight_file, other.weights, other.fixed)

    def _inputs(self, name: str, onnx_path: Path) -> Initializers:
        """The net's initializers, once each one the recipe does not take is checked to be the reference's."""
        arrays = Initializers(onnx_path)
        if set(arrays.names()) != {rule.source for rule in self.weights} | set(self.fixed):
            raise NoRecipe(f"{name}'s initializers are not {self.reference}'s")
        for key, digest in self.fixed.items():
            if _digest(arrays[key]) != digest:
                raise NoRecipe(f"{name}'s initializer {key} differs from {self.reference}'s, and model_transform's "
                               f"output of {self.reference} does not hold it as a weight")
        return arrays

    def apply(self, name: str, onnx_path: Path, work: Path) -> None:
        """Writes into `work` what model_transform would for net `name` from `onnx_path` (NoRecipe: it cannot)."""
        arrays = self._inputs(name, onnx_path)
        weight_file = work / self.weight_file.replace(NET_PLACEHOLDER, name)
        partial = weight_file.with_name(f"{weight_file.name}.partial")
        # np.savez's file, written a weight at a time (savez takes them all at once: a block's 0.9 GB held twice)
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for rule in self.weights:
                with archive.open(f"{rule.key}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, rule.array(arrays), allow_pickle=False)
        os.replace(partial, weight_file)
        for suffix, template in self.texts.items():
            (work / f"{name}{suffix}").write_text(template.replace(NET_PLACEHOLDER, name))

    def differences(self, name: str, onnx_path: Path, work: Path) -> list[str]:
        """Where model_transform's real output for net `name` in `work` is not what the recipe makes of it."""
        try:
            arrays = self._inputs(name, onnx_path)
        except NoRecipe as why:
            return [str(why)]
        texts = {suffix: (work / f"{name}{suffix}").read_text() for suffix in self.texts}
        found = [f"{name}{suffix}'s text" for suffix, template in self.texts.items()
                 if texts[suffix] != template.replace(NET_PLACEHOLDER, name)]
        named = named_weights(texts[".mlir"])
        with np.load(work / self.weight_file.replace(NET_PLACEHOLDER, name)) as stored:
            if [key for key in stored.files if key in named] != [rule.key for rule in self.weights]:
                return found + [f"{name}'s weights file holds other weights"]
            for rule in self.weights:
                if not np.array_equal(_bytes(stored[rule.key]), _bytes(rule.array(arrays))):
                    found.append(f"weight {rule.key}")
        return found


def _rule(key: str, stored: np.ndarray, sources: Initializers) -> WeightRule:
    """The one initializer `stored` is, as it is or transposed, byte for byte; the initializer named `key` first (a
    copy keeps its name), then any other of its size. A candidate is read whole only once its first row is where
    `stored` would hold it (an 8B block's three MLP matrices are one size: each was read and compared three times
    over, both ways, 6 s of a learned transform)."""
    flat = _bytes(stored)
    candidates = sorted((k for k in sources.names() if sources.kind(k) == (stored.dtype, stored.size)),
                        key=lambda k: k != key)
    for source in candidates:
        row = _bytes(sources.first_row(source))
        shape = sources.shape(source)
        as_is = np.array_equal(row, flat[:row.size])
        # transposed, the initializer's first row is the stored matrix's first column
        transposed = len(shape) == 2 and np.array_equal(row, _bytes(stored.reshape(shape[::-1])[:, 0]))
        if as_is and np.array_equal(_bytes(sources[source]), flat):
            return WeightRule(key, source, False, stored.shape)
        if transposed and np.array_equal(_bytes(_transposed(sources[source])), flat):
            return WeightRule(key, source, True, stored.shape)
    raise NoRecipe(f"weight {key} ({stored.dtype}, {stored.size} elements) is no initializer, copied or transposed")


class TransformReuse:
    """The recipes of one compile run, by graph (graph_key): learned from a graph's first net, checked on its
    second, then applied to the rest. Thread-safe."""

    def __init__(self, graph_of: dict[str, str]):
        self._lock = threading.Lock()
        self.graph_of = graph_of  # each net of the run (its label) -> its graph
        # Learning reads a net's weights twice over: worth it where a recipe would serve a third net at least.
        self._learn = {key for key, count in Counter(graph_of.values()).items() if count >= 3}
        self._recipes: dict[str, Recipe] = {}  # learned, not yet checked on a second net
        self._checked: dict[str, Recipe] = {}
        self._refused: dict[str, str] = {}  # graph -> why its nets each run model_transform

    def teachers(self, label: str) -> tuple[str, ...]:
        """The nets a net's recipe would come from: its graph's first two (in graph_of's order), which learn and check
        it, unless it is one of them. A scheduler that starts the net after them saves its model_transform
        (deploy_all's Job.after)."""
        key = self.graph_of[label]
        if key not in self._learn:
            return ()
        first_two = [name for name, graph in self.graph_of.items() if graph == key][:2]
        return () if label in first_two else tuple(first_two)

    def recipe(self, key: str) -> Recipe | None:
        """The graph's checked recipe, if there is one yet."""
        with self._lock:
            return self._checked.get(key)

    def refuse(self, key: str, why: str) -> None:
        with self._lock:
            self._checked.pop(key, None)
            self._refused.setdefault(key, why)

    def ran(self, key: str, name: str, onnx_path: Path, work: Path) -> None:
        """model_transform ran for net `name` in `work`: learn the graph's recipe from it, or check the recipe."""
        with self._lock:
            if key not in self._learn or key in self._refused or key in self._checked:
                return
            learned = self._recipes.get(key)
        # A recipe is an optimization: what keeps one from being learned or checked leaves the nets to the tool.
        if learned is None:
            try:
                recipe = Recipe.learn(name, onnx_path, work)
            except (NoRecipe, OSError, ValueError, KeyError) as why:
                self.refuse(key, f"{name}: {why}")
                return
            with self._lock:
                learned = self._recipes.setdefault(key, recipe)
            if learned is recipe:
                return
            # Two nets of the graph ran at once: the second's own recipe is the first's, or the first's is wrong.
            problems = [] if recipe.same_as(learned) else ["the two recipes differ"]
        else:
            try:
                problems = learned.differences(name, onnx_path, work)
            except (OSError, ValueError, KeyError) as why:
                problems = [f"{type(why).__name__}: {why}"]
        if problems:
            self.refuse(key, f"the recipe learned from {learned.reference} does not make {name}'s output: "
                             + ", ".join(problems[:3]))
        else:
            with self._lock:
                self._checked.setdefault(key, learned)

    def refusals(self) -> list[str]:
        with self._lock:
            return sorted(self._refused.values())
