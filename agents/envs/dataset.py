"""Questions and answers from a JSONL file: the environment for training on your own data.

Each non-blank line of the file is one JSON object::

    {"question": "Tom has 3 bags of 24 apples. How many apples?", "answer": "72",
     "solution": "3 bags of 24 apples is 3*24 = 72 apples.", "id": "q1", "split": "train"}

``question`` (non-empty text) and ``answer`` (text or a number) are required; ``id`` (text or an
integer; default: a hash of the question), ``solution`` (a worked solution, used for the supervised
warm start) and ``split`` (``train``, ``validation`` or ``test``) are optional, other keys are
ignored. The whole file is read and checked when the environment is made, so a bad line stops a run
before anything is recorded; the error names the file, the line and what is wrong.

Episodes: the policy writes its reasoning one line per action; the episode ends at the first *answer
line* (``match="boxed"``: a line holding a complete ``\\boxed{...}``; otherwise a line starting with
``answer_prefix``, ``Answer:`` by default), which earns the reward, or with reward 0 after
``max_steps`` lines without one. Rewards come from ``match``:

- ``boxed``: the content of the last ``\\boxed{...}`` (nested braces allowed) equals the answer;
- ``last_number``: the last number after the answer prefix equals the answer's last number
  numerically, thousands separators removed (``1,000`` equals ``1000.0``);
- ``exact``: the text after the answer prefix equals the answer once both are normalised (stripped,
  case-folded, runs of whitespace made one space, a trailing period dropped).

``boxed`` compares like ``exact``, and numerically when both sides are plain numbers. Or
``reward="mypkg.module:fn"`` names a function ``fn(question, answer, response) -> float`` (imported,
never evaluated as text) that scores the response: every line up to and including the answer line.

Splits: a line's ``split`` field when it has one; otherwise a hash of its id, salted with
``split_seed``, puts it in ``test`` (``test_fraction``), ``validation`` (``validation_fraction``)
or ``train``. A line's split depends on its own id only, so appending lines never moves old ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any

from treeplay.agents.base import StepResult, Task, Trajectory
from treeplay.agents.envs.arithmetic import split_of_bucket

SPLITS = ("train", "validation", "test")
MATCH_MODES = ("boxed", "last_number", "exact")
DEFAULT_INSTRUCTIONS = {
    "boxed": "Solve it step by step, one step per line; write the final answer as \\boxed{answer}.",
    "prefix": "Solve it step by step, one step per line; end with the line '{prefix} <answer>'.",
}
# A number as people write it: optional sign, digits with or without thousands separators, decimals.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_BOXED = re.compile(r"\\boxed\s*\{")
_SPACES = re.compile(r"\s+")


class DatasetError(ValueError):
    """A dataset file, line or setting that cannot be used (one line: file, line number, reason)."""


# -- verifiers: pure functions of untrusted text ---------------------------------------------------


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` in ``text`` (nested braces kept), or None.

    One pass with a stack of open braces, so text full of unclosed ``\\boxed{`` stays linear.
    """
    starts = {m.end() - 1: m.end() for m in _BOXED.finditer(text)}  # its "{" -> where the content starts
    stack: list[int | None] = []
    best: tuple[int, int] | None = None
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(starts.get(i))
        elif ch == "}" and stack:
            start = stack.pop()
            if start is not None and (best is None or start > best[0]):
                best = (start, i)
    return None if best is None else text[best[0]:best[1]]


