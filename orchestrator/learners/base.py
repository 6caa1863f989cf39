"""The ``Learner`` protocol: what the loop, the learner actor and the guard rails use of a learner.

Every learner (``DPOLearner``, ``TPOLearner``, ``SLHFLearner``, ``RFTLearner``) satisfies it through
``LearnerOutput``, which answers each method from the learner's ``TrainablePolicy``. Code outside
``orchestrator/learners`` talks to a learner through these methods only (``guards.train_guarded``,
``workers.LearnerActor``), never through ``learner.policy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Learner(Protocol):
    """A learner as the loop sees it: train on preference data, hand out and take back weights and
    training state, write and read checkpoints, say whether its weights are usable."""

    def train(self, data: Any) -> dict[str, Any]:
        """One iteration's training on ``data``; returns its metrics.

        Raises ValueError before starting the iteration when ``data`` holds nothing it can train on
        (``train_calls`` is then unchanged)."""
        ...

    @property
    def healthy(self) -> bool:
        """True when the current weights passed the guard rails (safe to redeploy or save)."""
        ...

    @property
    def updates(self) -> int:
        """Optimizer updates applied so far (skipped ones not counted)."""
        ...

    @property
    def train_calls(self) -> int:
        """``train()`` calls that started an iteration so far."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights to deploy (a LoRA learner's adapter alone); never unhealthy ones."""
        ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Put back weights ``state_dict()`` handed out; they were healthy then, and are again now."""
        ...

    def training_state(self) -> dict[str, Any]:
        """Everything besides the weights that continuing training needs (CPU copies)."""
        ...

    def load_training_state(self, state: dict[str, Any], check_reference: bool = True) -> None:
        """Continue from ``training_state()``'s output (the weights already loaded)."""
        ...

    def use_reference(self, model_path: str | Path | None, source: str | None) -> None:
        """Take the reference's weights from ``model_path`` (None: keep the current ones) and record
        ``source`` as where they come from."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write a Hugging Face directory (model + tokenizer) that transformers and vLLM load."""
        ...

    def save_checkpoint(self, path: str | Path, replace: bool = False) -> Path:
        """The weights plus the training state, written atomically to ``path``."""
        ...

    def restore_checkpoint(self, path: str | Path) -> bool:
        """Load the training state saved in ``path``; False when it holds weights only."""
        ...
