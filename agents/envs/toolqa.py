"""ToolQA: questions that need 2-4 tool calls over a small local knowledge base and a calculator.

The knowledge base is made from ``kb_seed``: ``n_entities`` invented places (``Borvia``,
``Kelmaron``, ...) with integer attributes (population, area, founded, elevation). Questions
combine them so that the shortest solution uses 2-4 tool calls before answering:

=========  ============================================================  ======================
kind       example                                                       shortest solution
=========  ============================================================  ======================
ratio      What is the population of Borvia divided by its area           search, calculate
           (integer division)?
sum2       What is the population of Borvia plus the population of        search, search,
           Kelmaron?                                                      calculate
diff2      How many years after Kelmaron was Borvia founded?              search, search,
                                                                          calculate
sum3       What is the total area of Borvia, Kelmaron and Tesh?           3 x search, calculate
=========  ============================================================  ======================

Action grammar (one action per line, case-insensitive tool names)::

    search[<entity name>]      -> the entity's page: "Borvia: population 1234; area 56; ..."
    lookup[<attribute>]        -> one attribute of the last page searched
    calculate[<expression>]    -> integers, + - * / // % and parentheses (never Python eval)
    answer[<value>]            -> ends the episode; reward 1.0 iff the number equals the answer

Anything else is answered with an ``Invalid action: ...`` observation, reward ``invalid_penalty``
and ``info["invalid"] = True`` (runners count these on the trajectory). Every tool runs under a
time limit; a tool that raises, hangs or returns a non-string ends the episode with
``info["error"]`` set, which runners turn into a failed trajectory.

Splits are a hash partition of the question text, like ``arithmetic``; the knowledge base is shared.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import operator
import random
import re
from collections.abc import Callable

from agents.base import StepResult, Task, Trajectory
from agents.envs.arithmetic import split_of_bucket
from agents.guards import call_with_timeout

SPLITS = ("train", "validation", "test")
QUESTION_KINDS = ("ratio", "sum2", "diff2", "sum3")
ATTRIBUTES = {
    "population": (1_000, 99_999),
    "area": (10, 999),
    "founded": (1200, 1999),
    "elevation": (0, 3000),
}
TOOLS_LINE = "Tools: search[name] lookup[attribute] calculate[expression] answer[value]\n"
_ACTION = re.compile(r"\s*([A-Za-z_]+)\s*\[(.*)\]\s*", re.DOTALL)
_SYLLABLES = [
    "bor",
    "vi",
    "kel",
    "mar",
    "on",
    "tesh",
    "al",
    "du",
    "ra",
    "zen",
    "qua",
    "lo",
    "fen",
    "ir",
    "sa",
    "gu",
]
_ENDINGS = ["ia", "land", "a", "or", "", "en", "ville"]


# -- a calculator that never runs Python -----------------------------------------------------------

_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_MAX_ABS = 10**15


class CalculatorError(ValueError):
    """An expression the calculator refuses: not arithmetic, too long, too large, or division by 0."""


def calculate(expression: str, max_chars: int = 200) -> int | float:
    """Evaluate integer arithmetic safely: the text is parsed with ``ast`` and only number literals,
    ``+ - * / // %``, unary signs and parentheses are walked; names, calls and attributes are refused.

    Raises:
        CalculatorError: On anything else, on results beyond 1e15, or on division by zero.
    """
    text = expression.strip().replace(",", "")
    if not text or len(text) > max_chars:
        raise CalculatorError(f"expression must be 1..{max_chars} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise CalculatorError("not an arithmetic expression") from e

    def walk(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            value = -value if isinstance(node.op, ast.USub) else value
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
                raise CalculatorError("division by zero")
            value = _BINOPS[type(node.op)](left, right)
        else:
            raise CalculatorError("only numbers, + - * / // % and parentheses are allowed")
        if abs(value) > _MAX_ABS:
            raise CalculatorError("number too large")
        return value

    value = walk(tree)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return round(value, 6) if isinstance(value, float) else value


# -- the knowledge base ----------------------------------------------------------------------------


def make_knowledge_base(n_entities: int, seed: int) -> dict[str, dict[str, int]]:
    """``n_entities`` distinct invented place names, each with every attribute of ``ATTRIBUTES``."""
    rng = random.Random(f"toolqa-kb|{seed}")
    kb: dict[str, dict[str, int]] = {}
    while len(kb) < n_entities:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 2))) + rng.choice(_ENDINGS)
        name = name.capitalize()
        if len(name) < 4 or name in kb:
            continue
        kb[name] = {a: rng.randint(lo, hi) for a, (lo, hi) in ATTRIBUTES.items()}
    return kb


def _page(name: str, facts: dict[str, int]) -> str:
    return f"{name}: " + "; ".join(f"{a} {v}" for a, v in facts.items())


def _number(text: str) -> float | None:
    try:
        return float(text.strip().replace(",", ""))
    except ValueError:
        return None


# -- the environment --------------------------------------------------------------------------------


class ToolQAEnv:
    """Multi-hop numeric questions over a seeded knowledge base, answered with tools.

    Args:
        n_entities: Size of the knowledge base.
        kb_seed: Seed of the knowledge base (shared by both splits).
        kinds: Question kinds to draw from (see the module docstring).
        tool_timeout: Seconds each tool call may take.
        invalid_penalty: Reward of an unparseable action.
        show_tools: Start prompts with a one-line list of the tools.
        name: Environment name recorded on tasks.
        test_fraction: Share of questions in the test split.
        validation_fraction: Share in the validation split (carved out of train), for choosing settings.
    """

    def __init__(
        self,
        n_entities: int = 40,
        kb_seed: int = 0,
        kinds: tuple[str, ...] | list[str] = QUESTION_KINDS,
        tool_timeout: float = 2.0,
        invalid_penalty: float = -0.1,
        show_tools: bool = True,
        name: str = "toolqa",
        test_fraction: float = 0.2,
        validation_fraction: float = 0.1,
    ) -> None:
        unknown = sorted(set(kinds) - set(QUESTION_KINDS))
        if not kinds or unknown:
            raise ValueError(
                f"ToolQAEnv kinds must be a non-empty subset of {QUESTION_KINDS}, got {list(kinds)}"
            )
        if n_entities < 3:
            raise ValueError("ToolQAEnv needs n_entities >= 3")
        self.kb = make_knowledge_base(n_entities, kb_seed)
        self.kb_seed = kb_seed
        self.kinds = tuple(kinds)
        self.tool_timeout = tool_timeout
        self.invalid_penalty = invalid_penalty
        self.show_tools = show_tools
        self.name = name
        self.test_fraction = test_fraction
        self.validation_fraction = validation_fraction
        self.tools: dict[str, Callable[[str], str]] = {
            "search": self._search,
            "lookup": self._lookup,
            "calculate": self._calculate,
        }
        self._task: Task | None = None
        self._page: str | None = None
        self._done = False

    # -- tasks ---------------------------------------------------------------------------------

    def _question(self, kind: str, rng: random.Random) -> tuple[str, int, list[str]]:
        names = rng.sample(sorted(self.kb), 3)
        a, b, c = names
        kb = self.kb
        if kind == "ratio":
            value = kb[a]["population"] // kb[a]["area"]
            q = f"What is the population of {a} divided by its area (integer division)?"
            calc = f"{kb[a]['population']}//{kb[a]['area']}"
            used = [a]
        elif kind == "sum2":
            attr = rng.choice(["area", "elevation", "population"])
            value = kb[a][attr] + kb[b][attr]
            q = f"What is the {attr} of {a} plus the {attr} of {b}?"
            calc = f"{kb[a][attr]}+{kb[b][attr]}"
            used = [a, b]
        elif kind == "diff2":
            value = kb[a]["founded"] - kb[b]["founded"]
            q = f"How many years after {b} was {a} founded? (negative if before)"
            calc = f"{kb[a]['founded']}-{kb[b]['founded']}"
            used = [a, b]
        else:
            attr = rng.choice(["population", "area"])
            value = kb[a][attr] + kb[b][attr] + kb[c][attr]
            q = f"What is the total {attr} of {a}, {b} and {c}?"
            calc = f"{kb[a][attr]}+{kb[b][attr]}+{kb[c][attr]}"
            used = [a, b, c]
        actions = [f"search[{n}]" for n in used] + [f"calculate[{calc}]", f"answer[{value}]"]
        return q, value, actions

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        """``n`` distinct questions of ``split`` (a pure function of the arguments and knobs)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; ToolQAEnv has {SPLITS}")
        rng = random.Random(f"toolqa|{split}|{seed}|{self.kb_seed}|{len(self.kb)}|{','.join(self.kinds)}")
        out: list[Task] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            kind = rng.choice(self.kinds)
            q, value, actions = self._question(kind, rng)
            h = int.from_bytes(hashlib.sha256(q.encode()).digest()[:8], "big") / 2**64
            if split_of_bucket(h, self.test_fraction, self.validation_fraction) != split:
                continue
            if q in seen and attempts < 200 * (n + 10):
                continue
            task_id = hashlib.sha256(q.encode()).hexdigest()[:12] + (f"#{len(out)}" if q in seen else "")
            seen.add(q)
            prompt = (TOOLS_LINE if self.show_tools else "") + f"Question: {q}\n"
            out.append(
                Task(
                    id=task_id,
                    prompt=prompt,
                    answer=str(value),
                    reference="".join(a + "\n" for a in actions),
                    env=self.name,
                    split=split,
                    meta={"kind": kind, "min_tool_calls": len(actions) - 1, "kb_seed": self.kb_seed},
                )
            )
        return out

    # -- tools -----------------------------------------------------------------------------------

    def _search(self, arg: str) -> str:
        key = arg.strip().strip("'\"").lower()
        for name, facts in self.kb.items():
            if name.lower() == key:
                self._page = name
                return _page(name, facts)
        close = difflib.get_close_matches(arg.strip().capitalize(), list(self.kb), n=3, cutoff=0.6)
        hint = f" Similar: {', '.join(close)}." if close else ""
        return f"No entity named {arg.strip()!r}.{hint}"

    def _lookup(self, arg: str) -> str:
        if self._page is None:
            return "No page open: search for an entity first."
        attr = arg.strip().lower()
        if attr not in self.kb[self._page]:
            return f"{self._page} has no attribute {arg.strip()!r}; it has {', '.join(ATTRIBUTES)}."
        return f"{attr} of {self._page}: {self.kb[self._page][attr]}"

    def _calculate(self, arg: str) -> str:
        try:
            return f"{arg.strip()} = {calculate(arg)}"
        except CalculatorError as e:
            return f"Calculator error: {e}"

    def _run_tool(self, tool: str, arg: str) -> tuple[str | None, str | None]:
        """Run a tool under the time limit; return (observation, error)."""
        out, err = call_with_timeout(lambda: self.tools[tool](arg), self.tool_timeout, f"tool {tool}")
        if err is None and not isinstance(out, str):
            return None, f"tool {tool} returned {type(out).__name__}, not text"
        return out, err

    # -- episodes ----------------------------------------------------------------------------------

    def reset(self, task: Task) -> str:
        """Start an episode; the observation is the prompt."""
        self._task = task
        self._page = None
        self._done = False
        return task.prompt

    def step(self, action: str) -> StepResult:
        """Parse and run one action. Unparseable text is an ``Invalid action`` observation."""
        if self._task is None:
            raise RuntimeError("ToolQAEnv.step called before reset")
        if self._done:
            return StepResult("", 0.0, True, {"error": "episode is over"})
        line = str(action).strip()
        m = _ACTION.fullmatch(line) if "\n" not in line else None
        tool = m.group(1).lower() if m else ""
        if not m or (tool not in self.tools and tool != "answer"):
            reason = "expected one line tool[argument]" if not m else f"unknown tool {m.group(1)!r}"
            obs = f"Invalid action: {reason}. Use search[...], lookup[...], calculate[...] or answer[...]."
            return StepResult(obs, self.invalid_penalty, False, {"invalid": True})
        arg = m.group(2)
        if tool == "answer":
            self._done = True
            correct = _answer_correct(arg, self._task.answer)
            return StepResult(
                f"Answered {arg.strip()}.", 1.0 if correct else 0.0, True, {"correct": correct, "tool": tool}
            )
        obs, error = self._run_tool(tool, arg)
        if error is not None:
            self._done = True
            return StepResult(f"Error: {error}", 0.0, True, {"error": error, "tool": tool})
        return StepResult(obs, 0.0, False, {"tool": tool})

    def score(self, task: Task, trajectory: Trajectory) -> float:
        """1.0 if the trajectory's first ``answer[...]`` equals the gold answer, else 0.0."""
        for s in trajectory.steps:
            m = _ACTION.fullmatch(s.action.strip())
            if m and m.group(1).lower() == "answer":
                return 1.0 if _answer_correct(m.group(2), task.answer) else 0.0
        return 0.0


def _answer_correct(text: str, gold: str | None) -> bool:
    got, want = _number(text), _number(gold or "")
    return got is not None and want is not None and got == want
