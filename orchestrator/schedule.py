"""What each iteration draws, as pure functions of the run's config: its train tasks and the seeds
of its rollout chunks and of the shuffled control.

The driver, the rollout workers and the learner actor all call these, so a chunk that is re-run (a
worker died, the run was resumed) gets the seed it got the first time, and the learner can rebuild
the tasks of its replay window itself instead of having them shipped.

Every seed comes from one formula, ``derive_seed``: ``run_seed * a + iteration * b + part`` with a
pair of multipliers per stream. The streams use different multipliers so that two purposes never
share a sequence by accident; the values are those treeplay has always used, so a seeded run
reproduces runs made before this module existed.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from treeplay.agents.base import Task

Stream = Literal["chunk", "tasks", "shuffle"]

#: (a, b) per stream in ``run_seed * a + iteration * b + part``.
_MULTIPLIERS: dict[str, tuple[int, int]] = {
    # Rollout chunks: every (iteration, chunk) has its own seed while an iteration has < 7919 chunks.
    "chunk": (1_000_003, 7919),
    # The train tasks an iteration draws.
    "tasks": (31, 1),
    # The shuffled-preference control's coin flips.
    "shuffle": (7919, 1),
}


def derive_seed(run_seed: int, iteration: int, part: int = 0, *, stream: Stream) -> int:
    """The seed of ``stream`` for ``iteration`` (and ``part``, e.g. a chunk's index) of a run seeded
    ``run_seed``. It depends on nothing else."""
    a, b = _MULTIPLIERS[stream]
    return run_seed * a + iteration * b + part


def chunk_seed(run_seed: int, iteration: int, chunk: int = 0) -> int:
    """The sampling seed of chunk ``chunk`` of iteration ``iteration``'s rollouts."""
    return derive_seed(run_seed, iteration, chunk, stream="chunk")


def iteration_tasks(cfg: Any, env: Any, index: int) -> list[Task]:
    """Iteration ``index``'s train tasks: a resumed run, and the learner's replay window, get exactly
    the tasks the uninterrupted run drew. ``cfg`` is the run's ``RunConfig``."""
    rng = random.Random(derive_seed(cfg.seed, index, stream="tasks"))
    return env.tasks("train", cfg.rollout.tasks_per_iteration, seed=rng.randrange(2**31))


def window_tasks(cfg: Any, env: Any, index: int, replay: int) -> list[Task]:
    """The tasks of iteration ``index`` and of the ``replay`` iterations before it, oldest first:
    what a learner that trains on the replay window saw rollouts of."""
    return [t for i in range(max(0, index - replay), index + 1) for t in iteration_tasks(cfg, env, i)]
