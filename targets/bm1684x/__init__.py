"""The Sophgo BM1684X target: the onnx target's networks, compiled by TPU-MLIR into one bmodel
that LLM-TPU's chat runtime loads.

  contract.py        the runtime's networks: model_deploy flags per net, quantization modes
  toolchain.py       TPU-MLIR found on PATH or installed under ~/.cache/graphopt
  deploy.py          model_transform + model_deploy per net (parallel, cached), then combine
  combine.py         the nets' bmodels as one (model_tool --combine's bytes, streamed), with bmodel_format.py
  top_passes/        rewrites of model_transform's MLIR before model_deploy (fuse-flash-attention)
  simulator.py       nets run in TPU-MLIR's cmodel simulator (worker: sim_worker.py)
  verify.py          simulator against onnxruntime: per-net cosine, greedy generation
  interpreter.py     a net's MLIR in TPU-MLIR's interpreter (model_runner), for checks below the bmodel
  inspect_bmodel.py  `graphopt inspect`: a bmodel's nets checked against the contract
  build.py           the target's build step, in that order
"""

from typing import Any

from graphopt.targets.base import Target
from graphopt.targets.bm1684x.top_passes import TOP_PIPELINE
from graphopt.targets.pipeline import FX_PIPELINE, ONNX_PIPELINE


class Bm1684xBuild:
    """The target's build step (build.py), imported when a build runs: choosing the target, listing its
    passes or reading its contract loads nothing of TPU-MLIR's tooling."""

    def validate(self, source, options: dict[str, Any]) -> None:
        from graphopt.targets.bm1684x.build import validate

        validate(source, options)

    def disk_needs(self, *args):
        from graphopt.targets.bm1684x.build import disk_needs

        return disk_needs(*args)

    def build(self, *args, **kwargs):
        from graphopt.targets.bm1684x.build import build

        return build(*args, **kwargs)


# TPU-MLIR takes the same networks as the onnx target: tables for RoPE (fp32 until the gather,
# which BF16 lowering needs for positions > 256), Linear-layout weights (which W4/W8 quantize well),
# then its own top MLIR gets the top passes.
BM1684X_TARGET = Target("bm1684x", "one int4/int8 .bmodel for the Sophgo BM1684X via TPU-MLIR, checked in its simulator",
                        FX_PIPELINE, ONNX_PIPELINE, Bm1684xBuild(), TOP_PIPELINE)
