"""Prompts are data: text and YAML files in a package's ``prompts/`` folder, loaded and filled by name.

    template = load_prompt("rubric_verifier.txt")
    text = fill(template, rubric=..., context=..., action=..., threshold="0.6")

``load_prompt`` is the one loader of the project's prompt files: the agents' live in
``agents/prompts/`` (the default), MCTS's self-evaluation prompts in ``search/prompts/``
(``load_prompt("self_eval.txt", "treeplay.search")``) and the SLHF follower's in
``learners/prompts/``. It reads them as package resources, so they are found in an
installed wheel as well as in a checkout. This module imports nothing from the project, so search
may use it as well as agents and the orchestrator.

``fill`` replaces ``{name}`` placeholders only for the names given, so templates may contain other
braces (JSON examples) untouched.

Prompts under a length limit (``max_prompt_chars``, for small models) are built from parts with
``fill_fit`` / ``fit``: the instructions, the question, a rubric, a candidate are fixed parts and
are never shortened; only a part wrapped in ``Cut`` (a transcript of earlier steps) may lose its
middle, which is replaced by a visible marker ``[... N characters cut ...]`` on its own line, so
both the first steps and the most recent ones stay. If the fixed parts alone (with the marker) do
not fit, ``PromptTooLong`` says so and the caller records that episode or judgment as failed
instead of running the model on a mangled prompt.

    text = fill_fit(load_prompt("rubric_generator.txt"), 1500, "rubric generator prompt",
                    question=q, trajectory=Cut(steps_text), tools=t, phase_hint=h)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

import yaml


@cache
def load_prompt(name: str, package: str = "treeplay.agents") -> str:
    """The text of ``<package>/prompts/<name>`` (``package`` a dotted package name), read as UTF-8."""
    return (files(package) / "prompts" / name).read_text(encoding="utf-8")


@cache
def load_prompt_yaml(name: str) -> dict[str, Any]:
    """A YAML prompt file of ``agents/prompts/`` as a dict."""
    data = yaml.safe_load(load_prompt(name))
    if not isinstance(data, dict):
        raise ValueError(f"prompt file {name} must hold a mapping")
    return data


def fill(template: str, **values: Any) -> str:
    """Replace ``{key}`` by ``str(value)`` for each keyword; other braces are left alone."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", str(value))
    return template


@dataclass(frozen=True)
class Cut:
    """Prompt text whose middle may be cut to meet a length limit (a transcript of earlier steps)."""

    text: str


# A part of a prompt: fixed text, cuttable text, or a sequence of those (one placeholder's value).
Part = str | Cut | Sequence[str | Cut]


class PromptTooLong(ValueError):
    """The fixed parts of a prompt do not fit its character limit."""


def cut_marker(n: int) -> str:
    """The line that replaces ``n`` cut characters."""
    return f"\n[... {n} characters cut ...]\n"


def _flatten(part: Part) -> list[str | Cut]:
    if isinstance(part, (str, Cut)):
        return [part]
    return [p for sub in part for p in _flatten(sub)]


def fit(parts: Sequence[Part], limit: int | None, what: str = "prompt") -> str:
    """Join ``parts`` into a prompt of at most ``limit`` characters (None: no limit).

    Only the text of the (at most one) ``Cut`` part is shortened: at most its first third and last
    two thirds of the room left by the fixed parts are kept around ``cut_marker``, cut at line ends
    where possible -- the recent end of a transcript matters most to what comes next, its start
    anchors what the task was.

    Raises:
        PromptTooLong: the fixed parts and the marker need more than ``limit`` characters.
        ValueError: more than one ``Cut`` part.
    """
    flat = [p for part in parts for p in _flatten(part)]
    cuts = [i for i, p in enumerate(flat) if isinstance(p, Cut)]
    if len(cuts) > 1:
        raise ValueError(f"{what}: at most one Cut part per prompt, got {len(cuts)}")
    texts = [p.text if isinstance(p, Cut) else p for p in flat]
    total = sum(len(t) for t in texts)
    if limit is None or total <= limit:
        return "".join(texts)
    fixed = total - sum(len(texts[i]) for i in cuts)
    if not cuts or fixed > limit:
        raise PromptTooLong(
            f"{what} does not fit: its instructions and other fixed parts take {fixed} characters, "
            f"more than max_prompt_chars={limit}"
        )
    i = cuts[0]
    body = texts[i]
    room = limit - fixed - len(cut_marker(len(body)))
    if room < 0:
        raise PromptTooLong(
            f"{what} does not fit: its instructions and other fixed parts take {fixed} characters, "
            f"the cut marker {len(cut_marker(len(body)))} more, more than max_prompt_chars={limit}"
        )
    head = body[: room // 3]
    tail = body[len(body) - (room - len(head)) :] if room > len(head) else ""
    # Cut at line ends where the kept pieces have one, so no half step is shown.
    if "\n" in head:
        head = head[: head.rfind("\n")]
    if "\n" in tail[:-1]:
        tail = tail[tail.find("\n") + 1 :]
    texts[i] = head + cut_marker(len(body) - len(head) - len(tail)) + tail
    return "".join(texts)


def fill_fit(template: str, limit: int | None, what: str = "prompt", **values: Part) -> str:
    """``fill`` that keeps the result within ``limit`` characters by ``fit`` (see there).

    Each value is fixed text, a ``Cut``, or a sequence of those; the template's own text is fixed.
    Placeholders are replaced in one pass, so a value that contains ``{name}`` stays as it is.
    """
    if not values:
        return fit([template], limit, what)
    pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in values) + r")\}")
    parts: list[Part] = []
    pos = 0
    for m in pattern.finditer(template):
        parts.append(template[pos : m.start()])
        value = values[m.group(1)]
        parts.append(value if isinstance(value, (str, Cut, list, tuple)) else str(value))
        pos = m.end()
    parts.append(template[pos:])
    return fit(parts, limit, what)
