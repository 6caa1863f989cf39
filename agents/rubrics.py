"""Co-ReAct rubrics: parsing, phase hints, injection and verification text, and the reward that
scores a rubric generator's output (docs/algorithms.md, section 5).

A rubric is 3-5 lines ``k. [w_k] condition`` about ONE next action. Parsing is defensive: a line
counts only if it matches ``\\d+\\.\\s*\\[[-\\d.]+\\]`` followed by text; non-positive or unreadable
weights are dropped; the kept weights are normalised to sum 1 (``raw_weight`` keeps what the model
wrote, which the format score needs). Lines with URLs that the context does not contain are
dropped (fabricated URLs).

Reward for rubric-generator training (pure functions)::

    R = 0 if the 4-gram repetition rate of the output > 0.40, else 0.75 S + 0.15 A + 0.10 F
    S = (rho + 1) / 2, rho = Spearman(ranks a judge gives the candidate actions by this rubric,
                                      expert Borda ranks); rho undefined -> S = 0.5
    A = atomic criteria / criteria (judge-reported)
    F = 0.5 [3 <= #criteria <= 5] + 0.5 [|sum of positive raw weights - 1| < 0.15]
    fewer than 2 parsed criteria -> S = A = 0
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from treeplay.agents.prompt_files import fill, load_prompt, load_prompt_yaml

VERIFY_THRESHOLD = 0.6
REPETITION_GATE = 0.40
REWARD_WEIGHTS = (0.75, 0.15, 0.10)
_LINE = re.compile(r"^\s*\d+\.\s*\[([-\d.]+)\]\s*(\S.*?)\s*$")
_RUBRIC_MARK = re.compile(r"\d+\.\s*\[[-\d.]+\]")
_URL = re.compile(r"https?://\S+")


@dataclass
class Criterion:
    """One rubric line: a normalised ``weight``, the weight as written, and the condition."""

    weight: float
    text: str
    raw_weight: float


@dataclass
class Rubric:
    """Parsed criteria (normalised weights) and what was dropped on the way."""

    criteria: list[Criterion] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.criteria)

    def render(self) -> str:
        """The canonical text: ``k. [w] condition`` per line, weights with two decimals."""
        return "\n".join(f"{k}. [{c.weight:.2f}] {c.text}" for k, c in enumerate(self.criteria, 1))

    @property
    def raw_weight_sum(self) -> float:
        return sum(c.raw_weight for c in self.criteria if c.raw_weight > 0)


def has_rubric_lines(text: str) -> bool:
    """Whether any line matches the rubric marker (the spec's retry condition)."""
    return any(_RUBRIC_MARK.search(line) for line in text.splitlines())


def parse_rubric(text: str, known_text: str | None = None, max_criteria: int = 8) -> Rubric:
    """Parse rubric lines out of untrusted model text.

    Args:
        text: Model output.
        known_text: If given, lines with a URL not found in it are dropped.
        max_criteria: Keep at most this many (the first ones).
    """
    out = Rubric()
    kept: list[tuple[float, str]] = []
    for line in str(text).splitlines():
        m = _LINE.match(line)
        if not m:
            if line.strip():
                out.dropped.append(line)
            continue
        try:
            w = float(m.group(1))
        except ValueError:
            out.dropped.append(line)
            continue
        cond = m.group(2)
        urls = _URL.findall(cond)
        if (
            not math.isfinite(w)
            or w <= 0
            or (known_text is not None and any(u not in known_text for u in urls))
        ):
            out.dropped.append(line)
            continue
        kept.append((w, cond))
    kept = kept[:max_criteria]
    total = sum(w for w, _ in kept)
    out.criteria = [Criterion(w / total, c, w) for w, c in kept]
    return out


def phase_hint(n_tool_calls: int, max_tool_calls: int) -> str:
    """Co-ReAct's hint: early (n < 3), mid (3 <= n < max - 3), late (n >= max - 3)."""
    hints = load_prompt_yaml("phase_hints.yaml")
    if n_tool_calls < 3:
        return str(hints["early"])
    if n_tool_calls < max_tool_calls - 3:
        return str(hints["mid"])
    return str(hints["late"])


def injection(rubric: Rubric | str) -> str:
    """The text appended to the context before generating the next action."""
    body = rubric.render() if isinstance(rubric, Rubric) else rubric
    return fill(load_prompt("rubric_injection.txt"), rubric=body)


def feedback_suffix(feedback: str) -> str:
    """``[Rubric Feedback: ... Please reconsider your action.]``"""
    return fill(load_prompt("rubric_feedback.txt"), feedback=" ".join(str(feedback).split()).rstrip("."))


@dataclass
class Verdict:
    """A verifier's answer: pass/fail, the weighted score if given, feedback, and whether it parsed."""

    passed: bool
    weighted_score: float | None = None
    feedback: str = ""
    parsed: bool = True


def parse_verdict(text: str, threshold: float = VERIFY_THRESHOLD) -> Verdict:
    """Read ``{pass, weighted_score, feedback}`` from untrusted text; a parse failure passes.

    A numeric ``weighted_score`` decides (pass iff >= ``threshold``); otherwise the ``pass`` field.
    """
    start = str(text).find("{")
    end = str(text).rfind("}")
    try:
        data = json.loads(text[start : end + 1]) if 0 <= start < end else None
    except (json.JSONDecodeError, ValueError):
        data = None
    if not isinstance(data, dict):
        return Verdict(True, None, "", parsed=False)
    feedback = str(data.get("feedback", "") or "")
    score = data.get("weighted_score")
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        return Verdict(float(score) >= threshold, float(score), feedback)
    if isinstance(data.get("pass"), bool):
        return Verdict(data["pass"], None, feedback)
    return Verdict(True, None, feedback, parsed=False)


# -- the rubric generator's reward (pure functions) -------------------------------------------------


def repetition_rate(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier n-gram (0 when there are none)."""
    words = str(text).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values`` in ascending order, tied values sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho (Pearson on average ranks); NaN when either side is constant or too short."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return math.nan
    return cov / math.sqrt(va * vb)


def alignment_score(judge_ranks: Sequence[float], expert_ranks: Sequence[float]) -> float:
    """S = (rho + 1) / 2, or 0.5 when rho is undefined."""
    rho = spearman(judge_ranks, expert_ranks)
    return 0.5 if math.isnan(rho) else (rho + 1) / 2


def format_score(rubric: Rubric) -> float:
    """F = 0.5 [3 <= #criteria <= 5] + 0.5 [|sum of positive raw weights - 1| < 0.15]."""
    count_ok = 3 <= len(rubric.criteria) <= 5
    weights_ok = abs(rubric.raw_weight_sum - 1.0) < 0.15
    return 0.5 * count_ok + 0.5 * weights_ok


def rubric_reward(
    text: str,
    judge_ranks: Sequence[float],
    expert_ranks: Sequence[float],
    n_atomic: int,
) -> float:
    """The reward of one generated rubric (see the module docstring).

    Args:
        text: The generator's raw output.
        judge_ranks: Ranks a judge gave the candidate actions when told to rank them by this rubric
            (lower is better; ties averaged).
        expert_ranks: The expert Borda ranks of the same actions (lower is better).
        n_atomic: How many criteria the judge reported as atomic (checkable from the action).
    """
    if repetition_rate(text) > REPETITION_GATE:
        return 0.0
    rubric = parse_rubric(text, max_criteria=1000)
    n = len(rubric.criteria)
    if n < 2:
        s = a = 0.0
    else:
        s = alignment_score(judge_ranks, expert_ranks)
        a = min(max(n_atomic, 0), n) / n
    ws, wa, wf = REWARD_WEIGHTS
    return ws * s + wa * a + wf * format_score(rubric)
