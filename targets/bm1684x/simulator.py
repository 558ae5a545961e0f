"""A bmodel run in TPU-MLIR's cmodel simulator, as a device for the chip-style runtime.

One long-lived worker process (sim_worker.py under the toolchain's Python) keeps the bmodel
loaded through the runtime's C API with shared memory, as LLM-TPU's demos load it, so a whole
generation costs one simulator start and its copies between nets run on the real memory layout.
`SimBackend.execute(program)` is what `HostDevice.execute` is for onnxruntime: the chip-style
runtime drives either.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
from pathlib import Path

import numpy as np

from graphopt.device_program import LayoutQueries, Launch, Program, Read, Tensor, Write, layout_stages
from graphopt.errors import GraphoptError
from graphopt.targets.bm1684x.toolchain import Toolchain

WORKER = Path(__file__).with_name("sim_worker.py")
# The cmodel's device memory: CMODEL_GLOBAL_MEM_SIZE bytes, in hexadecimal (libcmodel_1684x reads it), else a
# default an 8B bmodel does not fit ("Memory exhausted: cannot find a slot" from bmlib's pool). Pages are
# touched as used: tiny-llama's layout with 8 GiB of it takes 87 MB.
CMODEL_MEMORY_ENV = "CMODEL_GLOBAL_MEM_SIZE"
CMODEL_DEFAULT_MEMORY = 4 << 30
CMODEL_SPARE = 1 << 30  # beyond the bmodel's own: what the runtime and the programs allocate


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    return struct.pack("<Q", len(data)) + data


class Simulator:
    """A cmodel worker that runs programs on bmodels (graphopt/device_program.py) and reports their layout.

    The simulator's own output goes to `log`, which is removed when the worker ends cleanly
    and kept (and named in the error) when it does not."""

    def __init__(self, toolchain: Toolchain, log: Path, device_memory: int = 0):
        """`device_memory`: the bytes the bmodels it loads need on the device (model_tool's total); the cmodel's
        global memory is made that large where its default is not (an 8B W4 bmodel needs 6 GB)."""
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(log, "wb")
        env = toolchain.environ()
        if device_memory + CMODEL_SPARE > CMODEL_DEFAULT_MEMORY:
            env[CMODEL_MEMORY_ENV] = hex(device_memory + CMODEL_SPARE)  # read as hexadecimal: "8589934592" is 0x8589934592
        self.process = subprocess.Popen([str(toolchain.python), str(WORKER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._log_handle, env=env, cwd=log.parent)
        self._layouts: dict[Path, dict] = {}

    def _request(self, bmodel: Path, what: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = {"__model__": np.array(str(bmodel.absolute())), **arrays}
        try:
            self.process.stdin.write(_pack(request))
            self.process.stdin.flush()
            header = self.process.stdout.read(8)
            if len(header) < 8:
                raise BrokenPipeError
            (size,) = struct.unpack("<Q", header)
            reply = dict(np.load(io.BytesIO(self.process.stdout.read(size)), allow_pickle=False))
        except (BrokenPipeError, OSError):
            raise GraphoptError(f"TPU-MLIR's simulator stopped while {what} of {bmodel}. Its log is "
                                f"{self.log}; check that the toolchain works with `graphopt toolchain status`.") from None
        if "__error__" in reply:
            raise GraphoptError(f"TPU-MLIR's simulator failed while {what} of {bmodel}:\n{reply['__error__']}")
        return reply

    def layout(self, bmodel: Path) -> dict:
        """Each net's address mode and the device address and size of its inputs and outputs, as
        the runtime placed them when it loaded the bmodel with shared memory."""
        if bmodel not in self._layouts:
            reply = self._request(bmodel, "reading the memory layout", {"__layout__": np.array(1)})
            self._layouts[bmodel] = json.loads(str(reply["__layout__"]))
        return self._layouts[bmodel]

    def execute(self, bmodel: Path, program: Program, what: str = "running a program") -> dict[str, np.ndarray]:
        steps, data = program.to_json()
        return self._request(bmodel, what, {"__program__": np.array(json.dumps(steps)), **data})

    def run(self, bmodel: Path, net: str, inputs: dict[str, np.ndarray], stage: int = 0,
            dims: tuple[tuple[int, int, int], ...] = ()) -> list[np.ndarray]:
        """One net (one of its stages; a dynamic one at `dims`) on its own: each input converted to the net's
        dtype, written, the net run, its outputs read."""
        layout = layout_stages(self.layout(bmodel), net)[stage]
        program = Program([Write(Tensor(net, "in", i, stage), inputs[t["name"]], raw=False)
                           for i, t in enumerate(layout["in"])])
        program += Launch(net, stage=stage, dims=dims)
        program += [Read(Tensor(net, "out", i, stage), f"out{i}") for i in range(len(layout["out"]))]
        reply = self.execute(bmodel, program, f"running net '{net}'")
        return [reply[f"out{i}"].reshape(t["shape"]) for i, t in enumerate(layout["out"])]

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


class SimBackend(LayoutQueries):
    """A device for the chip-style runtime: programs run on the combined bmodel's real device memory."""

    def __init__(self, simulator: Simulator, bmodel: Path, manifest: dict | None = None):
        self.simulator, self.bmodel = simulator, bmodel

    @property
    def layout(self) -> dict:
        return self.simulator.layout(self.bmodel)

    def execute(self, program: Program) -> dict[str, np.ndarray]:
        return self.simulator.execute(self.bmodel, program)
