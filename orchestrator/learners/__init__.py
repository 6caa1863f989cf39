"""Learners: turn the store's preference data into a better policy (DPO family, TPO, SLHF).

``make_learner(cfg, model_dir)`` picks the learner a run's config names."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_learner(cfg: Any, model_dir: str | Path) -> Any:
    """The learner of ``cfg.learner.algorithm``, starting from the model in ``model_dir``."""
    algo = cfg.learner.algorithm
    if algo == "dpo":
        from orchestrator.learners.dpo import DPOLearner

        return DPOLearner(model_dir, cfg.learner.dpo)
    raise ValueError(f"learner.algorithm '{algo}' is not available")
