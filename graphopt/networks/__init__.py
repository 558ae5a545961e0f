"""The networks a model is split into, as the contract names them (graphopt/contract.py): thin
wrappers over the model's own modules, traced one at a time.

  plan.py     NetworkPlan: what to trace for one network
  decoder.py  a decoder-only model's networks (embedding, block_i, block_cache_i, heads)
  seq2seq.py  an encoder-decoder model's (encoder, cross_kv, embedding, decoder blocks, heads)
"""

from __future__ import annotations

from graphopt import contract as c
from graphopt.ir import NetworkGraph
from graphopt.models.source import ModelSource
from graphopt.networks.plan import NetworkPlan
from graphopt.trace import trace_network


def plan_networks(source: ModelSource, seq_length: int, layers: list[int] | None = None,
                  contract: c.Contract | None = None, max_input_length: int | None = None) -> list[NetworkPlan]:
    """Every network of `source` (the decoder layers in `layers` only, when given), in the order of
    `contract` (a decoder-only model's; an encoder-decoder model has its own)."""
    if source.is_encoder_decoder:
        from graphopt.networks.seq2seq import plan_seq2seq_networks

        return plan_seq2seq_networks(source, seq_length, layers)
    from graphopt.networks.decoder import plan_decoder_networks

    return plan_decoder_networks(source, seq_length, layers, contract or c.contract_for(False), max_input_length)


def trace_plan(source: ModelSource, plan: NetworkPlan, seq_length: int) -> NetworkGraph:
    with source.materialized(*plan.weights_of()):
        module, inputs = plan.make()
        return trace_network(module, dict(zip(plan.input_names, inputs)), name=plan.name, kind=plan.kind,
                             output_names=plan.output_names, seq_length=seq_length)


__all__ = ["NetworkPlan", "plan_networks", "trace_plan"]
