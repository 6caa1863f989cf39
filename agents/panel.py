"""Panel of peers (docs/algorithms.md, section 6): every peer writes candidates, every peer scores them.

    peers = [Peer("m0", policy0), Peer("m1", policy1), Peer("m2", policy2)]
    results = run_panel(peers, tasks, PanelConfig(n_candidates=4))
    pairs = [p for r in results for p in r.pairs]          # PairRecord(source="panel")

1. Generate: each peer samples ``n_candidates`` per prompt -- ONE ``generate`` call per peer for the
   whole batch of tasks.
2. Score: each peer (unless ``peer_scoring=False``) scores each candidate on its own (absolute
   scoring) on five dimensions -- helpfulness, correctness, detail, coherence, complexity -- as 1-5
   Likert scores (prompt file ``panel_judge.txt``); ONE call per judging peer for all candidates of
   the batch. A judge's score of a candidate is the mean of its parsed dimensions mapped to [0, 1]
   by ``(s - 1) / 4``; dimensions it did not give are recorded as unparsed, and a judgment with none
   is excluded from the aggregate (its record has ``info["unparsed"] = True``). A judge prompt whose
   instructions, question and candidate do not fit ``max_prompt_chars`` is not sent: its judgment
   is recorded failed with the reason (``info["error"]``).
   Extra ``judges`` (e.g. ``ExactAnswerJudge`` for tasks with answers) score every candidate too.
3. Distinct votes: peers judge by sampling (``judge_temperature`` > 0) with a seed of their own, so
   peers that share one engine still give independent judgments. Peers whose judgments are
   identical by construction -- the same policy object judging greedily (``judge_temperature=0``)
   -- are asked once and counted as ONE vote (its record lists them in ``info["peers"]``): a model
   backing three peers does not get three votes.
4. Aggregate: the mean of the votes (peer votes and extra judges that are not verifiers;
   ``exclude_self`` leaves out votes the author took part in). Judges with ``verifier = True``
   (``ExactAnswerJudge``) are not votes but decide a candidate's class: verified correct when
   every verifier accepts it (score >= 0.5), verified wrong otherwise. With a verifier the
   aggregate is ``(V + votes) / 2`` with V = 1 (correct) or 0 (wrong) -- the verifier weighs as
   much as all votes together, so every verified-correct candidate scores >= 0.5 >= every
   verified-wrong one; a candidate the verifier could not check (its check raised) gets no
   aggregate. Candidates are ranked by (class, aggregate): votes order candidates only within a
   verifier class and can never lift a verified-wrong answer above a verified-correct one.
5. Pair: chosen = best ranked, rejected = worst ranked; kept if chosen >= ``min_chosen`` and
   chosen - rejected >= ``min_gap``, and -- when a verifier judged the task -- only if the chosen
   candidate is verified correct: no pair's chosen side is one the verifier rejects. The paper
   notes report "positives with reward >= 0.85" and "a positive-negative gap of 0.75"; the exact
   gap rule is ambiguous, hence both are settings.

Every judgment is kept as a ``JudgmentRecord`` with its rationale; candidates and aggregates also
go out as a ``RankedListRecord`` (source "panel") for listwise learners.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from treeplay.agents.base import Judge, Judgment, Policy, Task
from treeplay.agents.episode import generate_guarded
from treeplay.agents.prompt_files import PromptTooLong, fill_fit, load_prompt
from treeplay.store.records import JudgmentRecord, PairRecord, RankedItem, RankedListRecord, TaskResult

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
        judge_max_tokens: Budget of a judge's answer.
        judge_temperature: Peers' judging temperature. Above 0 every peer samples its judgment with
            its own seed (peers on one engine are then distinct judges); 0 is greedy, and peers
            sharing a policy object then give one judgment, counted once.
        min_chosen: A pair's chosen aggregate must be at least this.
        min_gap: Chosen minus rejected aggregate must be at least this.
        peer_scoring: Peers judge (False: only the extra ``judges`` do).
        exclude_self: Leave a candidate's author out of its aggregate.
        max_prompt_chars: Longest judge prompt (small models). A judge prompt is never cut: one
            whose instructions, question and candidate do not fit is recorded as a failed judgment.
        seed: Base seed of generate calls.
    """

    n_candidates: int = 4
    max_tokens: int = 64
    temperature: float = 1.0
    stop: tuple[str, ...] | None = None
    judge_max_tokens: int = 160
    judge_temperature: float = 0.7
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
    """One response with its author, every judge's score (None = unparsed/failed), the verifiers'
    class (True correct, False wrong, None not verified) and the aggregate it is ranked by."""

    text: str
    author: str
    scores: dict[str, float | None] = field(default_factory=dict)
    aggregate: float | None = None
    verified: bool | None = None

    def rank_key(self) -> tuple[int, float]:
        """Verified-correct first, then by aggregate (candidates with an aggregate only)."""
        return (1 if self.verified else 0, self.aggregate if self.aggregate is not None else -1.0)


