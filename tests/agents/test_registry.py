"""Registry: built-ins, dotted paths, entry points, and one-line errors."""

from __future__ import annotations

import pytest

from treeplay.agents.envs.arithmetic import ArithmeticEnv
from treeplay.agents.registry import (
    RegistryError,
    available_environments,
    environment_factory,
    list_environments,
    make_environment,
)


class NotAnEnv:
    name = "broken"

    def tasks(self, split, n, seed):
        return []


def test_builtins_and_dotted_path():
    envs = available_environments()
    assert envs["arithmetic"] == "treeplay.agents.envs.arithmetic:ArithmeticEnv"
    assert "toolqa" in envs
    assert {e.source for e in list_environments() if e.name == "arithmetic"} == {"built-in"}
    assert isinstance(make_environment("arithmetic", ops=2), ArithmeticEnv)
    env = make_environment("treeplay.agents.envs.arithmetic:ArithmeticEnv", digits=1)
    assert env.digits == 1
    make = environment_factory("arithmetic", ops=3)
    assert make() is not make() and make().ops == 3


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("no-such-env", "unknown environment 'no-such-env'"),
        ("nosuchmodule_xyz:Env", "cannot import module"),
        ("treeplay.agents.envs.arithmetic:Nope", "has no attribute"),
        (":Env", "bad dotted path"),
        ("tests.agents.test_registry:NotAnEnv", "missing reset, step, score"),
    ],
)
def test_errors_are_one_line(name, fragment):
    with pytest.raises(RegistryError) as e:
        make_environment(name)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_kwargs_are_reported():
    with pytest.raises(RegistryError, match="cannot make environment"):
        make_environment("arithmetic", colour="red")
