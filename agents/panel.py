"""Panel of peers (docs/algorithms.md, section 6): every peer writes candidates, every peer scores them.

    peers = [Peer("m0", policy0), Peer("m1", policy1), Peer("m2", policy2)]
    results = run_panel(peers, tasks, PanelConfig(n_candidates=4))
    pairs = [p for r in results for p in r.pairs]          # PairRecord(source="panel")

1. Generate: each peer samples ``n_candidates`` per prompt -- ONE ``generate`` call per peer for the
   whole batch of tasks.
2. Score: each judge (every peer, unless ``peer_scoring=False``) scores each candidate on its own
   (absolute scoring) on five dimensions -- helpfulness, correctness, detail, coherence,
   complexity -- as 1-5 Likert scores (prompt file ``panel_judge.txt``); ONE call per judge for all
   candidates of the batch. A judge's score of a candidate is the mean of its parsed dimensions
   mapped to [0, 1] by ``(s - 1) / 4``; dimensions it did not give are recorded as unparsed, and a
   judgment with none is excluded from the aggregate (its record has ``info["unparsed"] = True``).
   Extra ``judges`` (e.g. ``ExactAnswerJudge`` for tasks with answers) join the aggregate.
3. Aggregate: the mean over judges of their scores (``exclude_self`` leaves the author out).
4. Pair: chosen = best aggregate, rejected = worst; kept if chosen >= ``min_chosen`` and
   chosen - rejected >= ``min_gap``. The paper notes report "positives with reward >= 0.85" and
   "a positive-negative gap of 0.75"; the exact gap rule is ambiguous, hence both are settings.

Every judgment is kept as a ``JudgmentRecord`` with its rationale; candidates and aggregates also
go out as a ``RankedListRecord`` (source "panel") for listwise learners.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.base import Judge, Judgment, Policy, Task
from agents.episode import generate_guarded
from agents.prompt_files import fill, load_prompt
from store.records import JudgmentRecord, PairRecord, RankedItem, RankedListRecord, TaskResult

DIMENSIONS = ("helpfulness", "correctness", "detail", "coherence", "complexity")
_DIM_ALIASES = {
    "level of detail": "detail",
    "details": "detail",
    "coherency": "coherence",
    "help": "helpfulness",
}
_SCORE_LINE = re.compile(
    r"^[\s*#\-]*([A-Za-z][A-Za-z ]*?)\**\s*[:=]\s*\**\s*([1-5])(?:\s*/\s*5)?\b", re.MULTILINE
)
_RATIONALE = re.compile(r"^[\s*#\-]*(?:rationale|reason)\s*[:=]\s*(.+)$", re.MULTILINE | re.IGNORECASE)


@dataclass
class Peer:
    """A panel member: generator and judge."""

    name: str
    policy: Policy


@dataclass
class PanelConfig:
    """Settings of a panel round.

    Attributes:
        n_candidates: Candidates per peer per prompt (PoP: 15; "st-PoP": 1).
        max_tokens / temperature / stop: Candidate sampling.
        judge_max_tokens: Budget of a judge's answer (greedy).
        min_chosen: A pair's chosen aggregate must be at least this.
        min_gap: Chosen minus rejected aggregate must be at least this.
        peer_scoring: Peers judge (False: only the extra ``judges`` do).
        exclude_self: Leave a candidate's author out of its aggregate.
        max_prompt_chars: Keep only the last this many characters of judge prompts (small models).
        seed: Base seed of generate calls.
    """

    n_candidates: int = 4
    max_tokens: int = 64
    temperature: float = 1.0
    stop: tuple[str, ...] | None = None
    judge_max_tokens: int = 160
    min_chosen: float = 0.85
    min_gap: float = 0.75
    peer_scoring: bool = True
    exclude_self: bool = False
    max_prompt_chars: int | None = None
    seed: int | None = None


@dataclass
class LikertScores:
    """A judge's parsed answer: dimension scores (1-5), rationale, what was missing."""

    dims: dict[str, int]
    rationale: str
    missing: list[str]

    @property
    def normalised(self) -> float | None:
        """Mean of the parsed dimensions mapped to [0, 1]; None if none parsed."""
        if not self.dims:
            return None
        return sum((s - 1) / 4 for s in self.dims.values()) / len(self.dims)


