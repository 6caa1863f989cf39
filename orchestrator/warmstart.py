"""Supervised warm start: teach a fresh model the task format on demonstrations before self-play.

Self-improvement needs a policy that already solves some tasks (the demo aims for a warm start at
20–55% held-out accuracy, see docs/tiny-models.md). This is plain next-token cross-entropy on the completion
tokens of (prompt, completion) pairs, prompt tokens masked, with the tokenization search prompts
the policy with (the prompt, then each line of the completion, each tokenized on its own).

    python -m orchestrator.warmstart MODEL_DIR --steps 600   # on arithmetic demonstrations
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def _encode(tok, examples: Sequence[tuple[str, str] | tuple[str, str, bool]]) -> list[tuple[list[int], int]]:
    # Each line of a completion is tokenized on its own: that is how search's token-in, token-out
    # contexts hold the steps (a BPE merge never spans two steps there), so the warm start teaches
    # the tokens the policy will be prompted with. With the char tokenizer it changes nothing.
    # A demonstration that ``ends`` (agents.base.Demonstration: a whole rubric or verdict) is
    # followed by the end-of-sequence token, so the policy learns to stop there.
    p_ids = tok([ex[0] for ex in examples], add_special_tokens=False).input_ids
    out = []
    for p, ex in zip(p_ids, examples, strict=True):
        lines = ex[1].splitlines(keepends=True)
        c = [t for ids in (tok(lines, add_special_tokens=False).input_ids if lines else []) for t in ids]
        if len(ex) > 2 and ex[2]:
            c.append(tok.eos_token_id)
        out.append((p + c, len(p)))
    return out


def supervised_warm_start(
    model_dir: str | Path,
    examples: Sequence[tuple[str, str] | tuple[str, str, bool]],
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup: int = 30,
    seed: int = 0,
    num_threads: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train the model in ``model_dir`` on ``examples`` and save it back in place.

    Args:
        model_dir: Hugging Face directory (model + tokenizer); overwritten with the trained weights.
        examples: (prompt, completion) pairs or ``agents.base.Demonstration`` triples (prompt,
            completion, ends: an end-of-sequence token follows); the loss covers completion tokens only.
        steps: Optimizer steps (batches drawn with replacement across epochs).
        batch_size: Sequences per step.
        lr: Peak AdamW learning rate (linear warmup, cosine decay to 10%).
        warmup: Warmup steps.
        seed: Seed for batch order and dropout-free init of the optimizer.
        num_threads: torch intra-op threads (None leaves torch's setting).
        on_step: Called with (step, loss) after every step, e.g. to drive a progress bar.

    Returns:
        Metrics: final loss (mean of the last 20 steps), seconds, examples.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not examples:
        raise ValueError("warm start got no examples")
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    data = _encode(tok, examples)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    t0, losses = time.perf_counter(), []
    order: list[int] = []
    for step in range(steps):
        while len(order) < batch_size:  # fewer examples than a batch: each epoch's order, again
            order += rng.sample(range(len(data)), len(data))
        batch = [data[order.pop()] for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            attn[i, : len(ids)] = 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.save_pretrained(model_dir, safe_serialization=True)
    tail = losses[-20:]
    return {"loss": sum(tail) / len(tail), "seconds": time.perf_counter() - t0, "examples": float(len(data))}
