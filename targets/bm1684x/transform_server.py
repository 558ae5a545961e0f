"""model_transform, run many times in one toolchain process (run in TPU-MLIR's Python, like the top passes).

TPU-MLIR's own model_transform.py runs unchanged for each net (its `__main__`, by runpy); what this
process saves is work that is the same for every net or that graphopt's ONNX never needs. Measured on
one Llama-3.1-8B block (873 MB ONNX, 19.7 s in all) and lm_head (2.1 GB, 41.6 s):
  - the imports, 4 s a net (onnxruntime_extensions alone pulls in transformers), paid once per worker;
  - FakeQuantNodelProcessor's full onnx.load (1.5 s / 3.8 s), made to read the graph without its weights:
    it only looks for fake-quant op types, which graphopt never writes;
  - the `NAME_opt.onnx` copy of the whole model that OnnxConverter saves for model_validate (2.3 s / 5.7 s),
    which graphopt never runs (no --test_input).
And memory: once the converter has written the MLIR and its weights, it lets go of the ONNX model and the
weights it holds, before tpuc-opt reads them back. The command keeps them to its end, beside tpuc-opt's own
copy: lm_head's transform peaked at 13.5 GB (5.0 GB here, 8.4 GB tpuc-opt), then 7.86 GiB. The converter
reads the graph alone and each weight straight from its file, and folds the Transpose of a weight that
tpuc-opt would fold (both below): lm_head's transform 31.6 s / 7.86 GiB -> 14.4 s / 4.7 GiB.
The top MLIR and weights it writes are byte-for-byte those of the command (tests/test_bm1684x.py,
test_the_transform_server_writes_what_the_model_transform_command_writes, holds it to that). Asked to keep the
converter's weights file (what graphopt's compiles ask), tpuc-opt writes none: the top MLIR is the command's but
for the file it names, and that file holds each of its weights with the command's bytes (the test after it).

Protocol: one JSON request per line on stdin, {"args": [...], "cwd": DIR, "log": FILE, "keep_converter_weights":
BOOL}; one JSON answer per line on the original stdout, {"status": N, "peak_rss": BYTES, "kept_converter_weights":
BOOL}. The tool's own output goes to the log. "keep_converter_weights" (`_patch_keeping`): the top MLIR names the
converter's weights file and tpuc-opt writes none; answered false when the file does not hold the top MLIR's
weights, and the net was then made as the command makes it.
"""

import json
import math
import os
import resource
import runpy
import sys
import traceback


