"""torch.export a network wrapper into the NetworkGraph form the passes work on.

`run_decompositions({})` turns export's training IR into inference IR without decomposing
anything: it inlines the `no_grad` / `autocast` wrappers that rotary-embedding code puts
around its maths, and keeps `aten.linear` and `aten.scaled_dot_product_attention` whole, so
passes can find them. Lifted weights become `get_attr` nodes again, because the ONNX
exporter and a reader of `--dump-after` output both want weights as module attributes.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind

from graphopt.errors import GraphoptError
from graphopt.ir import NetworkGraph


def trace_network(
    module: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor],
    *,
    name: str,
    kind: str,
    output_names: list[str],
    seq_length: int,
) -> NetworkGraph:
    """Export `module(*example_inputs.values())`; its forward's parameters must be named as the
    network's inputs (the contract's names, the keys of `example_inputs`), since they become the
    placeholder (and so the ONNX input) names."""
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module, tuple(example_inputs.values()), strict=False)
        except Exception as error:  # the model's own code, run on the network's inputs
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in example_inputs.items())
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            raise GraphoptError(
                f"torch.export could not trace network '{name}' ({type(module).__name__} over the model's modules, "
                f"inputs {shapes}): {type(error).__name__}: {first_line}. The model's code does not run, or "
                "does not trace, as this kind of network; its architecture may need an adapter (set "
                "GRAPHOPT_TRACEBACK=1 to see where it failed)."
            ) from error
        program = program.run_decompositions({})
    _forget_the_trace()
    gm = _unlift(program)
    net = NetworkGraph(name=name, kind=kind, gm=gm, output_names=list(output_names), seq_length=seq_length)
    placeholder_names = [n.name for n in net.placeholders()]
    if placeholder_names != list(example_inputs):  # a wrapper's forward spells the contract's input names
        raise GraphoptError(f"network '{name}' traced with inputs {placeholder_names}, but its contract names them "
                            f"{list(example_inputs)}: its wrapper's forward must take them under those names.")
    assert len(net.output_values()) == len(output_names), (name, len(net.output_values()), output_names)
    net.finalize()
    return net


def _forget_the_trace() -> None:
    """torch.export keeps the nodes of its last trace in a module global (proxy_tensor's
    `_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT`, for its fake-tensor leak detection) until the next trace has
    ended: through them the previous network's graph and weights lived on while the next network was traced
    and checked (8B: the embedding's 2.1 GB under lm_head's export, whose process peaked at 8.3 GiB). Nothing
    reads it once export has returned."""
    from torch.fx.experimental import proxy_tensor

    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()


def _unlift(program: torch.export.ExportedProgram) -> fx.GraphModule:
    graph = program.graph
    tensors = {**program.state_dict, **program.constants}
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    attrs: dict[str, torch.Tensor] = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        node = placeholders[spec.arg.name]
        with graph.inserting_before(first_op):
            attr = graph.create_node("get_attr", spec.target)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        attrs[spec.target] = tensors[spec.target].detach()
    return fx.GraphModule(attrs, graph)
