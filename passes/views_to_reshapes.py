"""views-to-reshapes: make every view a reshape, so no rewrite has to preserve strides.

A traced `view` is valid only for the strides its input had at trace time. Once a pass
replaces that input (say attention by MatMul/Softmax, whose output is laid out
differently), the view may no longer apply. `reshape` means the same thing for any layout,
and ONNX has only Reshape anyway.
"""

from __future__ import annotations

import torch

from graphopt.ir import NetworkGraph
from graphopt.pass_manager import Pass, PassResult, register_pass

aten = torch.ops.aten
VIEWS = (aten.view.default, aten._unsafe_view.default)


@register_pass
class ViewsToReshapes(Pass):
    """Turn view/_unsafe_view into reshape so later rewrites need not preserve memory layout."""

    name = "views-to-reshapes"
    requires = ("trace.clean",)  # asserts and no-op casts hide which views feed what
    ensures = ("layout.free",)

    def run(self, net: NetworkGraph) -> PassResult:
        views = list(net.calls(*VIEWS))
        for node in views:
            node.target = aten.reshape.default
        return PassResult(len(views), f"{len(views)} view(s) made reshapes")
