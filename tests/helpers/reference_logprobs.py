"""Plain, unbatched computations the tests check the learners' batched code against."""

from __future__ import annotations

import torch
from torch import Tensor

from treeplay.learners.logprobs import encode_masked_response


def encode_response(tokenizer, text: str, eos: bool = False) -> list[int]:
    """Token ids of a response, tokenized on its own; ``eos`` appends the EOS id."""
    return encode_masked_response(tokenizer, text, None, eos)[0]


def unshared_logprobs(model, prompt: list[int], response: list[int]) -> Tensor:
    """Reference computation: per-token log-probs of one response in its own plain forward pass."""
    ids = torch.tensor([prompt + response], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(1, ids[0, len(prompt) :, None]).squeeze(1)
