"""Countdown: a complete example environment for docs/environments.md (the test checks they match).

The task shows a start number; the policy writes the numbers below it, one per line, down to 0.
"""

from __future__ import annotations

import hashlib
import random

from treeplay.agents.base import StepResult, Task, Trajectory


class CountdownEnv:
    """Count down from a start number to 0, one number per action.

    Args:
        max_start: Largest start number (difficulty knob).
        name: Environment name recorded on tasks.
    """

    def __init__(self, max_start: int = 9, name: str = "countdown") -> None:
        self.max_start = max_start
        self.name = name
        self._task: Task | None = None
        self._expected: list[str] = []
        self._t = 0
        self._all_right = True

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        # Deterministic in (split, seed); a start number belongs to one split only (by hash).
        rng = random.Random(f"{split}|{seed}")
        out = []
        while len(out) < n:
            start = rng.randint(1, self.max_start)
            in_test = hashlib.sha256(str(start).encode()).digest()[0] % 4 == 0
            if in_test != (split == "test"):
                continue
            reference = "".join(f"{k}\n" for k in range(start - 1, -1, -1))
            out.append(
                Task(
                    id=f"{start}#{len(out)}",
                    prompt=f"{start}\n",
                    answer="0",
                    reference=reference,
                    env=self.name,
                    split=split,
                )
            )
        return out

    def reset(self, task: Task) -> str:
        self._task = task
        self._expected = (task.reference or "").splitlines()
        self._t = 0
        self._all_right = True
        return task.prompt

    def step(self, action: str) -> StepResult:
        # Garbage must never raise: compare text, do not parse it.
        ok = action.strip() == self._expected[self._t]
        self._all_right = self._all_right and ok
        self._t += 1
        done = self._t >= len(self._expected)
        reward = 1.0 if done and self._all_right else 0.0
        return StepResult(observation="", reward=reward, done=done, info={"step_ok": ok})

    def score(self, task: Task, trajectory: Trajectory) -> float:
        return 1.0 if trajectory.actions == (task.reference or "").splitlines() else 0.0

    def demonstrations(self, tasks: list[Task]) -> list[tuple[str, str]]:
        # Optional: (prompt, completion) pairs for the supervised warm start of a fresh tiny model.
        return [(t.prompt, t.reference or "") for t in tasks]
