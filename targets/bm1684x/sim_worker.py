"""Runs bmodel networks in TPU-MLIR's cmodel simulator for graphopt; started by simulator.py.

This file runs under the toolchain's own Python (3.10, TPU-MLIR's numpy), not graphopt's, so
it imports nothing from graphopt. It loads each bmodel once and answers requests on a pipe:
every message is an 8-byte little-endian length followed by an .npz archive. A request holds
the net's inputs plus `__model__` and `__net__`; the answer holds its outputs in order as
`out0, out1, ...` in float32 / int32, and their bmodel names in `__names__` (or `__error__`). The simulator prints to fd 1, so the protocol moves to a private
copy of it and fd 1 is pointed at stderr.
"""

import importlib
import io
import os
import struct
import sys
import traceback

import numpy as np


def _read(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return dict(np.load(io.BytesIO(stream.read(size)), allow_pickle=False))


def _write(stream, arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _to_device(value, dtype):
    if dtype == "bf16":  # round to nearest even, kept as uint16 bits
        bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    if dtype == "f16":
        return value.astype(np.float16)
    if dtype == "f32":
        return value.astype(np.float32)
    if dtype in ("i32", "si32"):
        return value.astype(np.int32)
    if dtype in ("u32", "ui32"):
        return value.astype(np.uint32)
    raise ValueError(f"unsupported bmodel input dtype {dtype}")


def _from_device(data, dtype):
    if dtype == "bf16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("f16", "f32"):
        return data.astype(np.float32)
    return data.astype(np.int32)


class Models:
    def __init__(self):
        self.runtime = None
        self.models = {}

    def net(self, path, name):
        if path not in self.models:
            if self.runtime is None:
                self.runtime = _load_runtime(path)
            self.models[path] = (self.runtime.Model(path, 0, ""), {})
        model, nets = self.models[path]
        if name not in nets:
            if name not in model.networks:
                raise KeyError(f"{path} has no net '{name}' (it has {', '.join(model.networks)})")
            nets[name] = model.Net(name)
        return nets[name]


def _load_runtime(path):
    """pyruntime_bm over the cmodel, set up the way TPU-MLIR's own model_runner does it."""
    from filelock import FileLock
    from tools import model_runner as mr

    chip = mr.get_chip_from_model(path)
    rvti = mr.get_kernel_mode_from_model(path) == "1"
    with FileLock("/tmp/cmodel_so.lock"):
        mr.link_cmodel_so(chip, rvti)
        mr.link_custom_so(chip)
        mr.link_bmlib_so(chip)
        runtime = importlib.import_module("pyruntime_bm")
        mr.bind_cmodel_so(chip, rvti)
    return runtime


def serve():
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    models = Models()
    while (request := _read(requests)) is not None:
        try:
            net = models.net(str(request.pop("__model__")), str(request.pop("__net__")))
            for tensor in net.inputs:
                value = _to_device(request[tensor.name], tensor.dtype)
                tensor.data.reshape(-1)[:] = value.reshape(-1)
            net.forward()
            # By position: TPU-MLIR renames outputs after the op that made them (y -> y_Relu).
            outputs = {f"out{i}": _from_device(np.array(t.data), t.dtype) for i, t in enumerate(net.outputs)}
            _write(replies, {**outputs, "__names__": np.array([t.name for t in net.outputs])})
        except Exception:
            _write(replies, {"__error__": np.array(traceback.format_exc())})


if __name__ == "__main__":
    serve()
