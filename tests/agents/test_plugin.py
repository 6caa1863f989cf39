"""The documented plug-in example loads by dotted path and by entry point and completes an episode."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from treeplay.agents.episode import run_episode
from treeplay.agents.multi import Agent, run_multi_agent_episodes
from treeplay.agents.registry import available_environments, list_environments, make_environment
from treeplay.agents.scripted import ScriptedPolicy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "tests" / "helpers" / "plugin_example" / "countdown_env.py"


@pytest.fixture
def plugin_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    yield


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch, plugin_path):
    """A distribution 'countdown-plugin' whose entry point names the example environment."""
    info = tmp_path / "countdown_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: countdown-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[treeplay.environments]\ncountdown = countdown_env:CountdownEnv\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    importlib.invalidate_caches()


def counting_policy() -> ScriptedPolicy:
    """Writes the number one below the last line it sees."""
    return ScriptedPolicy(lambda prompt, rng: f"{int(prompt.strip().splitlines()[-1]) - 1}\n")


def test_docs_show_the_example_file_verbatim():
    doc = (ROOT / "docs" / "environments.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.DOTALL)
    assert EXAMPLE.read_text() in blocks


def test_example_by_dotted_path_completes_an_episode(plugin_path):
    env = make_environment("countdown_env:CountdownEnv", max_start=6)
    train, test = env.tasks("train", 20, seed=0), env.tasks("test", 20, seed=0)
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    traj = run_episode(env, counting_policy(), train[0], max_steps=10)
    assert traj.status == "ok" and traj.outcome == 1.0 and traj.info["stop_reason"] == "done"
    multi = run_multi_agent_episodes(
        lambda: make_environment("countdown_env:CountdownEnv"),
        [Agent("a", counting_policy()), Agent("b", ScriptedPolicy(lambda p, r: "oops\n"))],
        train[:2],
    )
    assert [t.outcome for t in multi] == [1.0, 1.0]


def test_example_by_entry_point(fake_distribution):
    assert available_environments()["countdown"] == "countdown_env:CountdownEnv"
    [entry] = [e for e in list_environments() if e.name == "countdown"]
    assert entry.source == "entry point (countdown-plugin)"
    env = make_environment("countdown")
    task = env.tasks("train", 1, seed=1)[0]
    assert run_episode(env, counting_policy(), task).outcome == 1.0


def test_cli_envs_list(fake_distribution):
    from treeplay.orchestrator.cli import app

    result = CliRunner().invoke(app, ["envs", "list"])
    assert result.exit_code == 0, result.output
    for word in ("arithmetic", "toolqa", "countdown", "built-in", "countdown-plugin"):
        assert word in result.output
