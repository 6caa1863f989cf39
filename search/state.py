"""What the two halves of the batched MCTS share: the search's settings (``MCTSConfig``) and the
search state of one tree in a batch (``TreeRun``).

``search.mcts`` decides which leaf each tree expands next, backs values up and commits roots;
``search.expansion`` expands a wave of leaves. Both read and update a ``TreeRun``, and neither
imports the other's internals: this module is where they meet.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from treeplay.agents.base import Environment, Task
from treeplay.search.tree import PreferenceTree


class MCTSConfig(BaseModel):
    """Settings of the tree search (defaults follow MCTS-DPO's math scripts where they exist)."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(5, ge=0, description="MCTS iterations per search root (paper K=5).")
    first_root_multiplier: int = Field(
        4, ge=1, description="Iterations are multiplied by this at the tree root."
    )
    depth_limit: int = Field(
        3, ge=1, description="How far below the current search root one iteration expands."
    )
    max_depth: int = Field(
        16, ge=1, description="Absolute cap on steps from the tree root; nodes there end the episode."
    )
    root_width: int = Field(4, ge=1, description="Candidate steps sampled at the tree root (n_init_actions).")
    width: int = Field(2, ge=1, description="Candidate steps sampled below the root (n_actions).")
    breadth_limit: int = Field(4, ge=1, description="Most children a node keeps after de-duplication.")
    c_puct: float = Field(1.0, ge=0.0, description="Exploration weight of PUCT (w_exp).")
    length_penalty: float = Field(1.25, description="λ in the prior p = exp(Σ logπ / L^λ).")
    gamma: float = Field(1.0, description="Discount in Q = r + γ·V.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of candidate steps.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of candidate steps.")
    max_step_tokens: int = Field(64, ge=1, description="Token cap of one step.")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Stop strings ending a step.")
    self_eval: bool = Field(False, description="Score each new child by the policy's own P(correct).")
    self_eval_sees_reference: bool = Field(
        False,
        description="Show task.reference to the self-evaluator as an example answer (MCTS-DPO does).",
    )
    verdict_correct: str = Field("B", description="Continuation of the self-eval prompt meaning 'correct'.")
    verdict_incorrect: str = Field(
        "A", description="Continuation of the self-eval prompt meaning 'incorrect'."
    )
    include_reference_steps: bool = Field(
        False,
        description="Inject the next line of task.reference as a candidate while the path follows it "
        "(MCTS-DPO's include_gt for math).",
    )
    success_reward: float = Field(
        1.0,
        description="A terminal step is correct when its reward reaches this (unless info['correct'] says).",
    )
    time_limit_s: float | None = Field(None, gt=0.0, description="Wall-clock budget of one search_many call.")
    env_cache_size: int = Field(
        64, ge=0, description="Environments kept parked at fresh nodes per tree, to skip replays."
    )
    seed: int = Field(0, description="Base seed; wave w samples with seed + w.")


@dataclass
class TreeRun:
    """The search state of one tree inside a batch."""

    index: int
    task: Task
    tree: PreferenceTree
    root: int
    iters_left: int
    path: list[int] | None = None
    done: bool = False
    stopped: str | None = None
    # node key -> environment whose episode is exactly at that node (parked after stepping into it)
    parked: OrderedDict[int, Environment] = field(default_factory=OrderedDict)
    free: list[Environment] = field(default_factory=list)
    expanded: set[int] = field(default_factory=set)
    expansions: int = 0
    env_steps: int = 0
    tokens: Any = None  # the policy, when it tokenizes (token in, token out); else None