def parse_likert(text: str) -> LikertScores:
    """Read ``dimension: 1-5`` lines and a ``rationale:`` line from untrusted text.

    The first score given for a dimension counts; unknown names and out-of-range values are ignored.
    """
    dims: dict[str, int] = {}
    for m in _SCORE_LINE.finditer(str(text)):
        name = " ".join(m.group(1).lower().split())
        name = _DIM_ALIASES.get(name, name)
        if name in DIMENSIONS and name not in dims:
            dims[name] = int(m.group(2))
    r = _RATIONALE.search(str(text))
    return LikertScores(dims, r.group(1).strip() if r else "", [d for d in DIMENSIONS if d not in dims])


@dataclass
class Candidate:
    """One response with its author and every judge's score (None = unparsed/excluded)."""

    text: str
    author: str
    scores: dict[str, float | None] = field(default_factory=dict)
    aggregate: float | None = None


@dataclass
class PanelResult:
    """A task's candidates, judgments and pairs."""

    task: Task
    candidates: list[Candidate]
    judgments: list[JudgmentRecord]
    pairs: list[PairRecord]

    def ranked_list(self) -> RankedListRecord:
        """Candidates with an aggregate, best first."""
        scored = sorted((c for c in self.candidates if c.aggregate is not None), key=lambda c: -c.aggregate)
        items = [RankedItem(text=c.text, score=c.aggregate) for c in scored]
        return RankedListRecord(prompt=self.task.prompt, items=items, source="panel", task_id=self.task.id)

    def task_result(self) -> TaskResult:
        """Everything for ``store.queries.write_task_result``."""
        return TaskResult(
            task_id=self.task.id,
            environment=self.task.env,
            prompt=self.task.prompt,
            answer=self.task.answer,
            pairs=list(self.pairs),
            judgments=list(self.judgments),
            ranked_lists=[self.ranked_list()],
        )


class ExactAnswerJudge:
    """A ``Judge`` for tasks with answers: 1.0 if the candidate's answer equals ``task.answer``.

    Args:
        check: ``check(task, candidate) -> bool``; by default the last integer or decimal in the
            candidate must equal the answer numerically (or the stripped texts must match).
        name: Recorded as the judge's name.
    """

    def __init__(self, check: Callable[[Task, str], bool] | None = None, name: str = "exact") -> None:
        self.check = check or last_number_matches
        self.name = name

    def score(self, task: Task, candidates: Sequence[str]) -> list[Judgment]:
        out = []
        for c in candidates:
            try:
                ok = bool(self.check(task, c))
            except Exception as e:  # noqa: BLE001 - a broken check is a failed judgment
                out.append(Judgment(0.0, f"check raised {type(e).__name__}: {e}", self.name, {"error": True}))
                continue
            out.append(Judgment(1.0 if ok else 0.0, "answer matches" if ok else "answer differs", self.name))
        return out


def last_number_matches(task: Task, candidate: str) -> bool:
    """Whether the last number in ``candidate`` equals ``task.answer`` (or the texts match)."""
    if task.answer is None:
        return False
    nums = re.findall(r"-?\d+(?:\.\d+)?", candidate)
    try:
        return bool(nums) and float(nums[-1]) == float(task.answer)
    except ValueError:
        return candidate.strip() == task.answer.strip()


def _tail(text: str, n: int | None) -> str:
    return text[-n:] if n and len(text) > n else text


