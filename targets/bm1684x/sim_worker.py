"""Runs programs on a bmodel in TPU-MLIR's cmodel simulator for graphopt; started by simulator.py.

This file runs under the toolchain's own Python (3.10, TPU-MLIR's numpy), not graphopt's, so
it imports nothing from graphopt (cmodel_device.py, beside it, is the device). It keeps each
bmodel loaded and answers requests on a pipe: every message is an 8-byte little-endian length
followed by an .npz archive. A request holds `__model__` and either `__program__` (a program's
steps as JSON, graphopt/device_program.py, with the values it writes as arrays) or `__layout__`.
The answer holds what the program read, by name, or `__layout__` (JSON), or `__error__`. The
simulator prints to fd 1, so the protocol moves to a private copy of it and fd 1 is pointed at
stderr.
"""

import io
import json
import os
import struct
import sys
import traceback

import numpy as np

from cmodel_device import Device


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


def serve():
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    devices = {}
    while (request := _read(requests)) is not None:
        try:
            path = str(request.pop("__model__"))
            if path not in devices:
                devices[path] = Device(path)
            device = devices[path]
            if "__layout__" in request:
                _write(replies, {"__layout__": np.array(json.dumps(device.layout()))})
            else:
                steps = json.loads(str(request.pop("__program__")))
                _write(replies, device.execute(steps, request))
        except Exception:
            _write(replies, {"__error__": np.array(traceback.format_exc())})


if __name__ == "__main__":
    serve()
