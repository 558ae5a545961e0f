"""`manifest.json`: what an output directory holds (the model, its config, the seq length, every network
with its files, I/O names, shapes and sha256, the passes applied and what each changed), written by
the compile and read by the runtime, the targets and `graphopt generate`."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from graphopt.errors import GraphoptError

MANIFEST = "manifest.json"
FORMAT = "graphopt-networks/1"


def build_manifest(source, target, seq_length: int, results, contract) -> dict:
    """The manifest of `results` (export.NetworkResult, in contract order) compiled from `source` for `target`."""
    import torch
    import transformers

    import graphopt

    return {
        "format": FORMAT,
        "graphopt": graphopt.__version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": source.describe(),
        "target": target.name,
        "seq_length": seq_length,
        "contract": contract.key,
        **({"contract_options": sorted(contract.options)} if contract.options else {}),
        "pipeline": {stage: list(target.pipeline(stage)) for stage in ("fx", "onnx", "top") if target.pipeline(stage)},
        "networks": [
            {
                "name": r.name,
                "kind": r.kind,
                "file": r.files[0].name,
                "external_data": [f.name for f in r.files[1:]],
                "sha256": r.sha256,  # covers the codes file too
                **({"codes": r.codes.name} if r.codes else {}),
                "inputs": [s.to_json() for s in r.inputs],
                "outputs": [s.to_json() for s in r.outputs],
                "dynamic_axes": r.dynamic_axes,
                "passes": [{"pass": p.pass_name, "changed": p.changed, "note": p.note} for p in r.passes],
            }
            for r in results
        ],
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise GraphoptError(f"{directory} has no {MANIFEST}: it is not a graphopt output directory. Create one with "
                            "`graphopt run MODEL --target onnx --out DIR` and pass that DIR.")
    return json.loads(path.read_text())
