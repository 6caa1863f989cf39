"""Learners: turn the store's preference data into a better policy (DPO family, TPO, SLHF, RFT).

``make_learner(cfg, model_dir)`` picks the learner a run's config names; every learner is a
``Learner`` (``base.py``), and ``guards.py`` holds the rules applied around its ``train``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the package itself imports no torch: treeplay.learners.config stays light
    from treeplay.learners.base import Learner


def make_learner(cfg: Any, model_dir: str | Path, preference: Any = None) -> Learner:
    """The learner of ``cfg.learner.algorithm``, starting from the model in ``model_dir``, with
    everything it needs built from ``cfg``.

    SLHF's preference oracle ``(prompt, a, b) -> p(a > b)`` is, unless ``preference`` gives another,
    the verifier of the run's environment (``slhf.VerifierOracle`` over ``cfg.env``); the learner
    declares ``needs_tasks``, and its caller hands it the tasks of each iteration's data
    (``know_tasks``). The other learners ignore ``preference``.
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
            from treeplay.agents.registry import make_environment
            from treeplay.learners.slhf import VerifierOracle

            preference = VerifierOracle(make_environment(cfg.env.name, **cfg.env.kwargs))
        return SLHFLearner(model_dir, preference, cfg.learner.slhf)
    if algo == "rft":
        from treeplay.learners.rft import RFTLearner

        return RFTLearner(model_dir, cfg.learner.rft)
    raise ValueError(f"learner.algorithm '{algo}' is not available")
