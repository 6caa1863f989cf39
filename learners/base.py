"""The ``Learner`` protocol: what the loop, the learner actor and the guard rails use of a learner;
and ``LearnerOutput``, the base class through which every learner satisfies it.

Every learner (``DPOLearner``, ``TPOLearner``, ``SLHFLearner``, ``RFTLearner``) subclasses
``LearnerOutput``, which answers each method but ``train`` from the learner's ``TrainablePolicy``.
Code outside ``learners/`` talks to a learner through these methods only
(``guards.train_guarded``, ``workers.LearnerActor``), never through ``learner.policy``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from treeplay.learners.checkpoints import (
    TRAINER_DIR,
    TRAINER_META,
    TRAINER_STATE,
    write_directory_atomically,
)

if TYPE_CHECKING:
    from treeplay.learners.trainable import TrainablePolicy


@runtime_checkable
class Learner(Protocol):
    """A learner as the loop sees it: train on preference data, hand out and take back weights and
    training state, write and read checkpoints, say whether its weights are usable."""

    #: What the learner trains on: "pairs", "ranked_lists" or "prompts" (``guards.usable_data``).
    trains_on: str
    #: Whether the learner must be told the tasks its data came from (``know_tasks``) before training.
    needs_tasks: bool

    def know_tasks(self, tasks: Sequence[Any]) -> None:
        """Make known the tasks whose rollouts the next ``train`` data holds (only called when
        ``needs_tasks``: SLHF's verifier oracle places a prompt by its task)."""
        ...

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


class LearnerOutput:
    """What every learner hands the loop: its policy's health, counters, weights, reference and
    checkpoint; everything of the ``Learner`` protocol (``learners.base``) but ``train``.

    Learners subclass it and set ``self.policy`` (a ``TrainablePolicy``).
    """

    policy: TrainablePolicy
    trains_on: str  # each learner declares it
    needs_tasks: bool = False

    def know_tasks(self, tasks: Sequence[Any]) -> None:
        """Nothing to learn from the tasks themselves (a learner that needs them overrides this)."""

    @property
    def healthy(self) -> bool:
        """True when the current weights passed the guard rails (safe to redeploy)."""
        return self.policy.healthy

    @property
    def updates(self) -> int:
        """Optimizer updates applied so far (skipped ones not counted)."""
        return self.policy.updates

    @property
    def train_calls(self) -> int:
        """``train()`` calls that started an iteration so far."""
        return self.policy.calls

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights under Hugging Face names, for redeploy."""
        return self.policy.state_dict()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Put back what ``state_dict()`` handed out (the full weights, or a LoRA learner's adapter).
        ``state_dict()`` hands out healthy weights only, so the policy is healthy again."""
        self.policy.load_weights(state_dict)
        self.policy.healthy = True

    def use_reference(self, model_path: str | Path | None, source: str | None) -> None:
        """Load the reference's weights from ``model_path`` (a resumed run's fixed reference is its
        starting model, not the checkpoint the policy resumes from) and name ``source`` as their
        origin in checkpoints; with no ``model_path``, only name the origin (when given)."""
        if model_path is not None:
            self.policy.load_reference(model_path, source)
        elif source:
            self.policy.reference_source = source

    def save(self, path: str | Path) -> Path:
        """Write a Hugging Face directory (model + tokenizer) that transformers and vLLM load."""
        return self.policy.save(path)

    # Learner-level counters a resumed run must carry on from (SLHF: its step count, which says
    # when the leader updates); saved with the policy's training state.
    resume_attributes: tuple[str, ...] = ()

    def training_state(self) -> dict[str, Any]:
        """The policy's ``training_state()`` plus this learner's ``resume_attributes``."""
        state = self.policy.training_state()
        state["learner"] = {name: getattr(self, name) for name in self.resume_attributes}
        return state

    def load_training_state(self, state: dict[str, Any], check_reference: bool = True) -> None:
        """Continue from ``training_state()``'s output (weights already loaded)."""
        self.policy.load_training_state(state, check_reference)
        for name, value in state.get("learner", {}).items():
            setattr(self, name, value)

    def save_checkpoint(self, path: str | Path, replace: bool = False) -> Path:
        """Weights and tokenizer (a Hugging Face directory) plus ``trainer/`` (the training state
        and its readable summary), written under a temporary name and renamed into place."""
        if not self.healthy:
            raise RuntimeError("refusing to save unhealthy weights")
        state = self.training_state()

        def write(tmp: Path) -> None:
            self.policy.save(tmp)
            trainer = tmp / TRAINER_DIR
            trainer.mkdir()
            torch.save(state, trainer / TRAINER_STATE)
            meta = {
                "format": state["format"],
                "updates": state["updates"],
                "calls": state["calls"],
                "reference": state["reference"],
                "learner": state["learner"],
            }
            (trainer / TRAINER_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

        return write_directory_atomically(path, write, replace=replace)

    def restore_checkpoint(self, path: str | Path) -> bool:
        """Load the training state saved with the weights this learner was built from; False (and
        nothing changes) when the directory holds weights only."""
        state_file = Path(path) / TRAINER_DIR / TRAINER_STATE
        if not state_file.is_file():
            return False
        self.load_training_state(torch.load(state_file, map_location="cpu", weights_only=True))
        return True
