"""Apply top passes to a top-level MLIR file: `run.py IN OUT CONTEXT MODULE:NAME...`; prints one JSON line per pass.

Runs under the toolchain's Python, where TPU-MLIR's `mlir` bindings are importable (graphopt is
not: top_passes/__init__.py declares each pass and names its module here). CONTEXT is JSON about the
net (`{"dynamic": bool}`). OUT is written to a temporary name and renamed when complete, after the
weight file, where a pass added weights.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from mlir.ir import Context, Location, Module

from _mlir import Context as PassContext, Weights, erase_dead, op


def main(source: str, target: str, context_json: str, passes: list[str]) -> int:
    context = Context()
    context.allow_unregistered_dialects = True
    with context, Location.unknown():
        with open(source) as handle:
            module = Module.parse(handle.read())
        block = module.body.operations[0].regions[0].blocks[0]
        none = next(op(o) for o in block.operations if op(o).name == "top.None").results[0]
        weights = Weights(os.path.join(os.path.dirname(os.path.abspath(source)),
                                       str(module.operation.attributes["module.weight_file"]).strip('"')))
        context = PassContext(weights=weights, **json.loads(context_json))
        for entry in passes:
            code, name = entry.split(":", 1)
            result = importlib.import_module(code).run(block, none, context)
            result["erased"] = erase_dead(block)
            print(json.dumps({"pass": name, **result}), flush=True)
        weights.save()
        partial = f"{target}.partial"
        with open(partial, "w") as handle:
            handle.write(module.operation.get_asm(enable_debug_info=True))
        os.replace(partial, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