def run_panel(
    peers: Sequence[Peer],
    tasks: Sequence[Task],
    config: PanelConfig | None = None,
    judges: Sequence[Judge] = (),
) -> list[PanelResult]:
    """One panel round over ``tasks`` (see the module docstring).

    A peer whose generate call fails contributes no candidates to the batch (every result gets a
    ``JudgmentRecord`` with ``info["error"]`` saying why) and the round goes on with the others; a
    judge whose call fails leaves its judgments unparsed.
    """
    cfg = config or PanelConfig()
    if not peers:
        raise ValueError("run_panel needs at least one peer")
    if len({p.name for p in peers}) != len(peers):
        raise ValueError("peer names must be distinct")
    prompts = [t.prompt for t in tasks]
    cands: list[list[Candidate]] = [[] for _ in tasks]
    errors: list[JudgmentRecord] = []
    for k, peer in enumerate(peers):
        outs, err = generate_guarded(
            peer.policy,
            prompts,
            cfg.n_candidates,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            stop=list(cfg.stop) if cfg.stop else None,
            seed=None if cfg.seed is None else cfg.seed + k,
        )
        if outs is None:
            errors.append(
                JudgmentRecord(judge=peer.name, score=0.0, rationale=str(err), info={"error": True})
            )
            continue
        for i, comps in enumerate(outs):
            cands[i] += [Candidate(c.text, peer.name) for c in comps]

    judgments: list[list[JudgmentRecord]] = [list(errors) for _ in tasks]
    flat = [(i, c) for i, cs in enumerate(cands) for c in cs]
    if cfg.peer_scoring and flat:
        template = load_prompt("panel_judge.txt")
        judge_prompts = [
            _tail(
                fill(template, prompt=tasks[i].prompt.strip(), response=c.text.strip()), cfg.max_prompt_chars
            )
            for i, c in flat
        ]
        for peer in peers:
            outs, err = generate_guarded(
                peer.policy, judge_prompts, 1, max_tokens=cfg.judge_max_tokens, temperature=0.0, seed=cfg.seed
            )
            for j, (i, cand) in enumerate(flat):
                raw = outs[0 + j][0].text if outs is not None else ""
                parsed = parse_likert(raw)
                score = parsed.normalised
                cand.scores[peer.name] = score
                info: dict[str, Any] = {
                    "dimensions": parsed.dims,
                    "author": cand.author,
                    "missing": parsed.missing,
                }
                if score is None:
                    info.update(unparsed=True, raw=raw[:500], error=err)
                judgments[i].append(
                    JudgmentRecord(
                        judge=peer.name,
                        score=0.0 if score is None else score,
                        target_kind="candidate",
                        target_text=cand.text,
                        rationale=parsed.rationale,
                        info=info,
                    )
                )
    for judge in judges:
        for i, cs in enumerate(cands):
            if not cs:
                continue
            try:
                verdicts = list(judge.score(tasks[i], [c.text for c in cs]))
            except Exception as e:  # noqa: BLE001
                verdicts = []
                judgments[i].append(
                    JudgmentRecord(
                        judge=judge.name,
                        score=0.0,
                        rationale=f"{type(e).__name__}: {e}",
                        info={"error": True},
                    )
                )
            for cand, v in zip(cs, verdicts, strict=False):
                cand.scores[judge.name] = float(v.score)
                judgments[i].append(
                    JudgmentRecord(
                        judge=judge.name,
                        score=float(v.score),
                        target_kind="candidate",
                        target_text=cand.text,
                        rationale=v.rationale,
                        info={"author": cand.author, **(v.info or {})},
                    )
                )

    results = []
    for i, task in enumerate(tasks):
        for cand in cands[i]:
            got = [
                s
                for name, s in cand.scores.items()
                if s is not None and not (cfg.exclude_self and name == cand.author)
            ]
            cand.aggregate = sum(got) / len(got) if got else None
            if cand.aggregate is not None:
                judgments[i].append(
                    JudgmentRecord(
                        judge="panel",
                        score=cand.aggregate,
                        target_kind="candidate",
                        target_text=cand.text,
                        rationale="mean over judges",
                        info={"author": cand.author, "judges": len(got)},
                    )
                )
        results.append(PanelResult(task, cands[i], judgments[i], panel_pairs(task, cands[i], cfg)))
    return results


def panel_pairs(task: Task, candidates: Sequence[Candidate], config: PanelConfig) -> list[PairRecord]:
    """Best vs worst aggregate, if the thresholds hold (at most one pair per prompt)."""
    scored = [c for c in candidates if c.aggregate is not None]
    if len(scored) < 2:
        return []
    best = max(scored, key=lambda c: c.aggregate)  # first of equals: deterministic
    worst = min(scored, key=lambda c: c.aggregate)
    gap = best.aggregate - worst.aggregate
    if best.aggregate < config.min_chosen or gap < config.min_gap or best.text == worst.text:
        return []
    return [
        PairRecord(
            prompt=task.prompt,
            chosen=best.text,
            rejected=worst.text,
            source="panel",
            margin=gap,
            shared_prefix_chars=len(os.path.commonprefix([best.text, worst.text])),
            task_id=task.id,
            info={
                "chosen_author": best.author,
                "rejected_author": worst.author,
                "chosen_score": best.aggregate,
                "rejected_score": worst.aggregate,
            },
        )
    ]
