"""The shared vocabulary of treeplay: tasks, steps, trajectories and the protocols users plug into.

Everything else imports from here; this module imports nothing from the project. It holds:

- ``Task``, ``Step``, ``StepResult``, ``Trajectory``: plain dataclasses, text in and text out.
- ``TokenIds``: text already in a policy's token ids, for the paths that must not re-tokenize.
- ``Environment``: what an agent acts in (``tasks``, ``reset``, ``step``, ``score``). A reasoning
  task is an environment whose actions are reasoning steps.
- ``Policy``: what acts. Engines (``engines/``) and scripted test policies implement it.
- ``Judge``: what scores candidates (verifiers, rubric judges, peers, critics).
- ``Demonstration``: a warm-start example an environment offers (``demonstrations``).

Protocols are structural (``typing.Protocol``): implement the methods, no base class needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable


@dataclass(frozen=True)
class TokenIds:
    """Text already in the policy's own token ids ("token in, token out").

    With a merging (BPE) tokenizer, text does not determine its tokens: the model may sample a
    non-canonical split ("4" "6" for "46"), and merges cross the boundaries our code draws (a
    prompt's last newline and a step's first digit can be one token). Search therefore keeps the
    ids an engine generated and prompts it with them, so the next step is conditioned on exactly
    the tokens the learner will train on. Engines accept a ``TokenIds`` wherever they accept a
    prompt, and as a ``score`` continuation.

    Attributes:
        ids: The token ids.
        mask: For a continuation: per token, whether the policy wrote it (False: context such as an
            observation). None: all of it.
    """

    ids: tuple[int, ...]
    mask: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if self.mask is not None and len(self.mask) != len(self.ids):
            raise ValueError(f"TokenIds has {len(self.ids)} ids but a mask of {len(self.mask)}")


# A prompt is raw text, chat messages ({"role": ..., "content": ...}) rendered with the
# tokenizer's chat template by engines that have one, or token ids (engines only).
Prompt = str | list[dict[str, str]] | TokenIds


@dataclass
class Task:
    """One problem an environment poses.

    Attributes:
        id: Stable identifier, unique within (environment, split).
        prompt: The text shown to the policy.
        answer: The gold final answer an exact verifier compares against, if any.
        reference: A gold worked solution (steps separated by newlines), if any. Search may show it
            to the self-evaluator (MCTS-DPO does); warm starts train on it.
        env: Name of the environment that made it.
        split: "train" or "test".
        meta: Free-form extras (difficulty knobs, tool state seeds, ...).
    """

    id: str
    prompt: str
    answer: str | None = None
    reference: str | None = None
    env: str = ""
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)


# What an environment's ``demonstrations`` can teach, named in ``warm_start.demonstrations``:
# "actions" the next action of a solution (every environment with demonstrations has these);
# "rubrics" and "verdicts" the rubric generator's and the verifier's answers of rubric-guided ReAct
# (agents/react.py), for environments that list them in ``demonstration_kinds``.
DemonstrationKind = Literal["actions", "rubrics", "verdicts"]


class Demonstration(NamedTuple):
    """One supervised warm-start example: given ``prompt``, the policy should write ``completion``.

    ``ends`` says the completion is a whole answer that the policy ends there (a rubric, a verdict):
    the warm start then also teaches the end-of-sequence token after it. An action is not: it ends
    with the newline the caller stops generation at. ``context`` lists the completion's lines (by
    index, ``splitlines``) that the policy does not write, e.g. the observations between the actions
    of a whole episode: they are read, not trained on. A plain ``(prompt, completion)`` tuple is a
    demonstration with ``ends=False`` and no context lines.
    """

    prompt: str
    completion: str
    ends: bool = False
    context: tuple[int, ...] = ()

    def targets(self) -> list[tuple[str, str]]:
        """What the policy is taught to write, as (text before it, text to write) pairs: each run of
        consecutive trained lines of the completion, after the prompt and the lines before it."""
        lines = self.completion.splitlines(keepends=True)
        out: list[tuple[str, str]] = []
        start = None
        for i in range(len(lines) + 1):
            trained = i < len(lines) and i not in self.context
            if trained and start is None:
                start = i
            elif not trained and start is not None:
                out.append((self.prompt + "".join(lines[:start]), "".join(lines[start:i])))
                start = None
        return out


@dataclass
class StepResult:
    """What an environment returns for one action."""

    observation: str
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """One step of a trajectory: the action taken and what came back."""

    index: int
    action: str
    observation: str = ""
    reward: float = 0.0
    agent_id: str = "agent-0"
    logprob: float | None = None
    credit: float | None = None
    rubric: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trajectory:
    """A whole episode of one task.

    ``status`` is "ok" or "failed"; a failed trajectory keeps its steps and the ``error`` text so a
    broken tool or environment is recorded, never fatal to the run.

    In multi-agent episodes ``steps`` are the executed (voted) actions and ``proposals`` holds every
    agent's proposed action at every step (``Step.index`` = the step, ``Step.agent_id`` = the
    proposer, ``Step.credit`` = a critic's score); single-agent episodes leave it empty.
    """

    task: Task
    steps: list[Step] = field(default_factory=list)
    outcome: float | None = None
    status: str = "ok"
    error: str | None = None
    policy_version: int = 0
    agent_id: str = "agent-0"
    info: dict[str, Any] = field(default_factory=dict)
    proposals: list[Step] = field(default_factory=list)

    @property
    def actions(self) -> list[str]:
        return [s.action for s in self.steps]


@runtime_checkable
class Environment(Protocol):
    """A text environment. ``reset`` starts a fresh episode on this instance; ``step`` advances it.

    Instances are cheap: run concurrent episodes on separate instances (the registry makes them),
    and replay a path of actions from ``reset`` to rebuild a state (tree search does this).
    """

    name: str

    def tasks(self, split: str, n: int, seed: int) -> list[Task]: ...

    def reset(self, task: Task) -> str: ...

    def step(self, action: str) -> StepResult: ...

    def score(self, task: Task, trajectory: Trajectory) -> float: ...


@dataclass
class Completion:
    """One sampled continuation of a prompt.

    Attributes:
        text: Decoded continuation (stop string excluded).
        token_ids: Generated token ids (those that make up ``text``).
        logprobs: Log-probability of each generated token under the sampling policy
            (temperature-1, unwarped distribution), aligned with ``token_ids``.
        finish_reason: "stop" (a stop string), "eos", or "length".
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "length"

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class Scored:
    """Log-probability of a given continuation after a prompt.

    Attributes:
        total: Sum of the log-probs of the tokens the policy wrote (all tokens unless action spans
            were given to ``score``).
        token_logprobs: Log-prob of every continuation token, context tokens included.
        action_mask: Per token, whether the policy wrote it; None when no action spans were given.
    """

    total: float
    token_logprobs: list[float]
    action_mask: list[bool] | None = None


