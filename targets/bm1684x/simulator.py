"""bmodel networks run in TPU-MLIR's cmodel simulator, as a runtime backend.

One long-lived worker process (sim_worker.py under the toolchain's Python) keeps the bmodel
loaded, so a whole generation costs one simulator start, not one per network call.
`SimBackend` has the same `run(network, inputs)` as the onnxruntime backend, so the chip-style
runtime drives either.
"""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.targets.bm1684x.toolchain import Toolchain

WORKER = Path(__file__).with_name("sim_worker.py")


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    return struct.pack("<Q", len(data)) + data


class Simulator:
    """A cmodel worker; `run` sends one net's inputs and returns its outputs in order.

    The simulator's own output goes to `log`, which is removed when the worker ends cleanly
    and kept (and named in the error) when it does not."""

    def __init__(self, toolchain: Toolchain, log: Path):
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(log, "wb")
        self.process = subprocess.Popen([str(toolchain.python), str(WORKER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._log_handle, env=toolchain.environ(),
                                        cwd=log.parent)

    def run(self, bmodel: Path, net: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = {"__model__": np.array(str(bmodel.absolute())), "__net__": np.array(net), **inputs}
        try:
            self.process.stdin.write(_pack(request))
            self.process.stdin.flush()
            header = self.process.stdout.read(8)
            if len(header) < 8:
                raise BrokenPipeError
            (size,) = struct.unpack("<Q", header)
            reply = dict(np.load(io.BytesIO(self.process.stdout.read(size)), allow_pickle=False))
        except (BrokenPipeError, OSError):
            raise GraphoptError(f"TPU-MLIR's simulator stopped while running net '{net}' of {bmodel}. Its log is "
                                f"{self.log}; check that the toolchain works with `graphopt toolchain status`.") from None
        if "__error__" in reply:
            raise GraphoptError(f"TPU-MLIR's simulator could not run net '{net}' of {bmodel}:\n{reply['__error__']}")
        return [reply[f"out{i}"] for i in range(len(reply) - 1)]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log_handle.close()
        if self.process.returncode == 0:
            self.log.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SimBackend:
    """The runtime backend over one combined bmodel: outputs named as in the ONNX manifest."""

    def __init__(self, simulator: Simulator, bmodel: Path, manifest: dict):
        self.simulator, self.bmodel = simulator, bmodel
        self.output_names = {n["name"]: [o["name"] for o in n["outputs"]] for n in manifest["networks"]}
        self.output_names["embedding_cache"] = self.output_names["embedding"]

    def run(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names[network], self.simulator.run(self.bmodel, network, inputs)))
