"""The reference every check holds the compiled networks to: the model's own greedy generation, with
the logits of every step. transformers' `generate` for a transformers model; the user's own forward,
token by token, for a model given through a CustomDecoder adapter."""

from __future__ import annotations

import torch


def hf_greedy(model, prompt: list[int], new_tokens: int) -> dict:
    """transformers' own greedy generation, EOS ignored, with the logits of every step.

    For an encoder-decoder model the prompt is the source, and the target starts with the decoder
    start token. Its generation config is replaced by a plain greedy one: translation models ship
    logits processors (forced EOS at the length limit, banned pad tokens) that the networks,
    which output raw logits, leave to the runtime."""
    if model.config.is_encoder_decoder:
        from transformers import GenerationConfig

        start = model.generation_config.decoder_start_token_id
        model.generation_config = GenerationConfig(decoder_start_token_id=start, pad_token_id=0)
        skip = 1
    else:
        skip = len(prompt)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             output_logits=True, return_dict_in_generate=True)
    return {"tokens": out.sequences[0, skip:].tolist(), "logits": [l[0].numpy() for l in out.logits]}


def custom_greedy(model, adapter, prompt: list[int], new_tokens: int) -> dict:
    """A user's model (CustomDecoder adapter) by its own forward, no KV cache: the whole sequence each step."""
    ids, tokens, logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            step = adapter.reference_logits(model, torch.tensor([ids]))[0, -1]
            tokens.append(int(step.argmax()))
            logits.append(step.float().numpy())
            ids.append(tokens[-1])
    return {"tokens": tokens, "logits": logits}
