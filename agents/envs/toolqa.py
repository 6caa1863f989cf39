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

Warm-start demonstrations (``demonstrations``) come from each task's shortest correct solution (its
``reference``, played here so every observation is the real one) and are rendered by the ReAct
agent's own prompt functions (``agents.react.act_prompt``, ``rubric_prompt``, ``verifier_prompt``),
so a warm start trains on exactly the contexts the policy is prompted with:

- ``actions``: at every step, the plain prompt (``transcript`` of the question and the steps so far)
  and the next action -- as one demonstration of the whole episode whose observations are context
  lines, which teaches each action after exactly that prompt;
- ``rubrics``: from the second step on, the rubric generator's prompt and a rubric for the next
  action written from the solution (``next_action_rubric``), and the act prompt with that rubric
  injected and the next action;
- ``verdicts``: from the second step on, the verifier's prompt with the next action (verdict: pass)
  and with a wrong one (a wrong or repeated entity, a premature answer, a wrong operator or number,
  a wrong value; verdict: fail, with feedback), each scored criterion by criterion; and the retry
  prompt (the wrong action, its feedback and the rubric) with the next action.
"""

from __future__ import annotations

import ast
import copy
import difflib
import hashlib
import json
import operator
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from treeplay.agents.base import Demonstration, DemonstrationKind, Step, StepResult, Task, Trajectory
from treeplay.agents.envs.arithmetic import split_of_bucket
from treeplay.agents.guards import call_with_timeout

if TYPE_CHECKING:
    from treeplay.agents.react import ReActConfig

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

    # -- warm-start demonstrations -------------------------------------------------------------

    demonstration_kinds: tuple[DemonstrationKind, ...] = ("actions", "rubrics", "verdicts")

    def solution(self, task: Task) -> list[Step]:
        """The shortest correct solution of ``task`` (its ``reference``) played on a copy of this
        environment: every action with the observation it gets.

        Raises:
            ValueError: The task has no reference, or its reference does not answer it correctly.
        """
        env = copy.copy(self)
        env.reset(task)
        steps: list[Step] = []
        for action in (a for a in (task.reference or "").splitlines() if a.strip()):
            r = env.step(action)
            steps.append(Step(len(steps), action, r.observation, r.reward, info=dict(r.info)))
        if not steps or not steps[-1].info.get("correct"):
            raise ValueError(f"toolqa task {task.id}: its reference does not answer it correctly")
        return steps

    def demonstrations(
        self,
        tasks: Sequence[Task],
        kinds: Sequence[DemonstrationKind] = ("actions",),
        react: ReActConfig | None = None,
    ) -> list[Demonstration]:
        """Warm-start examples of ``kinds`` from each task's solution (see the module docstring),
        rendered with the ReAct settings ``react`` (default ``ReActConfig()``).

        A prompt that does not fit ``react.max_prompt_chars`` is one the agent never sends, so it
        gives no example.

        Raises:
            ValueError: An unknown kind, or a kind none of whose prompts fits ``max_prompt_chars``.
        """
        from treeplay.agents.prompt_files import PromptTooLong
        from treeplay.agents.react import ReActConfig, act_prompt, rubric_prompt, verifier_prompt
        from treeplay.agents.rubrics import parse_rubric

        unknown = [k for k in kinds if k not in self.demonstration_kinds]
        if not kinds or unknown:
            raise ValueError(f"toolqa demonstrations: kinds must be among {self.demonstration_kinds}, "
                             f"got {list(kinds)}")
        config = react or ReActConfig()
        out: list[Demonstration] = []
        made: Counter[str] = Counter()
        too_long: Counter[str] = Counter()

        def add(kind: str, prompt: Callable[[], str], completion: str, ends: bool = False) -> None:
            # kind: what the demonstration teaches; the act prompts that come with a rubric or a
            # retry ("-act") do not count towards whether a kind got any example.
            try:
                out.append(Demonstration(prompt(), completion, ends))
                made[kind] += 1
            except PromptTooLong:
                too_long[kind] += 1

        for task in tasks:
            steps = self.solution(task)
            rng = random.Random(f"toolqa-demo|{task.id}|{task.prompt}")
            if "actions" in kinds:
                demos, lost = _action_demonstrations(config, task, steps)
                out += demos
                made["actions"] += len(demos)
                too_long["actions"] += lost
            for i, step in enumerate(steps):
                done, action = steps[:i], step.action + "\n"
                if i == 0:  # the agent writes no rubric before the first action
                    continue
                criteria = self.next_action_rubric(task, steps, i)
                text = "\n".join(f"{k}. [{w:.2f}] {c}" for k, (w, c, _) in enumerate(criteria, 1))
                rubric = parse_rubric(text)
                if "rubrics" in kinds:
                    add("rubrics", partial(rubric_prompt, config, task, done), text, ends=True)
                    add("rubrics-act", partial(act_prompt, config, task, done, rubric), action)
                if "verdicts" in kinds:
                    wrong, feedback = self.wrong_action(task, steps, i, rng)
                    for candidate, why in ((step.action, ""), (wrong, feedback)):
                        score = round(sum(w for w, _, holds in criteria if holds(candidate)), 2)
                        verdict = json.dumps({"pass": score >= config.verify_threshold,
                                              "weighted_score": score, "feedback": why})
                        add("verdicts", partial(verifier_prompt, config, task, done, rubric, candidate), verdict,
                            ends=True)
                    add("verdicts-act", partial(act_prompt, config, task, done, rubric, (wrong, feedback)), action)
        lost = [k for k in kinds if too_long[k] and not made[k]]
        if lost:
            raise ValueError(f"toolqa demonstrations: no {lost[0]} prompt fits max_prompt_chars="
                             f"{config.max_prompt_chars}")
        return out

    def next_action_rubric(
        self, task: Task, steps: Sequence[Step], i: int
    ) -> list[tuple[float, str, Callable[[str], bool]]]:
        """A rubric for action ``i`` of the solution ``steps``: ``(weight, condition, check)`` per
        criterion, weights summing to 1; ``check(action)`` says whether an action meets it.

        Each criterion is checkable from the question and the steps before ``i`` alone (what the
        rubric generator sees); the solution's action meets all of them.
        """
        tool, arg = _call(steps[i].action)
        earlier = [_call(s.action) for s in steps[:i]]
        if tool == "search":
            searched = {a.lower() for t, a in earlier if t == "search"}
            names = {n.lower() for n in self.kb}
            return [
                (0.5, f"The action calls search with {arg}.", lambda a: _call(a) == ("search", arg)),
                (0.3, "The entity has not been searched before.",
                 lambda a: _call(a)[0] == "search" and _call(a)[1].lower() not in searched),
                (0.2, "The argument is only an entity name.",
                 lambda a: _call(a)[0] == "search" and _call(a)[1].lower() in names),
            ]
        if tool == "calculate":
            op = _OPERATOR[task.meta.get("kind", "sum2")]
            seen = {n for s in steps[:i] for n in re.findall(r"\d+", s.observation)}

            def calls(a: str) -> str | None:
                t, x = _call(a)
                return x.replace(" ", "") if t == "calculate" else None

            return [
                (0.5, f"The action calls calculate with {arg}.", lambda a: calls(a) == arg.replace(" ", "")),
                (0.3, "Every number in it was read from an observation.",
                 lambda a: calls(a) is not None and set(re.findall(r"\d+", calls(a) or "")) <= seen
                 and bool(re.findall(r"\d+", calls(a) or ""))),
                (0.2, f"The operator is {op}, as the question asks.",
                 lambda a: calls(a) is not None and set(re.findall(r"//|[-+*/%]", calls(a) or "")) == {op}),
            ]
        if tool == "answer":
            return [
                (0.6, f"The action calls answer with {arg}, the calculated result.",
                 lambda a: _call(a)[0] == "answer" and _answer_correct(_call(a)[1], arg)),
                (0.4, "The answer is a single number.",
                 lambda a: _call(a)[0] == "answer" and _number(_call(a)[1]) is not None),
            ]
        raise ValueError(f"toolqa task {task.id}: no rubric for a {tool or 'malformed'} step")

    def wrong_action(self, task: Task, steps: Sequence[Step], i: int, rng: random.Random) -> tuple[str, str]:
        """A plausible wrong action instead of action ``i`` of the solution ``steps``, and the
        feedback a verifier gives it (drawn with ``rng`` among the mistakes that fit the step)."""
        tool, arg = _call(steps[i].action)
        numbers = [n for s in steps[:i] for n in re.findall(r"\d+", s.observation)] or ["0"]
        options: list[tuple[str, str]] = []
        if tool == "search":
            named = {a for t, a in (_call(s.action) for s in steps) if t == "search"}
            others = sorted(n for n in self.kb if n not in named)
            options.append((f"search[{rng.choice(others)}]", f"Search {arg}, the entity the question still needs."))
            before = [a for t, a in (_call(s.action) for s in steps[:i]) if t == "search"]
            if before:
                again = rng.choice(before)
                options.append((f"search[{again}]", f"{again} was searched already; search {arg}."))
            options.append((f"answer[{rng.choice(numbers)}]", f"Do not answer yet: search {arg} first."))
        elif tool == "calculate":
            op = _OPERATOR[task.meta.get("kind", "sum2")]
            operands = re.findall(r"\d+", arg)
            spare = [n for n in numbers if n not in operands] or ["1"]
            options.append((f"calculate[{arg.replace(op, _WRONG_OPERATOR[op])}]",
                            f"Calculate {arg}: the question asks for {op}."))
            options.append((f"calculate[{arg.replace(operands[0], rng.choice(spare), 1)}]",
                            f"Calculate {arg} with the numbers the question asks for."))
            options.append((f"answer[{operands[0]}]", f"Do not answer yet: calculate {arg} first."))
        else:
            value = int(_number(arg) or 0)
            options.append((f"answer[{value + rng.choice([-1, 1]) * rng.randint(1, 99)}]",
                            f"Answer {arg}, the result of the calculation."))
            calc = next((a for t, a in (_call(s.action) for s in steps[:i]) if t == "calculate"), arg)
            options.append((f"calculate[{calc}]", f"The calculation is done: answer {arg}."))
        return rng.choice(options)


def _action_demonstrations(config: ReActConfig, task: Task, steps: Sequence[Step]) -> tuple[list[Demonstration], int]:
    """The plain act prompts of a solution with their actions, and how many prompts did not fit.

    When each step's act prompt is the first one plus the steps so far (unless ``max_prompt_chars``
    cuts a transcript), one demonstration holds the whole episode, the observations as context
    lines: before each action the model sees exactly the agent's prompt, in one sequence. Otherwise
    one demonstration per step whose prompt fits.
    """
    from treeplay.agents.base import step_segments, transcript
    from treeplay.agents.prompt_files import PromptTooLong
    from treeplay.agents.react import act_prompt

    prompts: list[str | None] = []
    for i in range(len(steps)):
        try:
            prompts.append(act_prompt(config, task, steps[:i]))
        except PromptTooLong:
            prompts.append(None)
    first = prompts[0]
    if first is not None and all(p == first + transcript("", steps[:i]) for i, p in enumerate(prompts)):
        segments = step_segments(steps)
        while segments and not segments[-1][1]:  # the last observation comes after the last action
            segments.pop()
        lines: list[str] = []
        context: list[int] = []
        for text, by_policy in segments:
            for line in text.splitlines(keepends=True):
                if not by_policy:
                    context.append(len(lines))
                lines.append(line)
        return [Demonstration(first, "".join(lines), context=tuple(context))], 0
    demos = [Demonstration(p, s.action + "\n") for p, s in zip(prompts, steps, strict=True) if p is not None]
    return demos, prompts.count(None)


def _answer_correct(text: str, gold: str | None) -> bool:
    got, want = _number(text), _number(gold or "")
    return got is not None and want is not None and got == want


# The operator a question kind asks for, and a wrong one a demonstration's mistake uses instead.
_OPERATOR = {"ratio": "//", "sum2": "+", "sum3": "+", "diff2": "-"}
_WRONG_OPERATOR = {"//": "*", "+": "-", "-": "+"}


def _call(action: str) -> tuple[str, str]:
    """(tool in lower case, argument stripped) of an action line, or ("", "") if it does not parse."""
    m = _ACTION.fullmatch(action.strip())
    return (m.group(1).lower(), m.group(2).strip()) if m else ("", "")
