"""Multi-step arithmetic chains: the demo environment, where actions are reasoning steps.

A task is an expression such as ``47+38-12`` evaluated strictly left to right (no operator
precedence). The policy writes one line per operation, carrying the running value::

    prompt     "47+38-12\\n"
    step 1     "47+38=85"
    step 2     "85-12=73"        -> done, reward 1.0 because 73 is the answer

So ``transcript(task.prompt, steps)`` of a correct episode equals ``task.prompt + task.reference``,
and the reference doubles as the completion of a supervised warm start (``demonstrations``).

Splits: every expression belongs to exactly one split, decided by a hash of its text, so ``train``
and ``test`` never share a task whatever the seeds. Within a split, ``tasks(split, n, seed)`` is a
pure function of its arguments and the difficulty knobs.

Difficulty knobs: ``ops`` (operations per chain), ``digits`` (operands are drawn uniformly from
``0 .. 10**digits - 1``), ``operators`` (any of ``+-*``) and ``allow_negative`` (when False, only
chains whose running values stay >= 0 are generated).

Rewards: 0 on intermediate steps; on the ``ops``-th step the episode ends with 1.0 if the integer
after the last ``=`` of that action equals the answer, else 0.0. ``info["step_ok"]`` tells whether
a step equals the reference step (analysis and step-level critics only; it never changes rewards).
Garbage actions never raise.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence

from treeplay.agents.base import StepResult, Task, Trajectory

SPLITS = ("train", "validation", "test")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_EQUATION = re.compile(r"\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*")
_ANSWER = re.compile(r"\s*(-?\d+)\s*")


def final_answer(line: str) -> int | None:
    """The integer after the last ``=`` of ``line`` (or of a whole completion's last line), or None."""
    lines = [s for s in line.strip().split("\n") if s.strip()]
    if not lines or "=" not in lines[-1]:
        return None
    m = _ANSWER.fullmatch(lines[-1].rsplit("=", 1)[1])
    return int(m.group(1)) if m else None


def solve(expression: str) -> tuple[int, str]:
    """Evaluate ``expression`` left to right; return (value, worked solution with one line per op).

    Raises:
        ValueError: If the expression is not ``int (op int)+`` with ops among ``+-*``.
    """
    tokens = re.findall(r"\d+|[+\-*]|\S", expression.strip())
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        raise ValueError(f"not an arithmetic chain: {expression!r}")
    try:
        value = int(tokens[0])
        lines = []
        for op, operand in zip(tokens[1::2], tokens[2::2], strict=True):
            nxt = _OPS[op](value, int(operand))
            lines.append(f"{value}{op}{operand}={nxt}\n")
            value = nxt
    except (KeyError, ValueError) as e:
        raise ValueError(f"not an arithmetic chain: {expression!r}") from e
    return value, "".join(lines)


def _bucket(expression: str) -> float:
    """A stable number in [0, 1) from the expression's text (the split partition)."""
    return int.from_bytes(hashlib.sha256(expression.encode()).digest()[:8], "big") / 2**64


def split_of_bucket(bucket: float, test_fraction: float, validation_fraction: float) -> str:
    """The split of a text whose hash bucket is ``bucket``: test, then validation, then train."""
    if bucket < test_fraction:
        return "test"
    return "validation" if bucket < test_fraction + validation_fraction else "train"


class ArithmeticEnv:
    """Left-to-right arithmetic chains with an exact verifier.

    Args:
        ops: Operations per chain (and steps per episode).
        digits: Operands are uniform in ``0 .. 10**digits - 1``.
        operators: Which of ``+-*`` may appear.
        allow_negative: If False, only chains whose running values stay >= 0.
        name: Environment name recorded on tasks.
        test_fraction: Share of all expressions that belong to the test split.
        validation_fraction: Share that belongs to the validation split (carved out of what would
            otherwise be train): settings are chosen on it, and the test split is reported once.
    """

    def __init__(
        self,
        ops: int = 1,
        digits: int = 2,
        operators: str = "+-",
        allow_negative: bool = False,
        name: str = "arithmetic",
        test_fraction: float = 0.2,
        validation_fraction: float = 0.1,
    ) -> None:
        if ops < 1 or digits < 1:
            raise ValueError(f"ArithmeticEnv needs ops >= 1 and digits >= 1, got ops={ops}, digits={digits}")
        bad = sorted(set(operators) - set(_OPS))
        if not operators or bad:
            raise ValueError(
                f"ArithmeticEnv operators must be a non-empty subset of '+-*', got {operators!r}"
            )
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if not 0.0 <= validation_fraction < 1.0 - test_fraction:
            raise ValueError(
                f"validation_fraction must be in [0, 1 - test_fraction), got {validation_fraction}"
            )
        self.ops = ops
        self.digits = digits
        self.operators = "".join(dict.fromkeys(operators))
        self.allow_negative = allow_negative
        self.name = name
        self.test_fraction = test_fraction
        self.validation_fraction = validation_fraction
        self._task: Task | None = None
        self._reference: list[str] = []
        self._t = 0

    # -- tasks ---------------------------------------------------------------------------------

    def split_of(self, expression: str) -> str:
        """Which split an expression belongs to ("train", "validation" or "test")."""
        return split_of_bucket(_bucket(expression), self.test_fraction, self.validation_fraction)

    def _draw(self, rng: random.Random) -> str | None:
        hi = 10**self.digits - 1
        value = rng.randint(0, hi)
        parts = [str(value)]
        for _ in range(self.ops):
            op = rng.choice(self.operators)
            operand = rng.randint(0, hi)
            value = _OPS[op](value, operand)
            if value < 0 and not self.allow_negative:
                return None
            parts += [op, str(operand)]
        return "".join(parts)

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        """``n`` tasks of ``split``, a pure function of (split, n, seed, knobs).

        Expressions are distinct while the split has enough of them; a space smaller than ``n``
        (1 digit, 1 op; or 2 digits, 1 op and the warm start's 20,000 examples) repeats expressions
        rather than returning fewer than ``n`` tasks. The split counts as exhausted once
        ``10 × distinct-so-far`` draws in a row found nothing new (at that point the chance that an
        unseen expression is left is small); draws stop being rejected as repeats from then on.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; ArithmeticEnv has {SPLITS}")
        rng = random.Random(
            f"arithmetic|{split}|{seed}|{self.ops}|{self.digits}|{self.operators}|{self.allow_negative}"
        )
        out: list[Task] = []
        seen: dict[str, int] = {}
        misses, exhausted = 0, False
        while len(out) < n:
            expr = self._draw(rng)
            if expr is None or self.split_of(expr) != split:
                continue
            if expr in seen and not exhausted:
                misses += 1
                exhausted = misses > 10 * len(seen) + 1000
                continue
            misses = 0
            seen[expr] = seen.get(expr, 0) + 1
            value, reference = solve(expr)
            task_id = expr if seen[expr] == 1 else f"{expr}#{seen[expr]}"
            knobs = {
                "ops": self.ops,
                "digits": self.digits,
                "operators": self.operators,
                "allow_negative": self.allow_negative,
            }
            out.append(
                Task(
                    id=task_id,
                    prompt=expr + "\n",
                    answer=str(value),
                    reference=reference,
                    env=self.name,
                    split=split,
                    meta=knobs,
                )
            )
        return out

    def demonstrations(self, tasks: Sequence[Task]) -> list[tuple[str, str]]:
        """(prompt, completion) pairs for a supervised warm start: the completion is the reference."""
        return [(t.prompt, t.reference or solve(t.prompt)[1]) for t in tasks]

    # -- episodes ------------------------------------------------------------------------------

    def reset(self, task: Task) -> str:
        """Start an episode on ``task``; the observation is the prompt."""
        self._task = task
        self._reference = (task.reference or solve(task.prompt)[1]).splitlines()
        self._t = 0
        return task.prompt

    def step(self, action: str) -> StepResult:
        """Apply one reasoning line. Never raises on garbage text."""
        if self._task is None:
            raise RuntimeError("ArithmeticEnv.step called before reset")
        if self._t >= len(self._reference):
            return StepResult("", 0.0, True, {"error": "episode is over", "step_ok": False})
        line = str(action).split("\n", 1)[0].strip()
        expected = self._reference[self._t]
        m = _EQUATION.fullmatch(line)
        arith_ok = bool(m) and _OPS[m.group(2)](int(m.group(1)), int(m.group(3))) == int(m.group(4))
        step_ok = arith_ok and line.replace(" ", "") == expected
        self._t += 1
        done = self._t >= len(self._reference)
        reward = 0.0
        info = {"step_ok": step_ok, "arith_ok": arith_ok}
        if done:
            reward = 1.0 if _answer_matches(line, self._task.answer) else 0.0
            info["correct"] = reward == 1.0
        return StepResult("", reward, done, info)

    def score(self, task: Task, trajectory: Trajectory) -> float:
        """1.0 if the ``ops``-th action ends in the right answer, else 0.0."""
        n = len((task.reference or "").splitlines()) or self.ops
        if len(trajectory.steps) < n:
            return 0.0
        return 1.0 if _answer_matches(trajectory.steps[n - 1].action, task.answer) else 0.0

    def verify(self, task: Task, completion: str) -> bool:
        """Whether a whole completion (lines of steps) ends in the right answer on its last line."""
        lines = completion.strip("\n").split("\n")
        if len([s for s in lines if s.strip()]) < 1:
            return False
        return _answer_matches(lines[-1], task.answer)


def _answer_matches(line: str, answer: str | None) -> bool:
    if answer is None:
        return False
    got = final_answer(str(line).split("\n", 1)[0])
    try:
        return got is not None and got == int(answer)
    except ValueError:
        return False