def last_number(text: str) -> Decimal | None:
    """The last number in ``text`` with thousands separators removed, or None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None


def normalise(text: str) -> str:
    """Text as the ``exact`` match compares it: stripped, case-folded, one space per run of
    whitespace, without a trailing period."""
    out = _SPACES.sub(" ", text.strip().casefold())
    return out[:-1].rstrip() if out.endswith(".") else out


def _plain_number(text: str) -> Decimal | None:
    """``text`` as a number if it is nothing but one number (``1,000``, ``-2.5``), else None."""
    t = text.strip()
    return last_number(t) if _NUMBER.fullmatch(t) else None


def same_answer(got: str, gold: str) -> bool:
    """Normalised text equality, or numeric equality when both are plain numbers."""
    a, b = _plain_number(got), _plain_number(gold)
    if a is not None and b is not None:
        return a == b
    return normalise(got) == normalise(gold)


# -- reading the file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One checked line of the file."""

    line: int
    id: str
    question: str
    answer: str
    solution: str | None
    split: str


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _text_or_number(value: Any) -> str | None:
    """``value`` as answer text when it is a string or a (non-boolean) number, else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _carve(row_id: str, split_seed: int, test_fraction: float, validation_fraction: float) -> str:
    digest = hashlib.sha256(f"{split_seed}|{row_id}".encode()).digest()
    return split_of_bucket(int.from_bytes(digest[:8], "big") / 2**64, test_fraction, validation_fraction)


@lru_cache(maxsize=8)
def _read_rows(path: str, _mtime_ns: int, _size: int, split_seed: int, test_fraction: float,
               validation_fraction: float) -> tuple[Row, ...]:
    """Every line of ``path`` checked, in file order (cached: runs make one instance per episode;
    the modification time and size are in the key so an edited file is read again)."""
    rows: list[Row] = []
    first_line_of: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue

            def bad(why: str, number: int = number) -> DatasetError:
                return DatasetError(f"{path}:{number}: {why}")

            try:
                obj = json.loads(raw, parse_constant=_reject_constant)
            except json.JSONDecodeError as e:
                raise bad(f"not JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:  # NaN or Infinity, which JSON does not have
                raise bad(f"not JSON ({e})") from None
            if not isinstance(obj, dict):
                raise bad(f"expected a JSON object with 'question' and 'answer', got {type(obj).__name__}")
            question = obj.get("question")
            if "question" not in obj:
                raise bad("missing 'question'")
            if not isinstance(question, str) or not question.strip():
                raise bad("'question' must be non-empty text")
            if "answer" not in obj:
                raise bad("missing 'answer'")
            answer = _text_or_number(obj["answer"])
            if answer is None or not answer.strip():
                raise bad(f"'answer' must be non-empty text or a number, got {json.dumps(obj['answer'])[:40]}")
            solution = obj.get("solution")
            if solution is not None and not isinstance(solution, str):
                raise bad(f"'solution' must be text, got {type(solution).__name__}")
            if "id" in obj:
                given = obj["id"]
                if not (isinstance(given, str) and given.strip()) and not (
                    isinstance(given, int) and not isinstance(given, bool)
                ):
                    raise bad(f"'id' must be non-empty text or an integer, got {json.dumps(given)[:40]}")
                row_id = str(given)
            else:
                row_id = hashlib.sha256(question.strip().encode()).hexdigest()[:16]
            if row_id in first_line_of:
                what = f"duplicate id {row_id!r}" if "id" in obj else "duplicate question (no 'id' given)"
                raise bad(f"{what}, first on line {first_line_of[row_id]}")
            first_line_of[row_id] = number
            split = obj.get("split")
            if split is None:
                split = _carve(row_id, split_seed, test_fraction, validation_fraction)
            elif split not in SPLITS:
                raise bad(f"unknown split {json.dumps(split)[:40]}: use one of {', '.join(SPLITS)}")
            rows.append(Row(number, row_id, question.strip(), answer.strip(), solution, split))
    if not rows:
        raise DatasetError(f"{path}: empty file: no JSON lines")
    return tuple(rows)


def is_answer_line(line: str, match: str, answer_prefix: str) -> bool:
    """Whether ``line`` ends an episode: a complete ``\\boxed{...}`` for ``boxed``, else a line that
    starts with ``answer_prefix`` (case-insensitive)."""
    if match == "boxed":
        return last_boxed(line) is not None
    return line.strip().casefold().startswith(answer_prefix.casefold())


def verdict(line: str, gold: str, match: str, answer_prefix: str) -> bool:
    """Whether the answer line ``line`` gives ``gold`` under the built-in verifier ``match``."""
    if match == "boxed":
        got = last_boxed(line)
        return got is not None and same_answer(got, last_boxed(gold) or gold)
    given = line.strip()[len(answer_prefix):]
    if match == "exact":
        return normalise(given) == normalise(gold)
    a, b = last_number(given), last_number(gold)
    return a is not None and b is not None and a == b


def answer_line(answer: str, match: str, answer_prefix: str) -> str:
    """The line that gives ``answer`` the way ``match`` reads answers."""
    return f"\\boxed{{{answer}}}" if match == "boxed" else f"{answer_prefix} {answer}"


def _reference(path: str, row: Row, match: str, answer_prefix: str, custom_reward: bool) -> str:
    """The warm-start completion of ``row``: its solution's non-blank lines, ending in an answer
    line (added when the solution has none), or the answer line alone.

    Raises:
        DatasetError: The solution gives an answer before its last line (the episode would end
            there), or, with a built-in verifier, a wrong one.
    """
    lines = [s.strip() for s in (row.solution or "").splitlines() if s.strip()]
    ends = [i for i, s in enumerate(lines) if is_answer_line(s, match, answer_prefix)]
    if not ends:
        lines.append(answer_line(row.answer, match, answer_prefix))
    elif ends[0] != len(lines) - 1:
        raise DatasetError(f"{path}:{row.line}: 'solution' gives its answer on solution line "
                           f"{ends[0] + 1} of {len(lines)}; the answer line must be the last")
    elif not custom_reward and not verdict(lines[-1], row.answer, match, answer_prefix):
        raise DatasetError(f"{path}:{row.line}: 'solution' ends in {lines[-1][:60]!r}, which "
                           f"does not match the answer {row.answer!r} (match={match})")
    return "".join(s + "\n" for s in lines)


@lru_cache(maxsize=8)
def _prepare(path: str, mtime_ns: int, size: int, split_seed: int, test_fraction: float,
             validation_fraction: float, match: str, answer_prefix: str, custom_reward: bool,
             ) -> tuple[tuple[Row, ...], dict[str, str], dict[str, list[Row]]]:
    """The checked rows, each row's reference by id, and the rows of each split (cached, like
    ``_read_rows``: a run makes one environment per episode)."""
    rows = _read_rows(path, mtime_ns, size, split_seed, test_fraction, validation_fraction)
    references = {r.id: _reference(path, r, match, answer_prefix, custom_reward) for r in rows}
    return rows, references, {s: [r for r in rows if r.split == s] for s in SPLITS}


@lru_cache(maxsize=4)
def _chat_wrapper(model_dir: str) -> tuple[str, str] | None:
    """(text before, text after) a user message in ``model_dir``'s chat template with the assistant's
    turn opened, or None when its tokenizer has no template. A BOS token the template writes is
    dropped when the tokenizer adds one to every text itself (engines tokenize prompts that way)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tok, "chat_template", None):
        return None
    marker = "\x00QUESTION\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                   add_generation_prompt=True)
    if not isinstance(text, str) or text.count(marker) != 1:
        return None
    bos = tok.bos_token
    if bos and text.startswith(bos):
        ids = tok("x", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tok.bos_token_id:
            text = text[len(bos):]
    before, after = text.split(marker)
    return before, after


# -- the environment -------------------------------------------------------------------------------


class DatasetEnv:
    """Question/answer pairs from a JSONL file, answered in lines of reasoning and checked by a verifier.

    Args:
        path: The JSONL file (see the module docstring for its lines).
        match: The verifier: ``"boxed"``, ``"last_number"`` or ``"exact"``. With ``reward`` it only
            says what an answer line is.
        reward: ``"package.module:function"``: ``function(question, answer, response) -> float``
            replaces the verifier's 1.0/0.0.
        answer_prefix: How an answer line starts for ``last_number`` and ``exact``.
        instruction: A line put after each question (``{prefix}`` stands for ``answer_prefix``);
            None: a default for the match mode; ``""``: none.
        chat_model: A local Hugging Face model (or tokenizer) directory, normally ``model.path``: when
            its tokenizer has a chat template, each prompt is the question (and instruction) as one
            user message with the assistant's turn opened; without a template, the plain prompt.
        max_steps: Lines without an answer line after which the episode ends with reward 0.
        split_seed: Salt of the hash that assigns lines without a ``split`` field.
        test_fraction: Share of those lines in the test split.
        validation_fraction: Share of those lines in the validation split.
        name: Environment name recorded on tasks.
    """

    def __init__(
        self,
        path: str,
        match: str = "last_number",
        reward: str | None = None,
        answer_prefix: str = "Answer:",
        instruction: str | None = None,
        chat_model: str | None = None,
        max_steps: int = 32,
        split_seed: int = 0,
        test_fraction: float = 0.1,
        validation_fraction: float = 0.1,
        name: str = "dataset",
    ) -> None:
        if match not in MATCH_MODES:
            raise DatasetError(f"match must be one of {', '.join(MATCH_MODES)}, got {match!r}")
        if match != "boxed" and not answer_prefix.strip():
            raise DatasetError(f"answer_prefix must be non-empty text for match={match!r}")
        if max_steps < 1:
            raise DatasetError(f"max_steps must be >= 1, got {max_steps}")
        if not 0.0 <= test_fraction < 1.0 or not 0.0 <= validation_fraction < 1.0 - test_fraction:
            raise DatasetError(
                f"need 0 <= test_fraction < 1 and 0 <= validation_fraction < 1 - test_fraction, "
                f"got test_fraction={test_fraction}, validation_fraction={validation_fraction}"
            )
        file = Path(path).expanduser()
        if not file.is_file():
            raise DatasetError(f"dataset file {str(file)!r} does not exist or is not a file")
        self.path = str(file.resolve())
        self.match = match
        self.answer_prefix = answer_prefix.strip()
        self.max_steps = max_steps
        self.name = name
        self.reward_fn: Callable[[str, str, str], Any] | None = _load_reward(reward) if reward else None
        self.reward = reward
        if instruction is None:
            instruction = DEFAULT_INSTRUCTIONS["boxed" if match == "boxed" else "prefix"]
        self.instruction = instruction.replace("{prefix}", self.answer_prefix)
        self._wrapper = _chat_wrapper(str(Path(chat_model).expanduser())) if chat_model else None
        stat = os.stat(self.path)
        self.rows, self._references, self._by_split = _prepare(
            self.path, stat.st_mtime_ns, stat.st_size, split_seed, test_fraction, validation_fraction,
            match, self.answer_prefix, self.reward_fn is not None)
        self._task: Task | None = None
        self._lines: list[str] = []

    # -- tasks ---------------------------------------------------------------------------------

    def answer_line(self, answer: str) -> str:
        """The line that gives ``answer`` the way this environment reads answers."""
        return answer_line(answer, self.match, self.answer_prefix)

    def _prompt(self, question: str) -> str:
        body = question + ("\n" + self.instruction if self.instruction else "")
        if self._wrapper is not None:
            before, after = self._wrapper
            return before + body + after
        return body + "\n"

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        """``n`` tasks of ``split`` in a seeded order, a pure function of the arguments and the file.

        Each pass over the split is a fresh shuffle; when ``n`` exceeds the split's size the tasks
        repeat (ids ``<id>#2``, ``<id>#3``, ...) so that every line appears equally often.

        Raises:
            ValueError: An unknown split, or a split the file has no lines of.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; DatasetEnv has {SPLITS}")
        pool = self._by_split[split]
        if not pool and n > 0:
            raise DatasetError(f"{self.path}: no lines in the {split!r} split (give lines \"split\": "
                               f"\"{split}\" or change the split fractions)")
        rng = random.Random(f"dataset|{split}|{seed}")
        out: list[Task] = []
        rounds = 0
        while len(out) < n:
            rounds += 1
            order = list(pool)
            rng.shuffle(order)
            for row in order[: n - len(out)]:
                out.append(Task(
                    id=row.id if rounds == 1 else f"{row.id}#{rounds}",
                    prompt=self._prompt(row.question),
                    answer=row.answer,
                    reference=self._references[row.id],
                    env=self.name,
                    split=split,
                    meta={"question": row.question, "line": row.line},
                ))
        return out

    def demonstrations(self, tasks: Sequence[Task]) -> list[tuple[str, str]]:
        """(prompt, completion) pairs for a supervised warm start: the completion is the reference
        (the solution's lines and the answer line, or the answer line alone)."""
        return [(t.prompt, t.reference or self.answer_line(t.answer or "")) for t in tasks]

    # -- episodes ------------------------------------------------------------------------------

    def _is_answer_line(self, line: str) -> bool:
        return is_answer_line(line, self.match, self.answer_prefix)

    def _score_response(self, task: Task, lines: Sequence[str]) -> tuple[float, dict[str, Any]]:
        """Reward and info of a response that ended in an answer line (its last line)."""
        if self.reward_fn is None:
            ok = verdict(lines[-1], task.answer or "", self.match, self.answer_prefix)
            return (1.0 if ok else 0.0), {"correct": ok}
        question = str(task.meta.get("question", task.prompt))
        value = self.reward_fn(question, task.answer or "", "\n".join(lines))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DatasetError(f"reward function {self.reward!r} returned {value!r}, not a finite number")
        return float(value), {}

    def reset(self, task: Task) -> str:
        """Start an episode on ``task``; the observation is the prompt."""
        self._task = task
        self._lines = []
        return task.prompt

    def step(self, action: str) -> StepResult:
        """One line of reasoning. The episode ends at an answer line (rewarded) or after
        ``max_steps`` lines (reward 0). Never raises on the policy's text; a reward function that
        fails ends the episode with ``info["error"]``."""
        if self._task is None:
            raise RuntimeError("DatasetEnv.step called before reset")
        if self._lines and (len(self._lines) >= self.max_steps or self._is_answer_line(self._lines[-1])):
            return StepResult("", 0.0, True, {"error": "episode is over"})
        line = str(action).split("\n", 1)[0].strip()
        self._lines.append(line)
        if self._is_answer_line(line):
            try:
                reward, info = self._score_response(self._task, self._lines)
            except Exception as e:  # noqa: BLE001 - user code: record it on the trajectory, keep the run
                return StepResult("", 0.0, True, {"error": f"{type(e).__name__}: {str(e)[:200]}"})
            return StepResult("", reward, True, info)
        if len(self._lines) >= self.max_steps:
            return StepResult("", 0.0, True, {"correct": False, "no_answer": True})
        return StepResult("", 0.0, False, {})

    def _outcome(self, task: Task, actions: Sequence[str]) -> float:
        lines: list[str] = []
        for action in actions[: self.max_steps]:
            lines.append(str(action).split("\n", 1)[0].strip())
            if self._is_answer_line(lines[-1]):
                return self._score_response(task, lines)[0]
        return 0.0

    def score(self, task: Task, trajectory: Trajectory) -> float:
        """The reward of the trajectory's first answer line (0.0 without one)."""
        return self._outcome(task, trajectory.actions)

    def verify(self, task: Task, completion: str) -> bool:
        """Whether a whole completion (lines of reasoning) reaches an answer line that earns 1.0."""
        return self._outcome(task, [s for s in completion.splitlines() if s.strip()]) >= 1.0


def _load_reward(target: str) -> Callable[[str, str, str], Any]:
    """The function ``"package.module:function"`` names (imported with importlib, never evaluated)."""
    from treeplay.agents.registry import RegistryError, load_object

    try:
        fn = load_object(target)
    except RegistryError as e:
        raise DatasetError(f"reward: {e}") from None
    if not callable(fn):
        raise DatasetError(f"reward {target!r} is not a function (got {type(fn).__name__})")
    return fn
