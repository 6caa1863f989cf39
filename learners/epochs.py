"""The shared training loop of the learners: ``run_epochs`` (shuffle, micro-batches, gradient
accumulation, guarded updates, metrics), ``evaluate_batches`` (the same statistics without updates)
and ``StatsMeter`` (example-weighted means of loss statistics over one call)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from treeplay.learners.losses import LossOutput

if TYPE_CHECKING:
    from treeplay.learners.trainable import TrainablePolicy

T = TypeVar("T")


class StatsMeter:
    """Running, example-weighted means of loss statistics over one train() call."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, value: torch.Tensor | float, count: float = 1.0) -> None:
        v = float(value.float().mean()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            return
        self.sums[name] = self.sums.get(name, 0.0) + v * count
        self.counts[name] = self.counts.get(name, 0.0) + count

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}


def run_epochs(
    policy: TrainablePolicy,
    examples: Sequence[T],
    micro_step: Callable[[list[T], StatsMeter], LossOutput],
    unit: str = "pairs",
) -> dict[str, Any]:
    """The shared training loop: shuffle, micro-batch, accumulate, update with guard rails.

    Args:
        policy: The policy being trained.
        examples: Prepared examples (already tokenized).
        micro_step: Computes the loss of one micro-batch (mean over its examples) and records its
            statistics in the meter; ``run_epochs`` back-propagates it.
        unit: Name of an example in the throughput metric (``<unit>_per_s``).

    Returns:
        Metrics: the meter's means plus ``loss``, ``first_loss``, ``updates``, ``skipped_updates``,
        ``last_skip_reason`` (only when something was skipped), ``grad_norm``, ``seconds``,
        ``<unit>_per_s``, ``healthy``.
    """
    cfg = policy.config
    rng = random.Random(cfg.seed + 7919 * policy.calls)
    meter = StatsMeter()
    skipped_before = policy.skipped_updates
    first_loss = math.nan
    t0 = time.perf_counter()
    seen = 0
    for _ in range(cfg.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        batches = [
            [examples[i] for i in order[s : s + cfg.batch_size]] for s in range(0, len(order), cfg.batch_size)
        ]
        for u in range(0, len(batches), cfg.grad_accum):
            group = batches[u : u + cfg.grad_accum]
            total = sum(len(b) for b in group)
            finite = True
            for batch in group:
                out = micro_step(batch, meter)
                value = float(out.loss.detach())
                if math.isnan(first_loss):
                    first_loss = value
                if not math.isfinite(value):
                    finite = False
                    continue
                meter.add("loss", value, len(batch))
                (out.loss * (len(batch) / total)).backward()
                seen += len(batch)
            applied, norm = policy.update(finite)
            if applied:
                meter.add("grad_norm", norm)
    if cfg.verify_at_end and examples:
        probe = list(examples[: cfg.batch_size])
        policy.verify(lambda: micro_step(probe, StatsMeter()).loss)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = meter.means()
    metrics.update(
        first_loss=first_loss,
        updates=float(policy.updates),
        skipped_updates=float(policy.skipped_updates - skipped_before),
        seconds=seconds,
        healthy=float(policy.healthy),
    )
    metrics[f"{unit}_per_s"] = seen / seconds if seconds > 0 else math.nan
    if policy.skipped_updates > skipped_before and policy.last_skip_reason:
        metrics["last_skip_reason"] = policy.last_skip_reason
    return metrics


@torch.no_grad()
def evaluate_batches(
    examples: Sequence[T], micro_step: Callable[[list[T], StatsMeter], LossOutput], batch_size: int
) -> dict[str, float]:
    """Mean loss and statistics of ``micro_step`` over all examples, without gradients or updates."""
    meter = StatsMeter()
    for s in range(0, len(examples), batch_size):
        batch = list(examples[s : s + batch_size])
        meter.add("loss", micro_step(batch, meter).loss, len(batch))
    return meter.means()