@dataclass
class PanelResult:
    """A task's candidates, judgments and pairs."""

    task: Task
    candidates: list[Candidate]
    judgments: list[JudgmentRecord]
    pairs: list[PairRecord]

    def ranked_list(self) -> RankedListRecord:
        """Candidates with an aggregate, best first (verifier class, then aggregate)."""
        scored = sorted(
            (c for c in self.candidates if c.aggregate is not None), key=lambda c: c.rank_key(), reverse=True
        )
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

    It is a verifier (``verifier = True``): in a panel it decides candidates' classes instead of
    voting (see the module docstring). A check that raises gives no verdict (``info["error"]``).

    Args:
        check: ``check(task, candidate) -> bool``; by default the last integer or decimal in the
            candidate must equal the answer numerically (or the stripped texts must match).
        name: Recorded as the judge's name.
    """

    verifier = True

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
    try:
        gold = float(task.answer)
    except ValueError:  # a word or phrase: the candidate's text must be it
        return candidate.strip() == task.answer.strip()
    nums = re.findall(r"-?\d+(?:\.\d+)?", candidate)
    return bool(nums) and float(nums[-1]) == gold


@dataclass
class _Vote:
    """Peers whose judgments are identical by construction, asked once and counted once."""

    peers: list[Peer]
    seed: int | None

    @property
    def name(self) -> str:
        return self.peers[0].name


def _votes(peers: Sequence[Peer], cfg: PanelConfig) -> list[_Vote]:
    """Group peers into distinct judges: a sampled judgment is its peer's own (seeded per peer);
    a greedy one is the same for every peer on the same policy object."""
    votes: dict[tuple[int, int], _Vote] = {}
    for k, peer in enumerate(peers):
        key = (id(peer.policy), k if cfg.judge_temperature > 0 else -1)
        seed = None if cfg.seed is None else cfg.seed + 1000 + k
        votes.setdefault(key, _Vote([], seed)).peers.append(peer)
    return list(votes.values())


def _judge_prompt(template: str, task: Task, cand: Candidate, limit: int | None) -> str | PromptTooLong:
    try:
        return fill_fit(
            template, limit, "panel judge prompt", prompt=task.prompt.strip(), response=cand.text.strip()
        )
    except PromptTooLong as e:
        return e


def run_panel(
    peers: Sequence[Peer],
    tasks: Sequence[Task],
    config: PanelConfig | None = None,
    judges: Sequence[Judge] = (),
) -> list[PanelResult]:
    """One panel round over ``tasks`` (see the module docstring).

    A peer whose generate call fails contributes no candidates to the batch (every result gets a
    ``JudgmentRecord`` with ``info["error"]`` saying why) and the round goes on with the others; a
    judge whose call fails, or whose prompt does not fit ``max_prompt_chars``, leaves its judgments
    unparsed with the reason recorded.
    """
    cfg = config or PanelConfig()
    if not peers:
        raise ValueError("run_panel needs at least one peer")
    if cfg.judge_temperature < 0:
        raise ValueError(f"panel judge_temperature must be >= 0, got {cfg.judge_temperature}")
    names = [p.name for p in peers] + [j.name for j in judges]
    if len(set(names)) != len(names):
        raise ValueError(f"peer and judge names must be distinct, got {names}")
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
    voters: dict[str, list[str]] = {}  # vote name -> the peers it speaks for
    if cfg.peer_scoring and flat:
        template = load_prompt("panel_judge.txt")
        built = [_judge_prompt(template, tasks[i], c, cfg.max_prompt_chars) for i, c in flat]
        fitting = [j for j, b in enumerate(built) if isinstance(b, str)]
        for vote in _votes(peers, cfg):
            voters[vote.name] = [p.name for p in vote.peers]
            outs, err = (None, None)
            if fitting:
                outs, err = generate_guarded(
                    vote.peers[0].policy,
                    [built[j] for j in fitting],
                    1,
                    max_tokens=cfg.judge_max_tokens,
                    temperature=cfg.judge_temperature,
                    seed=vote.seed,
                )
            texts = {j: (outs[n][0].text if outs is not None else "") for n, j in enumerate(fitting)}
            for j, (i, cand) in enumerate(flat):
                raw = texts.get(j, "")
                parsed = parse_likert(raw)
                score = parsed.normalised
                cand.scores[vote.name] = score
                info: dict[str, Any] = {
                    "dimensions": parsed.dims,
                    "author": cand.author,
                    "missing": parsed.missing,
                }
                if len(vote.peers) > 1:
                    info["peers"] = voters[vote.name]
                if isinstance(built[j], PromptTooLong):
                    info.update(unparsed=True, error=str(built[j]))
                elif score is None:
                    info.update(unparsed=True, raw=raw[:500], error=err)
                judgments[i].append(
                    JudgmentRecord(
                        judge=vote.name,
                        score=0.0 if score is None else score,
                        target_kind="candidate",
                        target_text=cand.text,
                        rationale=str(built[j]) if isinstance(built[j], PromptTooLong) else parsed.rationale,
                        info=info,
                    )
                )
    verifiers = {j.name for j in judges if getattr(j, "verifier", False)}
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
                # A judgment that reports an error is no score (a broken check proves nothing).
                cand.scores[judge.name] = None if (v.info or {}).get("error") else float(v.score)
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
            n_votes = _aggregate(cand, verifiers, voters, cfg.exclude_self)
            if cand.aggregate is not None:
                judgments[i].append(
                    JudgmentRecord(
                        judge="panel",
                        score=cand.aggregate,
                        target_kind="candidate",
                        target_text=cand.text,
                        rationale="verifier class, then mean over votes" if verifiers else "mean over votes",
                        info={"author": cand.author, "judges": n_votes, "verified": cand.verified},
                    )
                )
        results.append(PanelResult(task, cands[i], judgments[i], panel_pairs(task, cands[i], cfg)))
    return results


def _aggregate(cand: Candidate, verifiers: set[str], voters: dict[str, list[str]], exclude_self: bool) -> int:
    """Set ``cand.verified`` and ``cand.aggregate`` (module docstring, step 4); returns the votes used."""
    votes = [
        s
        for name, s in cand.scores.items()
        if s is not None
        and name not in verifiers
        and not (exclude_self and cand.author in voters.get(name, [name]))
    ]
    mean = sum(votes) / len(votes) if votes else None
    if not verifiers:
        cand.verified, cand.aggregate = None, mean
        return len(votes)
    verdicts = [cand.scores.get(v) for v in verifiers]
    if any(v is None for v in verdicts):  # a verifier gave no verdict: not ranked at all
        cand.verified, cand.aggregate = None, None
        return len(votes)
    cand.verified = all(v >= 0.5 for v in verdicts)
    v = 1.0 if cand.verified else 0.0
    cand.aggregate = v if mean is None else (v + mean) / 2
    return len(votes)


def panel_pairs(task: Task, candidates: Sequence[Candidate], config: PanelConfig) -> list[PairRecord]:
    """Best vs worst ranked candidate if the thresholds hold (at most one pair per prompt); when a
    verifier classed the candidates, the chosen one must be verified correct."""
    scored = [c for c in candidates if c.aggregate is not None]
    if len(scored) < 2:
        return []
    best = max(scored, key=lambda c: c.rank_key())  # first of equals: deterministic
    worst = min(scored, key=lambda c: c.rank_key())
    if any(c.verified is not None for c in scored) and best.verified is not True:
        return []
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
                "chosen_verified": best.verified,
                "rejected_verified": worst.verified,
            },
        )
    ]