@runtime_checkable
class Policy(Protocol):
    """A language model that can sample and score text. ``version`` counts weight updates."""

    version: int

    def generate(
        self,
        prompts: Sequence[Prompt],
        n: int = 1,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """Return ``n`` completions for each prompt, in prompt order."""
        ...

    def score(
        self,
        prompts: Sequence[Prompt],
        continuations: Sequence[str | TokenIds],
        action_spans: Sequence[Sequence[tuple[int, int]] | None] | None = None,
    ) -> list[Scored]:
        """Log-probability of ``continuations[i]`` after ``prompts[i]`` (teacher forcing).

        A continuation given as ``TokenIds`` is scored as those exact ids (its ``mask`` marks the
        policy's tokens); text is tokenized on its own.

        ``action_spans[i]``, if given, are the character spans of ``continuations[i]`` the policy
        wrote; ``total`` then sums only their tokens (observations in between are context).
        """
        ...

    def load_weights(self, version: int, state_dict: Mapping[str, Any]) -> None:
        """Replace the weights in place and set ``version``."""
        ...

    def close(self) -> None: ...


@dataclass
class Judgment:
    """A judge's verdict on one candidate."""

    score: float
    rationale: str = ""
    judge: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Judge(Protocol):
    """Scores candidate responses to a task: verifiers, rubric judges, peers, critics."""

    name: str

    def score(self, task: Task, candidates: Sequence[str]) -> list[Judgment]: ...


Segment = tuple[str, bool]
"""A piece of rendered text and whether the policy wrote it (True) or it is context (False)."""


def step_segments(steps: Sequence[tuple[str, str]] | Sequence[Step]) -> list[Segment]:
    """The text ``steps`` add after a prompt, as segments marked by who wrote them.

    This is the one rendering of a trajectory: ``transcript`` joins it after the prompt to prompt
    the policy, and pair builders keep the marks so learners train only on what the policy wrote.
    An action is written by the policy together with the newline that ended it (the stop the policy
    sampled); an observation comes from the environment and is context only.

    Args:
        steps: ``Step`` objects or ``(action, observation)`` tuples, in order.

    Returns:
        ``(text, written_by_policy)`` segments, in order; empty observations leave no segment.
    """
    out: list[Segment] = []
    for s in steps:
        action, obs = (s.action, s.observation) if isinstance(s, Step) else s
        out.append((action + "\n", True))
        if obs:
            out.append((obs if obs.endswith("\n") else obs + "\n", False))
    return out


def action_spans(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the policy-written segments in their joined text.

    Adjacent policy segments merge into one span; empty segments leave none.
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    for text, mine in segments:
        end = pos + len(text)
        if mine and end > pos:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((pos, end))
        pos = end
    return spans


def transcript(prompt: str, steps: Sequence[tuple[str, str]] | Sequence[Step]) -> str:
    """Render a prompt and the steps so far into the text a policy continues.

    Every action is one line; a non-empty observation follows its action on its own line(s). Search,
    agents and warm starts all use this so that what the model is trained on is what it is asked
    (``step_segments`` is the same text with the policy's own parts marked).

    Args:
        prompt: The task prompt (conventionally ending in a newline).
        steps: ``Step`` objects or ``(action, observation)`` tuples, in order.

    Returns:
        ``prompt`` followed by ``action + "\\n"`` (and ``observation + "\\n"`` where non-empty) per step.
    """
    return prompt + "".join(text for text, _ in step_segments(steps))
