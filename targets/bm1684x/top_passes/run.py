"""Apply top passes to a top-level MLIR file: `run.py IN OUT MODULE:NAME...`; prints one JSON line per pass.

Runs under the toolchain's Python, where TPU-MLIR's `mlir` bindings are importable (graphopt is
not: top_passes/__init__.py declares each pass and names its module here). OUT is written to a
temporary name and renamed when complete.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from mlir.ir import Context, Location, Module

from _mlir import erase_dead, op

def main(source: str, target: str, passes: list[str]) -> int:
    context = Context()
    context.allow_unregistered_dialects = True
    with context, Location.unknown():
        with open(source) as handle:
            module = Module.parse(handle.read())
        block = module.body.operations[0].regions[0].blocks[0]
        none = next(op(o) for o in block.operations if op(o).name == "top.None").results[0]
        for entry in passes:
            code, name = entry.split(":", 1)
            result = importlib.import_module(code).run(block, none)
            result["erased"] = erase_dead(block)
            print(json.dumps({"pass": name, **result}), flush=True)
        partial = f"{target}.partial"
        with open(partial, "w") as handle:
            handle.write(module.operation.get_asm(enable_debug_info=True))
        os.replace(partial, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
