"""Supervised warm start: teach a fresh model the task format on demonstrations before self-play.

Self-improvement needs a policy that already solves some tasks (the demo aims for a warm start at
20–55% held-out accuracy, see docs/tiny-models.md). This is plain next-token cross-entropy on the completion
tokens of (prompt, completion) pairs, prompt tokens masked, with the tokenization search prompts
the policy with (the prompt, then each line of the completion, each tokenized on its own).

    python -m treeplay.orchestrator.warmstart MODEL_DIR --steps 600   # on arithmetic demonstrations
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch


def _encode(tok, examples: Sequence[tuple]) -> list[tuple[list[int], list[bool]]]:
    """Token ids of each example and, per token, whether the loss covers it (the completion's).

    Each line of a completion is tokenized on its own: that is how search's token-in, token-out
    contexts hold the steps (a BPE merge never spans two steps there), so the warm start teaches
    the tokens the policy will be prompted with. With the char tokenizer it changes nothing. For an
    ``agents.base.Demonstration``, its ``context`` lines (observations) are not trained on, and one
    that ``ends`` (a whole rubric or verdict) is followed by the end-of-sequence token, trained on,
    so the policy learns to stop there.
    """
    p_ids = tok([ex[0] for ex in examples], add_special_tokens=False).input_ids
    out = []
    for p, ex in zip(p_ids, examples, strict=True):
        ends = len(ex) > 2 and bool(ex[2])
        context = set(ex[3]) if len(ex) > 3 else set()
        lines = ex[1].splitlines(keepends=True)
        ids, mask = list(p), [False] * len(p)
        for i, line_ids in enumerate(tok(lines, add_special_tokens=False).input_ids if lines else []):
            ids += line_ids
            mask += [i not in context] * len(line_ids)
        if ends:
            ids.append(tok.eos_token_id)
            mask.append(True)
        out.append((ids, mask))
    return out


def batch_counts(shares: Mapping[str, float], batch_size: int) -> dict[str, int]:
    """How many of each kind's examples a batch of ``batch_size`` holds, given each kind's share:
    proportional, rounded by largest remainder, at least one of each.

    Raises:
        ValueError: A share that is not positive, or fewer batch slots than kinds.
    """
    if any(not (w > 0 and math.isfinite(w)) for w in shares.values()):
        raise ValueError(f"warm start shares must be positive numbers, got {dict(shares)}")
    if batch_size < len(shares):
        raise ValueError(f"a batch of {batch_size} cannot hold one example of each of {len(shares)} kinds")
    total = sum(shares.values())
    exact = {k: batch_size * w / total for k, w in shares.items()}
    counts = {k: max(1, int(x)) for k, x in exact.items()}
    by_remainder = sorted(shares, key=lambda k: exact[k] - int(exact[k]), reverse=True)
    i = 0
    while sum(counts.values()) < batch_size:
        counts[by_remainder[i % len(by_remainder)]] += 1
        i += 1
    while sum(counts.values()) > batch_size:
        k = max((k for k in counts if counts[k] > 1), key=lambda k: counts[k] - exact[k])
        counts[k] -= 1
    return counts


# Sequences per forward pass when a mixed batch is cut into runs of similar length.
MICRO_BATCH = 4


def supervised_warm_start(
    model_dir: str | Path,
    examples: Sequence[tuple] | Mapping[str, Sequence[tuple]],
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup: int = 30,
    seed: int = 0,
    num_threads: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    shares: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Train the model in ``model_dir`` on ``examples`` and save it back in place.

    Args:
        model_dir: Hugging Face directory (model + tokenizer); overwritten with the trained weights.
        examples: (prompt, completion) pairs or ``agents.base.Demonstration``s (which may end with
            an end-of-sequence token and hold context lines); the loss covers the completion's
            tokens only, less its context lines. Or a mapping from a kind of demonstration to its
            examples, mixed by ``shares``.
        steps: Optimizer steps (batches drawn with replacement across epochs).
        batch_size: Sequences per step.
        lr: Peak AdamW learning rate (linear warmup, cosine decay to 10%).
        warmup: Warmup steps.
        seed: Seed for batch order and dropout-free init of the optimizer.
        num_threads: torch intra-op threads (None leaves torch's setting).
        on_step: Called with (step, loss) after every step, e.g. to drive a progress bar.
        shares: With a mapping of examples: each kind's share of every batch (``batch_counts``;
            default equal). Every batch then holds that many examples of each kind, each kind going
            through its own examples epoch by epoch; the batch is cut into forward passes of
            ``MICRO_BATCH`` sequences of similar length (kinds differ several-fold in length) and the
            loss is the mean over all its trained tokens, as in one pass.

    Returns:
        Metrics: final loss (mean of the last 20 steps), seconds, examples.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mixed = isinstance(examples, Mapping)
    if not examples or (mixed and not all(examples.values())):
        raise ValueError("warm start got no examples" + (
            f" of kind {next(k for k, v in examples.items() if not v)}" if mixed and examples else ""))
    counts = batch_counts(shares or dict.fromkeys(examples, 1.0), batch_size) if mixed else {"": batch_size}
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    groups = {k: _encode(tok, v) for k, v in examples.items()} if mixed else {"": _encode(tok, examples)}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def tensors(rows: list[tuple[list[int], list[bool]]]):
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.where(torch.tensor(mask), torch.tensor(ids), -100)
            attn[i, : len(ids)] = 1
        return input_ids, labels, attn

    t0, losses = time.perf_counter(), []
    orders: dict[str, list[int]] = {k: [] for k in groups}
    for step in range(steps):
        batch = []
        for kind, n in counts.items():
            data, order = groups[kind], orders[kind]
            while len(order) < n:  # fewer examples than a batch: each epoch's order, again
                order += rng.sample(range(len(data)), len(data))
            batch += [data[order.pop()] for _ in range(n)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        if not mixed:
            input_ids, labels, attn = tensors(batch)
            loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
            loss.backward()
        else:
            batch.sort(key=lambda row: len(row[0]))
            parts = [tensors(batch[i : i + MICRO_BATCH]) for i in range(0, len(batch), MICRO_BATCH)]
            trained = [int((labels[:, 1:] != -100).sum()) for _, labels, _ in parts]
            loss = torch.zeros(())
            for (input_ids, labels, attn), n in zip(parts, trained, strict=True):
                if n:  # the model's loss is the mean over its trained tokens: weigh it by their count
                    part = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss * n / sum(trained)
                    part.backward()
                    loss = loss + part.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.save_pretrained(model_dir, safe_serialization=True)
    tail = losses[-20:]
    n_examples = sum(len(d) for d in groups.values())
    return {"loss": sum(tail) / len(tail), "seconds": time.perf_counter() - t0, "examples": float(n_examples)}
