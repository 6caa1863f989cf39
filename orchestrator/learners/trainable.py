"""What every learner shares: a policy being trained, its reference, its optimizer, its guard rails.

A learner (``DPOLearner``, ``TPOLearner``, ``SLHFLearner``) *has* a ``TrainablePolicy``; it does
not inherit from one. The policy object owns:

- the model and tokenizer loaded from a Hugging Face directory, on the configured device/dtype
  (``dtype="auto"``: bf16 on a GPU that supports it, fp32 elsewhere);
- the reference model: ``"fixed"`` (the starting weights, for the whole run) or ``"refresh"``
  (the policy's weights at the start of every ``train()`` call, as in Curry-DPO and iterative
  DPO); ``"none"`` for reference-free losses;
- one AdamW optimizer whose state survives across ``train()`` calls (iterations);
- guard rails: an update whose loss is NaN/inf, or whose gradient norm is non-finite or above
  ``skip_grad_norm``, is skipped; when a loss comes out non-finite the weights are rolled back to
  the last ones known to give a finite loss; ``healthy`` says whether the current weights are
  usable, and ``state_dict()`` never hands out weights that are not;
- ``save(path)``: a Hugging Face directory (model + tokenizer) that transformers and vLLM load.

``run_epochs`` is the shared loop: shuffle, micro-batches, gradient accumulation, metrics.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.learners.losses import LossOutput

T = TypeVar("T")


class LearnerConfig(BaseModel):
    """Settings every learner reads (the algorithm-specific configs extend this, one level)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-4, description="AdamW learning rate (tiny CPU models want ~1e-4, 7B models ~1e-6).")
    beta: float = Field(0.1, description="Implicit-reward inverse temperature (IPO's tau; SLHF's KL weight).")
    epochs: int = Field(1, ge=1, description="Passes over the data in one train() call.")
    batch_size: int = Field(16, ge=1, description="Examples (pairs, lists, prompts) per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer update.")
    max_length: int = Field(512, ge=2, description="Prompt + response tokens; longer ones are truncated.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(
        0, ge=0, description="Linear warm-up of the learning rate over the first updates."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm.")
    skip_grad_norm: float = Field(
        1e4, gt=0, description="An update whose raw gradient norm exceeds this is skipped."
    )
    rollback: bool = Field(
        True, description="Keep a copy of the last good weights and roll back on a bad loss."
    )
    reference: Literal["fixed", "refresh", "none"] = Field(
        "fixed", description="fixed: the starting weights; refresh: the policy at each train() start."
    )
    seed: int = Field(0, description="Seeds shuffling and sampling.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 on a capable GPU, else fp32."
    )
    device: str | None = Field(None, description="torch device; default cuda if available, else cpu.")
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads (set it: the default can be slow)."
    )
    verify_at_end: bool = Field(
        True, description="One no-grad forward after training to check the final weights."
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class TrainablePolicy:
    """A causal LM being trained, with its reference, optimizer and guard rails.

    Args:
        model_path: A Hugging Face model directory.
        config: Learner settings.
    """

    def __init__(self, model_path: str | Path, config: LearnerConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device)
        for module in self.model.modules():
            # Dropout makes the policy's and the reference's log-probs of the same text disagree.
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        self.model.train()
        self.reference: torch.nn.Module | None = None
        if config.reference != "none":
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay
        )
        self.updates = 0
        self.skipped_updates = 0
        self.last_skip_reason: str | None = None
        self.healthy = True
        self.calls = 0
        self._good = [p.detach().clone() for p in self.params] if config.rollback else None

    # -- iterations -------------------------------------------------------------------------------

    def begin_iteration(self) -> None:
        """Start a train() call: refresh the reference if configured (not on the first call)."""
        if self.config.reference == "refresh" and self.calls > 0 and self.reference is not None:
            self.reference.load_state_dict(self.model.state_dict())
        self.calls += 1

    # -- updates ----------------------------------------------------------------------------------

    def _set_lr(self) -> None:
        warm = self.config.warmup_steps
        scale = min(1.0, (self.updates + 1) / warm) if warm else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * scale

    def skip(self, reason: str, bad_weights: bool) -> None:
        """Drop the accumulated gradient; if the current weights gave a bad loss, roll them back."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        self.last_skip_reason = reason
        if bad_weights:
            self.restore_good()

    def restore_good(self) -> None:
        """Put back the last weights known to give a finite loss (no-op without rollback)."""
        if self._good is None:
            self.healthy = False
            return
        with torch.no_grad():
            for p, g in zip(self.params, self._good, strict=True):
                p.copy_(g)
        self.healthy = True

    def update(self, loss_finite: bool) -> tuple[bool, float]:
        """Apply the accumulated gradient, unless a guard rail says no.

        Args:
            loss_finite: Whether every micro-batch loss of this update was finite (if not, the
                micro-batches with a bad loss were not back-propagated).

        Returns:
            ``(applied, grad_norm)``; grad_norm is NaN when the loss was bad.
        """
        if not loss_finite:
            self.skip("non-finite loss", bad_weights=True)
            return False, math.nan
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        if not math.isfinite(norm):
            self.skip("non-finite gradient norm", bad_weights=False)
            return False, norm
        if norm > self.config.skip_grad_norm:
            self.skip(f"gradient norm {norm:.3g} above skip_grad_norm {self.config.skip_grad_norm:g}", False)
            return False, norm
        if self._good is not None:
            # These weights just gave a finite loss and gradient: remember them before moving on.
            with torch.no_grad():
                torch._foreach_copy_(self._good, [p.detach() for p in self.params])
        self._set_lr()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return True, norm

    def verify(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        """Check the final weights with one no-grad loss; roll back if it is not finite."""
        with torch.no_grad():
            params_ok = all(bool(torch.isfinite(p).all()) for p in self.params)
            ok = params_ok and bool(torch.isfinite(loss_fn()))
        if not ok:
            self.skipped_updates += 1
            self.last_skip_reason = "final weights give a non-finite loss"
            self.restore_good()
        else:
            self.healthy = True

    # -- output -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights for redeploy: CPU tensors under Hugging Face names; never unhealthy weights."""
        if not self.healthy:
            raise RuntimeError(
                "the policy has no healthy weights to hand out (rollback is off and training broke)"
            )
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def save(self, path: str | Path) -> Path:
        """Write the model and tokenizer as a Hugging Face directory."""
        if not self.healthy:
            raise RuntimeError("refusing to save unhealthy weights")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        return out


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


class LearnerOutput:
    """What every learner hands the loop: its policy's health, weights and checkpoint.

    Learners subclass it and set ``self.policy`` (a ``TrainablePolicy``).
    """

    policy: TrainablePolicy

    @property
    def healthy(self) -> bool:
        """True when the current weights passed the guard rails (safe to redeploy)."""
        return self.policy.healthy

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights under Hugging Face names, for redeploy."""
        return self.policy.state_dict()

    def save(self, path: str | Path) -> Path:
        """Write a Hugging Face directory (model + tokenizer) that transformers and vLLM load."""
        return self.policy.save(path)
