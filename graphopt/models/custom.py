"""Your own decoder-only `nn.Module` as a graphopt model: a Python file that declares an adapter.

    # my_model.py
    ADAPTER = CustomDecoder(
        build=lambda: MyModel(MyConfig()),       # the whole model; graphopt builds it on the meta device
        embed="tok_emb", layers="blocks", norm="norm", head="lm_head",   # where the networks' modules are
        call_block=lambda block, input_states, position_ids, attention_mask: block(input_states, position_ids,
                                                                                  attention_mask),
        vocab_size=1024, hidden_size=128, max_positions=512,
    )

    graphopt run my_model.py [--model-path DIR_WITH_SAFETENSORS]

`call_block` says what a block's inputs mean: graphopt calls it with the contract's
`input_states [1,T,H]`, `position_ids [1,T]` and the additive `attention_mask [1,1,T,K]`
(0 / -10000), and it returns the block's hidden states. The same passes as for transformers
models then rewrite the traced blocks, reading them by what they compute: attention called as
`F.scaled_dot_product_attention` or written out (`q @ kᵀ`, scale, mask, softmax, `@ v`); its mask
that `attention_mask`, or one the block builds from `position_ids` that is the causal mask (then
`call_block` may leave `attention_mask` out); what it computes from `position_ids` alone (RoPE
angles) becomes tables. Tied weights (a head that shares the
embedding's matrix) are found by identity. Weights are seeded random (`init_std`) or, with
`--model-path DIR`, the model's own `state_dict` names read from DIR's *.safetensors.
`reference_logits` is the model's own forward, the reference every stage is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from graphopt.errors import GraphoptError
from graphopt.user_files import import_user_file

ADAPTER_NAME = "ADAPTER"


def _default_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids)


@dataclass
class CustomDecoder:
    """Where graphopt finds the networks of a user's decoder-only module, and what a block's inputs mean."""

    build: Callable[[], nn.Module]
    embed: str  # attribute path (dots allowed) of the token embedding: input_ids -> [1,T,H]
    layers: str  # the nn.ModuleList of blocks
    norm: str  # the final norm
    head: str  # [.., H] -> logits
    call_block: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    vocab_size: int
    hidden_size: int
    max_positions: int
    # The model's own forward, for the reference: input_ids [1,T] -> logits [1,T,V].
    reference_logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _default_logits
    init_std: float = 0.02  # random weights: normal(0, init_std), norm scales 1 + noise
    name: str = ""
    extra_config: dict = field(default_factory=dict)  # recorded in manifest.json with the rest


class CustomConfig:
    """The little of a transformers config graphopt reads, for a model that has none."""

    model_type = "custom"
    is_encoder_decoder = False

    def __init__(self, adapter: CustomDecoder, num_layers: int):
        self.vocab_size, self.hidden_size = adapter.vocab_size, adapter.hidden_size
        self.max_position_embeddings, self.num_hidden_layers = adapter.max_positions, num_layers
        self.init_std = adapter.init_std
        self._extra = dict(adapter.extra_config)
        for key, value in self._extra.items():  # e.g. num_attention_heads, which bm1684x's W4 check reads
            setattr(self, key, value)

    def to_diff_dict(self) -> dict:
        return {"model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "max_position_embeddings": self.max_position_embeddings, "num_hidden_layers": self.num_hidden_layers,
                **self._extra}


def load_adapter(path: Path) -> CustomDecoder:
    """The ADAPTER a model file declares (the file is imported once per process)."""
    try:
        module = import_user_file(Path(path), "graphopt_user_model_")
    except Exception as error:
        raise GraphoptError(f"the model file {path} could not be loaded: {type(error).__name__}: {error}. Run it "
                            "with `python FILE` to see the traceback.") from None
    adapter = getattr(module, ADAPTER_NAME, None)
    if not isinstance(adapter, CustomDecoder):
        raise GraphoptError(f"the model file {path} declares no {ADAPTER_NAME} = CustomDecoder(...): graphopt needs "
                            "it to know where the embedding, the blocks and the head are (docs/writing-passes.md, "
                            "'Your own model').")
    return adapter


def resolve(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise GraphoptError(f"the adapter's {what} = '{path}' is not a submodule of {type(model).__name__}; give the "
                            "attribute path of the module (e.g. 'transformer.blocks').") from None


class CustomBlock(nn.Module):
    """A user's block, called with the contract's inputs through the adapter's `call_block`."""

    def __init__(self, layer: nn.Module, call_block):
        super().__init__()
        self.layer, self.call_block = layer, call_block

    def forward(self, input_states, position_ids, attention_mask):
        return self.call_block(self.layer, input_states, position_ids, attention_mask)
