"""A bmodel on the cmodel simulator's device memory, driven through the runtime's own C API.

This runs under the toolchain's Python (started by sim_worker.py) and imports nothing from
graphopt. It loads TPU-MLIR's cmodel builds of libbmlib and libbmrt with ctypes and makes the
calls LLM-TPU's chat demos make: `bm_dev_request`, `bmrt_create`, `bmrt_set_flags(SHARE_MEM)`,
`bmrt_load_bmodel`, then `bm_memcpy_s2d` / `bm_memcpy_d2d_byte` / `bm_memcpy_d2s` on each net's
stage-0 input and output memory and `bmrt_launch_tensor_ex` on that memory. So nets share device
memory exactly as on the chip, and a copy whose destination overlaps its source runs as the
simulator's copy engine runs it. The structures below are the runtime's ABI (bmdef.h,
bmlib_runtime.h of libsophon), declared field for field.

`execute` runs a program given as JSON steps (graphopt/device_program.py writes them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from ctypes import POINTER, Structure, Union, c_bool, c_char_p, c_float, c_int, c_int32, c_size_t, c_uint, c_ulong, c_void_p

import numpy as np

SHARE_MEM = 1  # BM_RUNTIME_SHARE_MEM: every net's neuron memory at one address, as the demos set it
# bm_data_type_t -> (name as the layout reports it, numpy dtype of its bits)
DTYPES = {0: ("f32", np.float32), 1: ("f16", np.float16), 2: ("i8", np.int8), 3: ("u8", np.uint8),
          4: ("i16", np.int16), 5: ("u16", np.uint16), 6: ("i32", np.int32), 7: ("u32", np.uint32),
          8: ("bf16", np.uint16)}


class _DeviceAddress(Structure):
    _fields_ = [("device_addr", c_ulong), ("reserved", c_uint), ("dmabuf_fd", c_int)]


class _SystemAddress(Structure):
    _fields_ = [("system_addr", c_void_p), ("reserved0", c_uint), ("reserved1", c_int)]


class _Address(Union):
    _fields_ = [("device", _DeviceAddress), ("system", _SystemAddress)]


class DeviceMem(Structure):  # bm_device_mem_t
    _fields_ = [("u", _Address), ("flags", c_uint), ("size", c_uint)]

    @property
    def addr(self) -> int:
        return int(self.u.device.device_addr)


class Shape(Structure):  # bm_shape_t
    _fields_ = [("num_dims", c_int), ("dims", c_int * 8)]

    def to_tuple(self) -> tuple[int, ...]:
        return tuple(self.dims[i] for i in range(self.num_dims))


class TensorDesc(Structure):  # bm_tensor_t
    _fields_ = [("dtype", c_int), ("shape", Shape), ("device_mem", DeviceMem), ("st_mode", c_int)]


class StageInfo(Structure):  # bm_stage_info_t
    _fields_ = [("input_shapes", POINTER(Shape)), ("output_shapes", POINTER(Shape)),
                ("input_mems", POINTER(DeviceMem)), ("output_mems", POINTER(DeviceMem))]


class NetInfo(Structure):  # bm_net_info_t
    _fields_ = [("name", c_char_p), ("is_dynamic", c_bool), ("input_num", c_int), ("input_names", POINTER(c_char_p)),
                ("input_dtypes", POINTER(c_int)), ("input_scales", POINTER(c_float)), ("output_num", c_int),
                ("output_names", POINTER(c_char_p)), ("output_dtypes", POINTER(c_int)),
                ("output_scales", POINTER(c_float)), ("stage_num", c_int), ("stages", POINTER(StageInfo)),
                ("max_input_bytes", POINTER(c_size_t)), ("max_output_bytes", POINTER(c_size_t)),
                ("input_zero_point", POINTER(c_int)), ("output_zero_point", POINTER(c_int)),
                ("input_loc_devices", POINTER(c_int)), ("output_loc_devices", POINTER(c_int)), ("core_num", c_int),
                ("addr_mode", c_int32)]


class _Engines:
    """The cmodel's engine threads (CORE_MAIN, TPU_BD, TPU_GDMA, ...), which the process's first bm_dev_request
    starts and every device shares. They poll for work without sleeping: an idle worker took both cores of a
    2-core machine (5.8 CPU seconds in 3 s), and bmrt_load_bmodel, copying a bmodel's weights into device
    memory, got a fraction of one (an 8-layer Llama-3.1-8B bmodel, 3 GB: 7.0-16.1 s, 5 runs of 6 past 12.8 s;
    2.9-8.8 s with them held to one core). So they are held to one core except while a program runs: held there
    through a tiny-llama generation too, it took 1.6-1.9x as long."""

    threads: list[int] = []  # their thread ids
    cpus = frozenset(os.sched_getaffinity(0))

    @classmethod
    def request_device(cls, bmlib, handle) -> int:
        """bm_dev_request, noting the threads it started (the first call starts them all) and holding them."""
        before = set(os.listdir("/proc/self/task"))
        status = bmlib.bm_dev_request(ctypes.byref(handle), 0)
        cls.threads += [int(t) for t in set(os.listdir("/proc/self/task")) - before]
        cls.hold(True)
        return status

    @classmethod
    def hold(cls, held: bool) -> None:
        if len(cls.cpus) < 2:
            return
        for thread in cls.threads:
            with contextlib.suppress(OSError):  # a thread that ended, or one the machine's policy keeps where it is
                os.sched_setaffinity(thread, {max(cls.cpus)} if held else cls.cpus)

    @classmethod
    @contextlib.contextmanager
    def running(cls):
        cls.hold(False)
        try:
            yield
        finally:
            cls.hold(True)


def _libraries(bmodel: str):
    """libbmlib and libbmrt over the bmodel's chip's cmodel, linked the way TPU-MLIR's model_runner does."""
    from filelock import FileLock
    from tools import model_runner as mr

    chip = mr.get_chip_from_model(bmodel)
    rvti = mr.get_kernel_mode_from_model(bmodel) == "1"
    with FileLock("/tmp/cmodel_so.lock"):
        mr.link_cmodel_so(chip, rvti)
        mr.link_custom_so(chip)
        mr.link_bmlib_so(chip)
        mr.bind_cmodel_so(chip, rvti)
        lib = os.path.join(os.environ["TPUC_ROOT"], "lib")
        bmlib = ctypes.CDLL(os.path.join(lib, "libbmlib.so.0"), mode=ctypes.RTLD_GLOBAL)
        bmrt = ctypes.CDLL(os.path.join(lib, "libbmrt.so.1.0"), mode=ctypes.RTLD_GLOBAL)
    handle = c_void_p
    bmlib.bm_dev_request.argtypes = [POINTER(c_void_p), c_int]
    bmlib.bm_memcpy_s2d_partial_offset.argtypes = [handle, DeviceMem, c_void_p, c_uint, c_uint]
    bmlib.bm_memcpy_d2s_partial_offset.argtypes = [handle, c_void_p, DeviceMem, c_uint, c_uint]
    bmlib.bm_memcpy_d2d_byte.argtypes = [handle, DeviceMem, c_size_t, DeviceMem, c_size_t, c_size_t]
    bmlib.bm_malloc_device_byte.argtypes = [handle, POINTER(DeviceMem), c_uint]
    bmlib.bm_thread_sync.argtypes = [handle]
    bmlib.bm_memset_device_ext.argtypes = [handle, c_void_p, c_int, DeviceMem]
    bmrt.bmrt_create.argtypes, bmrt.bmrt_create.restype = [handle], c_void_p
    bmrt.bmrt_set_flags.argtypes = [c_void_p, c_uint]
    bmrt.bmrt_load_bmodel.argtypes, bmrt.bmrt_load_bmodel.restype = [c_void_p, c_char_p], c_bool
    bmrt.bmrt_get_network_number.argtypes = [c_void_p]
    bmrt.bmrt_get_network_names.argtypes = [c_void_p, POINTER(POINTER(c_char_p))]
    bmrt.bmrt_get_network_info.argtypes, bmrt.bmrt_get_network_info.restype = [c_void_p, c_char_p], POINTER(NetInfo)
    bmrt.bmrt_launch_tensor_ex.argtypes = [c_void_p, c_char_p, POINTER(TensorDesc), c_int, POINTER(TensorDesc), c_int,
                                           c_bool, c_bool]
    bmrt.bmrt_launch_tensor_ex.restype = c_bool
    return bmlib, bmrt


