"""What the export holds: one network's weights at a time."""

import gc
import weakref

from graphopt.models import open_model
from graphopt.networks import plan_networks, trace_plan


def test_a_traced_network_and_its_weights_are_gone_once_it_is_dropped():
    """torch.export keeps the nodes of its last trace in a module global until the next trace has ended; trace.py
    clears it, so a network's graph and weights go when the export drops them (8B: the embedding's 2.1 GB lived on
    under lm_head's export, whose process peaked at 8.3 GiB instead of 6.3)."""
    source = open_model("tiny-llama")
    plan = next(p for p in plan_networks(source, 16, layers=[0]) if p.name == "embedding")
    net = trace_plan(source, plan, 16)
    weights = [weakref.ref(t) for t in [*net.gm.parameters(), *net.gm.buffers()] if t.numel() >= 1024]
    graph = weakref.ref(net.gm)
    assert weights
    source.release()
    del net
    gc.collect()
    assert graph() is None and all(w() is None for w in weights)


def test_a_released_source_maps_no_part_of_its_checkpoint(tmp_path):
    """safetensors maps a whole file and reads tensors out of the mapping: every page a layer's read touched stayed
    resident in the export process while the file was open (an 8B export process grew 0.4 GiB a layer). Released
    after a weight group, the source holds no mapping of its checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = tmp_path / "checkpoint"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(open_model("tiny-llama").config).save_pretrained(checkpoint)
    source = open_model(str(checkpoint))

    def mapped() -> bool:
        return str(checkpoint) in open("/proc/self/maps").read()

    with source.materialized(source.parts.layers[0]):
        assert mapped()
    source.release()
    gc.collect()
    assert not mapped()
