"""Prompts are data: text and YAML files in ``agents/prompts/``, filled by name.

    template = load_prompt("rubric_verifier.txt")
    text = fill(template, rubric=..., context=..., action=..., threshold="0.6")

``fill`` replaces ``{name}`` placeholders only for the names given, so templates may contain other
braces (JSON examples) untouched.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

import yaml


@cache
def load_prompt(name: str) -> str:
    """The text of ``agents/prompts/<name>``."""
    return (files("agents") / "prompts" / name).read_text(encoding="utf-8")


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
