"""Learners: turn the store's preference data into a better policy (DPO family, TPO, SLHF, RFT).

``make_learner(cfg, model_dir)`` picks the learner a run's config names; every learner is a
``Learner`` (``base.py``), and ``guards.py`` holds the rules applied around its ``train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from treeplay.learners.base import Learner


def make_learner(cfg: Any, model_dir: str | Path, preference: Any = None) -> Learner:
    """The learner of ``cfg.learner.algorithm``, starting from the model in ``model_dir``.

    ``preference`` is SLHF's oracle ``(prompt, a, b) -> p(a > b)``; the other learners ignore it.
    """
    algo = cfg.learner.algorithm
    if algo == "dpo":
        from treeplay.learners.dpo import DPOLearner

        return DPOLearner(model_dir, cfg.learner.dpo)
    if algo == "tpo":
        from treeplay.learners.tpo import TPOLearner

        return TPOLearner(model_dir, cfg.learner.tpo)
    if algo == "slhf":
        from treeplay.learners.slhf import SLHFLearner

        if preference is None:
            raise ValueError("learner.algorithm 'slhf' needs a preference oracle")
        return SLHFLearner(model_dir, preference, cfg.learner.slhf)
    if algo == "rft":
        from treeplay.learners.rft import RFTLearner

        return RFTLearner(model_dir, cfg.learner.rft)
    raise ValueError(f"learner.algorithm '{algo}' is not available")
