"""Row-shaped records: what the rest of treeplay hands to the store and gets back from it.

These are plain dataclasses, free of SQLAlchemy, so search/, agents/ and the learners can build and
consume them without touching the database layer. ``store.queries`` turns them into rows in one
transaction (bulk inserts) and reads them back. The last section holds what the store's API returns
besides them: ``RunInfo``, ``IterationInfo``, ``TreeSummary``, ``CheckpointInfo``, ``WriteReceipt``
(the ids a write gave) and ``NodeView`` (a node with its tree and number of children).

Keys: inside one write, records refer to each other by *local keys* (``NodeRecord.key``, the index of
a trajectory in the list, ...). The store assigns database ids and maps the local keys on write; on
read, ``db_id`` fields carry the database ids so provenance can be followed (a pair to its nodes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

PAIR_SOURCES = ("mcts", "panel", "credit", "rubric", "slhf", "sample")

# Key in a pair's (or ranked list's) ``info`` under which the producer records which characters of
# each response the policy wrote. A pair: ``{"chosen": spans, "rejected": spans}``; a ranked list:
# one spans list per item. Spans are ``[start, end)`` character offsets into the response text;
# everything outside them (environment observations, tool output) is context the learner must not
# train on. No entry means the policy wrote the whole response.
ACTION_SPANS = "action_spans"
# The info key of pairs and ranked lists that says which weights version produced them (the rollout
# workers stamp it; the learner measures how stale its data is by it).
POLICY_VERSION = "policy_version"

Spans = list[tuple[int, int]]


def uri_to_path(uri: str) -> Path:
    """The local path a ``file://`` URI (a checkpoint's, a reference model's) or a plain path names.

    Raises:
        ValueError: Another scheme (the store records local checkpoints only).
    """
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"URI scheme '{parsed.scheme}' is not supported (only file:// and plain paths)")
    return Path(unquote(parsed.path))


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data, for the store's JSON ``info`` columns and the inspector's output.

    Dicts keep their structure with keys as text, lists and tuples become lists, dataclasses become
    dicts of their fields, datetimes ISO text, NaN and infinities None (strict JSON has neither), and
    anything else JSON cannot hold its ``repr``.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return repr(value)


def check_action_spans(spans: Any, length: int, where: str) -> Spans:
    """Validate action spans of a text of ``length`` characters: sorted, disjoint, inside the text.

    Raises:
        ValueError: One line naming ``where`` and what is wrong.
    """
    if not isinstance(spans, (list, tuple)):
        raise ValueError(f"{where} must be a list of [start, end] pairs")
    out: Spans = []
    last = 0
    for k, span in enumerate(spans):
        if (
            not isinstance(span, (list, tuple))
            or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            raise ValueError(f"{where}[{k}] must be a [start, end] pair of integers")
        start, end = span
        if not last <= start < end <= length:
            raise ValueError(
                f"{where}[{k}] = [{start}, {end}] is not a non-empty span after {last} inside a text of {length} characters"
            )
        out.append((start, end))
        last = end
    return out


@dataclass
class NodeRecord:
    """One node of a preference tree (a partial solution: the steps from the root to here).

    ``key`` is unique within its tree; ``parent_key`` is None for the root only. ``step`` is the text
    of the step that leads into this node (empty at the root).
    """

    key: int
    parent_key: int | None
    step: str
    depth: int
    visits: int = 0
    value: float = 0.0
    prior: float = 0.0
    reward: float = 0.0
    terminal: bool = False
    correct: bool | None = None
    selected: bool = False
    policy_version: int = 0
    error: str | None = None
    info: dict[str, Any] | None = None
    db_id: int | None = None


@dataclass
class PairRecord:
    """A preference pair: ``chosen`` is preferred over ``rejected`` as a continuation of ``prompt``.

    Attributes:
        source: One of PAIR_SOURCES (where the pair came from).
        margin: A score gap between chosen and rejected (Q gap, judge score gap, ...), if known.
        weight: Per-pair loss weight (1.0 = plain).
        label_smoothing: Conservative-DPO epsilon (MCTS-DPO's visit-count alpha), 0 = plain DPO.
        shared_prefix_chars: Length of the common text prefix of chosen and rejected, so a learner
            can start the loss at the divergence point.
        chosen_node / rejected_node: Local node keys in the tree written alongside (on write) or
            database ids of tree nodes (on read), if the pair came from a tree.
        chosen_visits / rejected_visits: Visit counts of those nodes (MCTS), if any.
        tree_index: Which of the TaskResult's trees the node keys refer to (on write).
    """

    prompt: str
    chosen: str
    rejected: str
    source: str = "mcts"
    margin: float | None = None
    weight: float = 1.0
    label_smoothing: float = 0.0
    shared_prefix_chars: int = 0
    chosen_node: int | None = None
    rejected_node: int | None = None
    chosen_visits: int | None = None
    rejected_visits: int | None = None
    tree_index: int = 0
    task_id: str | None = None
    info: dict[str, Any] | None = None
    db_id: int | None = None
    iteration: int | None = None

    def action_spans(self, side: str) -> Spans | None:
        """Character spans of ``chosen`` or ``rejected`` (``side``) the policy wrote; None = all of it."""
        spans = (self.info or {}).get(ACTION_SPANS)
        if spans is None:
            return None
        return [tuple(x) for x in spans[side]]  # type: ignore[misc]


@dataclass
class RankedItem:
    """One response in a ranked list (TPO): its text, its score, and per-step rewards if known."""

    text: str
    score: float
    step_rewards: list[float] | None = None
    node: int | None = None


@dataclass
class RankedListRecord:
    """Responses to one prompt with scores, for listwise learners (TPO, LiPO)."""

    prompt: str
    items: list[RankedItem]
    source: str = "mcts"
    task_id: str | None = None
    info: dict[str, Any] | None = None
    db_id: int | None = None
    iteration: int | None = None
    # Which of the TaskResult's trees the items' ``node`` keys refer to (on write).
    tree_index: int = 0

    def action_spans(self, item: int) -> Spans | None:
        """Character spans of item ``item``'s text the policy wrote; None = all of it."""
        spans = (self.info or {}).get(ACTION_SPANS)
        if spans is None:
            return None
        return [tuple(x) for x in spans[item]]  # type: ignore[misc]


@dataclass
class StepRecord:
    index: int
    action: str
    observation: str = ""
    reward: float = 0.0
    agent_id: str = "agent-0"
    credit: float | None = None
    rubric: str | None = None
    logprob: float | None = None
    info: dict[str, Any] | None = None


@dataclass
class TrajectoryRecord:
    task_id: str
    environment: str
    steps: list[StepRecord] = field(default_factory=list)
    agent_id: str = "agent-0"
    policy_version: int = 0
    outcome: float | None = None
    status: str = "ok"
    error: str | None = None
    info: dict[str, Any] | None = None
    db_id: int | None = None


@dataclass
class JudgmentRecord:
    """A judge's score of a target.

    ``target_kind`` is "trajectory", "node", "step" or "candidate"; ``target_key`` is the local key of
    the target in the same write (trajectory list index, node key, ...) or None for free candidates,
    whose text goes in ``target_text``.

    On write: a "trajectory" key is an index into ``TaskResult.trajectories``; a "node" key is a node
    key of ``TaskResult.trees[tree_index]``; a "step" key is an index into the steps of all the
    result's trajectories taken in order (trajectory 0's steps, then trajectory 1's, ...). On read,
    ``target_key`` holds the database id of the target row.
    """

    judge: str
    score: float
    target_kind: str = "candidate"
    target_key: int | None = None
    target_text: str | None = None
    rationale: str = ""
    info: dict[str, Any] | None = None
    tree_index: int = 0
    db_id: int | None = None
    iteration: int | None = None


@dataclass
class TreeRecord:
    """A whole preference tree for one task, ready to write."""

    task_id: str
    prompt: str
    nodes: list[NodeRecord]
    environment: str = ""
    policy_version: int = 0
    info: dict[str, Any] | None = None
    db_id: int | None = None


@dataclass
class TaskResult:
    """Everything one task produced in an iteration; ``queries.write_task_result`` writes it in ONE
    transaction. Any field may be empty."""

    task_id: str
    environment: str = ""
    prompt: str = ""
    answer: str | None = None
    trees: list[TreeRecord] = field(default_factory=list)
    trajectories: list[TrajectoryRecord] = field(default_factory=list)
    pairs: list[PairRecord] = field(default_factory=list)
    ranked_lists: list[RankedListRecord] = field(default_factory=list)
    judgments: list[JudgmentRecord] = field(default_factory=list)


@dataclass
class PreferenceData:
    """What a learner reads for an iteration: pairs and ranked lists (with replay window)."""

    pairs: list[PairRecord] = field(default_factory=list)
    ranked_lists: list[RankedListRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs) + len(self.ranked_lists)


# ----------------------------------------------------------------------------------------------
# What the store's readers and writers return besides the records above


@dataclass
class RunInfo:
    """A run as stored: its id, unique name, resolved config, status, times (naive UTC), and the
    one-line reason it stopped early (None unless it "failed" or was "interrupted")."""

    id: int
    name: str
    config: dict[str, Any]
    status: str
    created: datetime
    finished: datetime | None
    reason: str | None = None


@dataclass
class IterationInfo:
    """An iteration as stored, with how many tasks have been written for it."""

    id: int
    run_id: int
    index: int
    policy_version: int
    status: str
    started: datetime
    finished: datetime | None
    timings: dict[str, Any] | None
    metrics: dict[str, Any] | None
    n_tasks: int = 0


@dataclass
class TreeSummary:
    """One stored tree without its nodes (for listings)."""

    id: int
    run_id: int
    iteration: int
    task_id: str
    environment: str
    prompt: str
    policy_version: int
    n_nodes: int
    max_depth: int


@dataclass
class CheckpointInfo:
    """A checkpoint row: which policy version was saved where, after which iteration."""

    id: int
    run_id: int
    iteration: int
    policy_version: int
    uri: str
    metrics: dict[str, Any] | None
    created: datetime


@dataclass
class WriteReceipt:
    """The database ids ``write_task_result`` gave to what it wrote, in the order of the input.

    Attributes:
        rollout_id: The row that marks the task as written for the iteration.
        task_db_id: The task's row.
        tree_ids: One id per ``TaskResult.trees`` entry.
        node_ids: Per tree, a map from the node's local key to its database id.
        trajectory_ids: One id per trajectory.
        step_ids: Per trajectory, the ids of its steps.
        pair_ids, ranked_list_ids, judgment_ids: One id per record.
    """

    rollout_id: int
    task_db_id: int
    tree_ids: list[int] = field(default_factory=list)
    node_ids: list[dict[int, int]] = field(default_factory=list)
    trajectory_ids: list[int] = field(default_factory=list)
    step_ids: list[list[int]] = field(default_factory=list)
    pair_ids: list[int] = field(default_factory=list)
    ranked_list_ids: list[int] = field(default_factory=list)
    judgment_ids: list[int] = field(default_factory=list)


@dataclass
class NodeView:
    """One stored tree node with where it sits: its tree and how many children it has.

    ``node.key`` = ``node.db_id`` = the node's database id; ``node.parent_key`` is the parent's id.
    """

    tree_id: int
    node: NodeRecord
    n_children: int