def _patch(tools: str) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    sys.path.insert(0, tools)
    from tpu_mlir.python.tools import deploy_qat

    def fakequant_nodes(self, path):
        self.model = onnx.load(path, load_external_data=False)  # the op types are all it reads
        self.graph = self.model.graph
        return any(node.op_type in set(self.ALL_FAKEQUANTIZER) for node in self.graph.node)

    deploy_qat.FakeQuantNodelProcessor.check_onnx_for_fakequant_nodes = fakequant_nodes
    save = onnx.save

    def save_but_the_opt_copy(model, path, *args, **kwargs):
        if isinstance(path, str) and path.endswith("_opt.onnx"):
            return None
        return save(model, path, *args, **kwargs)

    onnx.save = save_but_the_opt_copy

    # The converter loads the whole model (the weights into the ModelProto), turns each initializer into an
    # array (to_array, then astype: two more copies), and copies the ModelProto once more for a text dump:
    # lm_head's 2.1 GB were held three times (converter peak 6.65 GiB). Loaded without its external data, the
    # model is the graph alone, and each initializer is read from its file straight into the one array the
    # converter keeps.
    load = onnx.load
    folders = []  # the directory of the model the converter loaded last: where its external data is

    def load_graph_only(f, *args, **kwargs):
        if isinstance(f, str) and f.endswith(".onnx") and not args and not kwargs:
            folders[:] = [os.path.dirname(os.path.abspath(f))]
            return load(f, load_external_data=False)
        return load(f, *args, **kwargs)

    onnx.load = load_graph_only
    to_array = numpy_helper.to_array

    def to_array_from_file(tensor, base_dir=""):
        if tensor.data_location != onnx.TensorProto.EXTERNAL or not folders:
            return to_array(tensor, base_dir)
        info = {entry.key: entry.value for entry in tensor.external_data}
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        with open(os.path.join(base_dir or folders[0], info["location"]), "rb") as data:
            data.seek(int(info.get("offset", 0)))
            count = int(np.prod(tensor.dims, dtype=np.int64))
            return np.fromfile(data, dtype=dtype, count=count).reshape(tuple(tensor.dims))

    numpy_helper.to_array = to_array_from_file

    from transform.OnnxConverter import OnnxConverter  # the module model_transform.py imports (not tpu_mlir.python.…)

    generate = OnnxConverter.generate_mlir

    def generate_then_let_go(self, mlir_file):
        generate(self, mlir_file)
        # What follows reads the files just written (tpuc-opt); only model_validate (--test_input, which
        # graphopt never passes: main refuses it) would read these again.
        self.tensors.clear()
        del self.model.graph.initializer[:]
        _release()

    OnnxConverter.generate_mlir = generate_then_let_go

    # tpuc-opt's canonicalize folds the Transpose that reads a Linear's [out, in] weight into a weight
    # `<node>_Transpose_folder` holding it [in, out]: for lm_head's 2.1 GB that pass held it four times
    # (tpuc-opt 8.4 GB of the net's 7.86 GiB peak, 19 s). The converter makes that weight itself instead,
    # letting go of the [out, in] one, so tpuc-opt has nothing to fold: the same MLIR and weights.
    convert_transpose = OnnxConverter.convert_transpose_op

    def convert_transpose_of_a_weight(self, onnx_node):
        source = onnx_node.inputs[0]
        if not (self.isWeight(source) and len(self.getShape(source)) == 2 and source not in self.operands
                and list(onnx_node.attrs.get("perm", [])) == [1, 0]
                and sum(source in node.input for node in self.model.graph.node) == 1):  # nothing else reads it
            return convert_transpose(self, onnx_node)
        import torch  # transposes a 128256 x 4096 matrix several times faster than numpy's copy

        folded = f"{onnx_node.name}_{onnx_node.op_type}_folder"
        weight = self.tensors.pop(source)
        shape = [weight.shape[1], weight.shape[0]]
        # stored flat, as tpuc-opt stores the weights it makes (those it only passes on keep their shape)
        self.addWeight(folded, torch.from_numpy(weight).t().contiguous().numpy().reshape(-1))
        del weight
        self.addOperand(onnx_node.name, self.getWeightOp(folded, shape))

    OnnxConverter.convert_transpose_op = convert_transpose_of_a_weight


class _Keep:
    """Whether the request running now leaves the top weights in the converter's file (its "keep_converter_weights")."""
    converter_weights = False


def _patch_keeping(mlir_shell, auto_remove) -> None:
    """A request may ask tpuc-opt for no weights file of its own: its top MLIR then names the converter's
    (`--deinit="no_save_weight=True"`, as TPU-MLIR's own in-memory pipeline runs it), which model_transform would
    delete at its end and here keeps. tpuc-opt then never reads the weights unless a pattern folds one (it read
    none of an 8B head's 2.1 GB); what is saved is its read and its write of them all. Whether the file still
    holds what the top MLIR names is checked after (`_kept_weights_hold`)."""
    top_options = mlir_shell.top_opt_options

    def top_options_writing_no_weights(*args, **kwargs):
        options = top_options(*args, **kwargs)
        return [*options, '--deinit="no_save_weight=True"'] if _Keep.converter_weights else options

    mlir_shell.top_opt_options = top_options_writing_no_weights
    clean = auto_remove.file_clean

    def clean_but_the_converters_weights():
        if _Keep.converter_weights:  # an _origin.mlir marked here stands for its weights file: the top MLIR's now
            auto_remove.g_auto_remove_files[:] = [f for f in auto_remove.g_auto_remove_files
                                                  if not f.endswith("_origin.mlir")]
        clean()

    auto_remove.file_clean = clean_but_the_converters_weights


def _weights_named(mlir_file: str) -> tuple[str, dict[str, str]]:
    """A module's weights file and its weights, name -> type."""
    from tpu_mlir.python.utils.mlir_parser import MlirParser, Operation

    parser = MlirParser(mlir_file)
    return parser.module_weight_file, {Operation.name(op): str(op.results[0].type) for op in parser.body.operations
                                       if Operation.type(op) == "top.Weight"}


