"""Find environments (and agent classes) by name: built-ins, dotted paths and entry points.

A name resolves in this order:

1. ``"package.module:Class"`` (anything with a colon): imported directly;
2. a built-in (``arithmetic``, ``toolqa``, ``dataset``);
3. an entry point in the ``treeplay.environments`` group of any installed distribution
   (``[project.entry-points."treeplay.environments"] maze = "mypkg.envs:Maze"``).

Built-ins win over entry points of the same name, so a third-party package cannot silently
replace them. Errors are one line and say what to fix::

    make_environment("arithmetic", ops=2)         # built-in
    make_environment("mypkg.envs:Maze", size=5)   # dotted path
    available_environments()                      # {"arithmetic": "treeplay.agents.envs.arithmetic:ArithmeticEnv", ...}

Agent classes (anything a config names to act) load the same way from the ``treeplay.agents``
group through ``load_agent_class``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from treeplay.agents.base import Environment

ENV_GROUP = "treeplay.environments"
AGENT_GROUP = "treeplay.agents"
BUILTIN_ENVIRONMENTS = {
    "arithmetic": "treeplay.agents.envs.arithmetic:ArithmeticEnv",
    "toolqa": "treeplay.agents.envs.toolqa:ToolQAEnv",
    "dataset": "treeplay.agents.envs.dataset:DatasetEnv",
}
ENV_METHODS = ("tasks", "reset", "step", "score")


class RegistryError(LookupError):
    """A name that does not resolve, a bad dotted path, or an object missing protocol methods."""


@dataclass(frozen=True)
class EnvironmentEntry:
    """One environment that can be made by name.

    Attributes:
        name: What to pass to ``make_environment``.
        target: ``"module:Class"``.
        source: ``"built-in"`` or ``"entry point (<distribution>)"``.
    """

    name: str
    target: str
    source: str


def _entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=group))


def load_object(target: str) -> Any:
    """Import ``"package.module:Attr"`` (``Attr`` may be dotted) and return the object."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(f"bad dotted path {target!r}: expected 'package.module:Class'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RegistryError(f"cannot import module {module_name!r} for {target!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise RegistryError(f"module {module_name!r} has no attribute {attr!r} (from {target!r})") from e
    return obj


def list_environments() -> list[EnvironmentEntry]:
    """Every environment known by name, built-ins first, then entry points sorted by name."""
    entries = {n: EnvironmentEntry(n, t, "built-in") for n, t in BUILTIN_ENVIRONMENTS.items()}
    for ep in sorted(_entry_points(ENV_GROUP), key=lambda e: e.name):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        if ep.name in entries:
            continue  # built-ins win; the project's own pyproject declares them too
        entries[ep.name] = EnvironmentEntry(ep.name, ep.value, f"entry point ({dist})")
    return list(entries.values())


def available_environments() -> dict[str, str]:
    """Map of environment name to ``"module:Class"``; ``list_environments`` also says where from."""
    return {e.name: e.target for e in list_environments()}


def _resolve_target(name: str, builtins: dict[str, str], group: str, kind: str) -> str:
    if ":" in name:
        return name
    if name in builtins:
        return builtins[name]
    for ep in _entry_points(group):
        if ep.name == name:
            return ep.value
    known = sorted(set(builtins) | {ep.name for ep in _entry_points(group)})
    raise RegistryError(
        f"unknown {kind} {name!r}: known names are {', '.join(known) or '(none)'}; "
        f"or pass a dotted path 'package.module:Class'"
    )


def missing_methods(obj: Any, methods: tuple[str, ...] = ENV_METHODS) -> list[str]:
    """Names in ``methods`` that ``obj`` (class or instance) lacks or has as non-callables."""
    return [m for m in methods if not callable(getattr(obj, m, None))]


def load_environment_class(name: str) -> Callable[..., Environment]:
    """The class (or factory) an environment name resolves to, checked for the protocol methods."""
    target = _resolve_target(name, BUILTIN_ENVIRONMENTS, ENV_GROUP, "environment")
    obj = load_object(target)
    if not callable(obj):
        raise RegistryError(f"{target!r} is not a class or factory (got {type(obj).__name__})")
    if isinstance(obj, type):
        missing = missing_methods(obj)
        if missing:
            raise RegistryError(
                f"{target!r} does not implement the Environment protocol: missing {', '.join(missing)}"
            )
    return obj


def make_environment(name: str, **kwargs: Any) -> Environment:
    """Make an environment by built-in name, dotted path or entry-point name.

    Args:
        name: ``"arithmetic"``, ``"mypkg.envs:Maze"``, or an entry-point name.
        **kwargs: Passed to the class (difficulty knobs and so on).

    Raises:
        RegistryError: Unknown name, bad path, a constructor that raised (the message is one line),
            or an object without the protocol's methods.
    """
    cls = load_environment_class(name)
    try:
        env = cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - a plug-in's constructor may raise anything; say which one
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, TypeError | ValueError):
            why = f"{type(e).__name__}: {why}"
        raise RegistryError(f"cannot make environment {name!r} with {kwargs}: {why}") from e
    missing = missing_methods(env) + ([] if isinstance(getattr(env, "name", None), str) else ["name"])
    if missing:
        raise RegistryError(
            f"{name!r} made an object that is not an Environment: missing {', '.join(missing)}"
        )
    return env


def environment_factory(name: str, **kwargs: Any) -> Callable[[], Environment]:
    """A zero-argument function that makes fresh instances (one per concurrent episode)."""
    load_environment_class(name)  # fail early on a bad name
    return lambda: make_environment(name, **kwargs)


def load_agent_class(name: str) -> Any:
    """An agent class by dotted path or ``treeplay.agents`` entry-point name."""
    return load_object(_resolve_target(name, {}, AGENT_GROUP, "agent"))
