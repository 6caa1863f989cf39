"""The settings of ``rollout.mode: agent`` (pydantic only: loading a run config imports no server)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class AgentConfig(BaseModel):
    """``rollout.mode: agent``: which agent program runs, and how its episodes are searched."""

    model_config = ConfigDict(extra="forbid")

    entry: str = Field(..., description="The agent program, 'package.module:function'; called as "
                       "fn(task, base_url) (sync or async), it returns its final answer.")
    search: Literal["sample", "tree"] = Field("tree", description="sample: independent episodes per task; "
                                              "tree: re-run the agent with a replay table to branch at chosen calls.")
    episodes: int = Field(8, ge=1, description="Episodes per task (the whole budget, tree mode included).")
    width: int = Field(2, ge=2, description="Tree mode: children sampled at each expanded call.")
    c_uct: float = Field(1.0, ge=0, description="Tree mode: exploration weight of the UCT selection.")
    max_calls: int = Field(16, ge=1, description="Calls one episode may make; more are refused.")
    template: Literal["model", "plain"] = Field(
        "model", description="How chat requests become a prompt: 'model': the tokenizer's chat template; "
        "'plain': the messages' contents joined as they are (a base model without a chat format).")
    max_tokens: int = Field(128, ge=1, description="Tokens per call when the client names none.")
    concurrency: int = Field(16, ge=1, description="Episodes running at once (their calls are batched).")
    reward: str | None = Field(None, description="'package.module:function' scoring fn(task, answer) -> float; "
                               "default: a reward the agent posted, else the environment's verifier.")
    success: float = Field(1.0, description="A reward at least this marks an episode correct.")
    min_margin: float = Field(0.0, ge=0, description="Tree mode: smallest Q gap of a step pair.")
    max_pairs: int = Field(8, ge=0, description="Sample mode: most correct-vs-wrong pairs per task.")
    episode_timeout_s: float = Field(300.0, gt=0, description="An episode running longer is marked failed.")


def load_callable(path: str, what: str) -> Callable[..., Any]:
    """``package.module:function`` imported (never evaluated); one-line ValueError if it is not there."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{what} must look like 'package.module:function', got {path!r}")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{what} {path!r}: cannot import {module!r} ({e})") from None
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{what} {path!r}: {module!r} has no {name!r}")
    if not callable(obj):
        raise ValueError(f"{what} {path!r} is not callable")
    return obj