def _elements(kind: str) -> tuple[str, int] | None:
    """`tensor<1x1x4096xf32>` -> ("f32", 4096): what a weight's bytes are, whatever its shape; None if unranked."""
    *dims, element = kind.removeprefix("tensor<").removesuffix(">").split("x")
    return (element, math.prod(int(d) for d in dims)) if all(d.isdigit() for d in dims) else None


def _kept_weights_hold(args: list[str]) -> str:
    """"" when each weight of the top MLIR is one of the converter's, by name, with its element type and count;
    else what differs. A weight a pattern made from others has a name of its own, which the converter's file does
    not hold (tpuc-opt did not write it). Only its shape may differ: fusing RMSNorm gives the norm's [4096]
    weight the type [1, 1, 4096] and keeps its name and bytes."""
    top = args[args.index("--mlir") + 1]
    origin_file, origin = _weights_named(top.replace(".mlir", "_origin.mlir", 1))
    top_file, weights = _weights_named(top)
    if top_file != origin_file or not os.path.isfile(top_file):
        return f"the top MLIR names weights file {top_file}, not the converter's {origin_file}"
    made = sorted(name for name, kind in weights.items()
                  if name not in origin or _elements(kind) is None or _elements(kind) != _elements(origin[name]))
    return f"tpuc-opt made {len(made)} weight(s) the converter did not ({', '.join(made[:3])})" if made else ""


def _children_peak() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _peak_rss(children_before: int) -> int:
    """This net's peak: this process's since the reset, or the largest process it waited for (tpuc-opt) when
    that one set a new high (the kernel keeps one maximum over all children, so a smaller one is not seen)."""
    with open("/proc/self/status") as status:
        own = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    children = _children_peak()
    return max(own, children if children > children_before else 0)


def _release() -> None:
    """Gives back what the net held (the converter's weights sit in reference cycles; glibc keeps freed heap),
    so the next net starts from the worker's own size, as the memory plan counts it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def main() -> None:
    try:
        import tpu_mlir  # noqa: F401  (the wheel's: sets TPU-MLIR's environment, which graphopt also passes)
    except ImportError:
        pass  # a tpuc_dev image: envsetup.sh set it

    tools = os.path.join(os.environ["TPUC_ROOT"], "python", "tools")
    script = os.path.join(tools, "model_transform.py")
    _patch(tools)
    from tpu_mlir.python.utils import auto_remove, mlir_shell

    _patch_keeping(mlir_shell, auto_remove)

    answers = os.fdopen(os.dup(1), "w")
    saved = os.dup(1), os.dup(2)
    for line in sys.stdin:
        request = json.loads(line)
        if "--test_input" in request["args"]:  # the converter let go of what model_validate reads
            with open(request["log"], "a") as log:
                log.write("transform_server: --test_input is not served here (model_validate would read the weights "
                          "the converter let go of); run model_transform.py itself for it\n")
            answers.write(json.dumps({"status": 2, "peak_rss": 0}) + "\n")
            answers.flush()
            continue
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM: this net's peak, not the worker's
        children_before = _children_peak()
        keep = bool(request.get("keep_converter_weights"))
        status = _run(script, request, keep, auto_remove, saved)
        if status == 0 and keep:
            try:
                why = _kept_weights_hold(request["args"])
            except Exception as error:  # noqa: BLE001  (an MLIR the parser cannot read: not kept, as any other)
                why = f"{type(error).__name__}: {error}"
            if why:  # the tool again, writing its own weights file: the net is made as the command makes it
                with open(request["log"], "a") as log:
                    log.write(f"transform_server: the converter's weights file is not the top MLIR's: {why}; "
                              "model_transform again, tpuc-opt writing its own\n")
                keep = False
                status = _run(script, request, keep, auto_remove, saved)
        _release()
        answers.write(json.dumps({"status": status, "peak_rss": _peak_rss(children_before),
                                  "kept_converter_weights": keep and status == 0}) + "\n")
        answers.flush()


def _run(script: str, request: dict, keep: bool, auto_remove, saved: tuple[int, int]) -> int:
    """TPU-MLIR's model_transform.py for one request, its output to the request's log: its exit status."""
    status = 0
    _Keep.converter_weights = keep
    with open(request["log"], "a") as log:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            os.chdir(request["cwd"])
            auto_remove.g_auto_remove_files.clear()
            sys.argv = [script, *request["args"]]
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            _Keep.converter_weights = False
    return status


if __name__ == "__main__":
    main()