class Device:
    """One bmodel loaded as the demos load it, on device 0 of the cmodel."""

    def __init__(self, bmodel: str):
        self.bmlib, self.bmrt = _libraries(bmodel)
        self.handle = c_void_p()
        if _Engines.request_device(self.bmlib, self.handle) != 0:
            raise RuntimeError("bm_dev_request failed on the cmodel")
        self.runtime = self.bmrt.bmrt_create(self.handle)
        self.bmrt.bmrt_set_flags(self.runtime, SHARE_MEM)
        if not self.bmrt.bmrt_load_bmodel(self.runtime, bmodel.encode()):
            raise RuntimeError(f"bmrt_load_bmodel could not load {bmodel}")
        names = POINTER(c_char_p)()
        self.bmrt.bmrt_get_network_names(self.runtime, ctypes.byref(names))
        self.nets = {}
        for i in range(self.bmrt.bmrt_get_network_number(self.runtime)):
            info = self.bmrt.bmrt_get_network_info(self.runtime, names[i]).contents
            self.nets[info.name.decode()] = info
        self.buffers: dict[str, DeviceMem] = {}

    # ---- memory, by the stage-0 tensors of a net -----------------------------------------
    def tensor(self, net: str, io: str, index: int, stage: int = 0) -> tuple[DeviceMem, int, tuple[int, ...]]:
        """(memory, bm dtype, shape) of a net's input or output in one of its stages."""
        if net not in self.nets:
            raise KeyError(f"the bmodel has no net '{net}' (it has {', '.join(self.nets)})")
        info = self.nets[net]
        count = info.input_num if io == "in" else info.output_num
        if not 0 <= index < count:
            raise KeyError(f"net '{net}' has {count} {'inputs' if io == 'in' else 'outputs'}, not {index + 1}")
        if not 0 <= stage < info.stage_num:
            raise KeyError(f"net '{net}' has {info.stage_num} stages, not {stage + 1}")
        stage = info.stages[stage]
        if io == "in":
            return stage.input_mems[index], info.input_dtypes[index], stage.input_shapes[index].to_tuple()
        return stage.output_mems[index], info.output_dtypes[index], stage.output_shapes[index].to_tuple()

    def resolve(self, ref: list) -> tuple[DeviceMem, int, tuple[int, ...]]:
        """A program's reference: [net, io, index], ["buffer", name, like] for the runtime's own memory,
        or ["at", ref, row]: ref's memory from that row on (`bm_mem_from_device(addr + offset, rest)`)."""
        if ref[0] == "at":
            base, dtype, shape = self.resolve(ref[1])
            offset = ref[2] * (base.size // _rows(shape))
            mem = DeviceMem()
            mem.u.device.device_addr, mem.size = base.addr + offset, base.size - offset
            return mem, dtype, shape
        if ref[0] == "buffer":  # ["buffer", name, like, rows]: as large as `like`, or `rows` rows of it
            like_mem, dtype, shape = self.resolve(ref[2])
            rows = ref[3] if len(ref) > 3 and ref[3] is not None else _rows(shape)
            shape = (shape[0], rows, *shape[2:]) if len(shape) >= 2 else shape
            if ref[1] not in self.buffers:
                mem, size = DeviceMem(), like_mem.size // _rows(self.resolve(ref[2])[2]) * rows
                if self.bmlib.bm_malloc_device_byte(self.handle, ctypes.byref(mem), size) != 0:
                    raise RuntimeError(f"bm_malloc_device_byte of {size} bytes failed")
                self.buffers[ref[1]] = mem
            return self.buffers[ref[1]], dtype, shape
        return self.tensor(*ref)

    def layout(self) -> dict:
        """Every net's address mode and where its inputs and outputs are: the memory map a runtime sees
        (stage 0; a net with more stages lists theirs under "more_stages")."""
        out = {}
        for name, info in self.nets.items():
            stages = [self._stage_layout(name, info, s) for s in range(info.stage_num)]
            out[name] = {"addr_mode": int(info.addr_mode), "stages": int(info.stage_num), **stages[0]}
            if len(stages) > 1:
                out[name]["more_stages"] = stages[1:]
        return out

    def _stage_layout(self, name: str, info, stage: int) -> dict:
        entry = {"in": [], "out": []}
        for io, count, names in (("in", info.input_num, info.input_names), ("out", info.output_num, info.output_names)):
            for i in range(count):
                mem, dtype, shape = self.tensor(name, io, i, stage)
                entry[io].append({"name": names[i].decode(), "dtype": DTYPES[dtype][0], "shape": list(shape),
                                  "addr": mem.addr, "size": int(mem.size)})
        return entry

    def launch(self, net: str, bind: dict[int, DeviceMem], bind_out: dict[int, DeviceMem] | None = None,
               stage_index: int = 0, dims: list | None = None) -> None:
        """`dims`: [input index, axis, length] a dynamic net runs at (the demos' net_launch_dyn sets
        `in_tensors[i].shape.dims[axis]`); the outputs' shapes are the runtime's to set."""
        info, bind_out = self.nets[net], bind_out or {}
        stage = info.stages[stage_index]
        inputs, outputs = (TensorDesc * info.input_num)(), (TensorDesc * info.output_num)()
        for i in range(info.input_num):
            inputs[i].dtype, inputs[i].shape = info.input_dtypes[i], stage.input_shapes[i]
            inputs[i].device_mem, inputs[i].st_mode = bind.get(i, stage.input_mems[i]), 0
        for index, axis, length in dims or ():
            inputs[index].shape.dims[axis] = length
        for i in range(info.output_num):
            outputs[i].dtype, outputs[i].shape = info.output_dtypes[i], stage.output_shapes[i]
            outputs[i].device_mem, outputs[i].st_mode = bind_out.get(i, stage.output_mems[i]), 0
            if i in bind_out:  # the demo's bm_mem_from_device(addr, the output's own size)
                outputs[i].device_mem.size = stage.output_mems[i].size
        if not self.bmrt.bmrt_launch_tensor_ex(self.runtime, info.name, inputs, info.input_num, outputs,
                                               info.output_num, True, False):
            raise RuntimeError(f"bmrt_launch_tensor_ex failed for net '{net}'")
        self.bmlib.bm_thread_sync(self.handle)

    # ---- programs ------------------------------------------------------------------------
    def execute(self, steps: list[dict], data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with _Engines.running():
            return self._execute(steps, data)

    def _execute(self, steps: list[dict], data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = {}
        for step in steps:
            op = step["op"]
            if op == "write":
                mem, dtype, _ = self.resolve(step["dst"])
                value = data[step["data"]]
                blob = np.ascontiguousarray(value if step["raw"] else to_device(value, dtype)).tobytes()
                if len(blob) > mem.size or (len(blob) < mem.size and not step.get("partial")):
                    raise ValueError(f"the runtime writes {len(blob)} bytes into {step['dst']}, which has {mem.size}")
                buffer = ctypes.create_string_buffer(blob, len(blob))
                self._check(self.bmlib.bm_memcpy_s2d_partial_offset(self.handle, mem, buffer, len(blob), 0), "s2d")
            elif op == "fill":
                mem, _, _ = self.resolve(step["dst"])
                self._check(self.bmlib.bm_memset_device_ext(self.handle, ctypes.byref(ctypes.c_int(0)), 1, mem),
                            "memset")
            elif op == "copy":
                (dst, _, dst_shape), (src, _, src_shape) = self.resolve(step["dst"]), self.resolve(step["src"])
                src_row, dst_row = src.size // _rows(src_shape), dst.size // _rows(dst_shape)
                size = src.size if step["rows"] is None else step["rows"] * src_row
                self._check(self.bmlib.bm_memcpy_d2d_byte(self.handle, dst, step["dst_row"] * dst_row, src,
                                                          step["src_row"] * src_row, size), "d2d")
            elif op == "launch":
                self.launch(step["net"], {int(i): self.resolve(ref)[0] for i, ref in step["bind"]},
                            {int(i): self.resolve(ref)[0] for i, ref in step.get("bind_out", [])}, step.get("stage", 0),
                            step.get("dims"))
            elif op == "read":
                mem, dtype, shape = self.resolve(step["src"])
                row = mem.size // _rows(shape)
                size = mem.size - step["row"] * row if step["rows"] is None else step["rows"] * row
                raw = ctypes.create_string_buffer(size)
                self._check(self.bmlib.bm_memcpy_d2s_partial_offset(self.handle, raw, mem, size, step["row"] * row), "d2s")
                results[step["name"]] = from_device(np.frombuffer(raw.raw, DTYPES[dtype][1]), dtype)
        return results

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"bm_memcpy ({what}) failed with status {status}")


def _rows(shape: tuple[int, ...]) -> int:
    return shape[1] if len(shape) >= 2 else 1  # rows along axis 1, as graphopt/device_program.py counts them


def to_device(value: np.ndarray, dtype: int) -> np.ndarray:
    """A value converted to a net's dtype (bf16: round to nearest even, kept as its uint16 bits)."""
    if DTYPES[dtype][0] == "bf16":
        bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.asarray(value).astype(DTYPES[dtype][1])


def from_device(bits: np.ndarray, dtype: int) -> np.ndarray:
    """Device bits as float32 (float dtypes) or int32 (integer dtypes)."""
    name = DTYPES[dtype][0]
    if name == "bf16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if name in ("f16", "f32"):
        return bits.astype(np.float32)
    return bits.astype(np.int32)

