"""A plug-in environment whose outcome does not depend on the policy: every episode ends after one
action, solved (``solved=True``) or not. Runs on it yield trees whose alternatives all tie, so
no preference pair and no informative ranked list: the case of a policy that solves every task
(or none). Named ``fixed_outcome_env:FixedOutcomeEnv`` with ``tests/orchestrator/`` on the Python path.
"""

from __future__ import annotations

from treeplay.agents.base import StepResult, Task, Trajectory


class FixedOutcomeEnv:
    """One action per episode; reward 1 for any action when ``solved``, else 0.

    Args:
        solved: Whether every episode is solved.
        name: Environment name recorded on tasks.
    """

    def __init__(self, solved: bool = True, name: str = "fixed-outcome") -> None:
        self.solved = solved
        self.name = name

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        return [
            Task(id=f"{split}-{seed}-{i}", prompt=f"{split} {seed} {i}\n", answer="any", reference="x\n",
                 env=self.name, split=split)
            for i in range(n)
        ]

    def reset(self, task: Task) -> str:
        return task.prompt

    def step(self, action: str) -> StepResult:
        reward = 1.0 if self.solved else 0.0
        return StepResult(observation="", reward=reward, done=True, info={"correct": self.solved})

    def score(self, task: Task, trajectory: Trajectory) -> float:
        return 1.0 if self.solved else 0.0
