"""Calls into user code (environments, tools) that may raise, hang or return garbage.

Every runner in ``agents`` goes through these so that a broken environment fails one trajectory
with its error recorded and never stops a run. Each guard returns ``(value, error)``: exactly one
of them is None.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from treeplay.agents.base import Environment, StepResult, Task, Trajectory

T = TypeVar("T")


def call_with_timeout(fn: Callable[[], T], timeout: float | None, what: str) -> tuple[T | None, str | None]:
    """Call ``fn``; return ``(result, None)``, or ``(None, error)`` if it raised or ran past ``timeout``.

    With a timeout the call runs in a daemon thread; a hung call cannot be killed, so its thread is
    abandoned (it never blocks interpreter exit). ``timeout=None`` calls ``fn`` directly.
    """
    if timeout is None:
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001 - user code: record, never propagate
            return None, f"{what} raised {type(e).__name__}: {e}"
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["err"] = e

    worker = threading.Thread(target=call, name=f"treeplay-guard-{what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return None, f"{what} timed out after {timeout:g}s"
    if "err" in box:
        e = box["err"]
        return None, f"{what} raised {type(e).__name__}: {e}"
    return box.get("out"), None


def checked_step_result(out: Any) -> tuple[StepResult | None, str | None]:
    """Validate what ``env.step`` returned: text observation, finite reward, bool-like done, dict info."""
    if not isinstance(out, StepResult):
        if not all(hasattr(out, a) for a in ("observation", "reward", "done")):
            return None, f"environment step returned {type(out).__name__}, not a StepResult"
        out = StepResult(out.observation, out.reward, out.done, getattr(out, "info", {}) or {})
    if not isinstance(out.observation, str):
        return None, f"environment returned a {type(out.observation).__name__} observation, not text"
    try:
        reward = float(out.reward)
    except (TypeError, ValueError):
        return None, f"environment returned a non-numeric reward {out.reward!r}"
    if not math.isfinite(reward):
        return None, f"environment returned a non-finite reward {reward}"
    info = out.info if isinstance(out.info, dict) else {"raw_info": repr(out.info)}
    return StepResult(out.observation, reward, bool(out.done), info), None


def safe_reset(env: Environment, task: Task, timeout: float | None) -> tuple[str | None, str | None]:
    """``env.reset(task)`` guarded; a non-text observation is an error."""
    out, err = call_with_timeout(lambda: env.reset(task), timeout, "environment reset")
    if err is None and not isinstance(out, str):
        return None, f"environment reset returned {type(out).__name__}, not text"
    return out, err


def safe_step(env: Environment, action: str, timeout: float | None) -> tuple[StepResult | None, str | None]:
    """``env.step(action)`` guarded and validated; an ``info["error"]`` from the env is an error too."""
    out, err = call_with_timeout(lambda: env.step(action), timeout, "environment step")
    if err is not None:
        return None, err
    result, err = checked_step_result(out)
    if result is not None and result.info.get("error") and result.done:
        return result, str(result.info["error"])
    return result, err


def safe_score(
    env: Environment, task: Task, traj: Trajectory, timeout: float | None
) -> tuple[float | None, str | None]:
    """``env.score(task, traj)`` guarded; must be a finite number."""
    out, err = call_with_timeout(lambda: env.score(task, traj), timeout, "environment score")
    if err is not None:
        return None, err
    try:
        value = float(out)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, f"environment score returned {out!r}, not a number"
    if not math.isfinite(value):
        return None, f"environment score returned a non-finite {value}"
    return value, None
