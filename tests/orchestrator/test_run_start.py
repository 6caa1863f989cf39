"""Starting a run by following the docs: the traps a newcomer writing a plug-in met, one test each.

- a plug-in environment named without ``kwargs`` gets no constructor arguments (it inherited the
  arithmetic environment's and failed on them);
- a constructor that rejects its ``kwargs`` is one ``error:`` line with exit status 2, and the store
  holds no run afterwards (the failed start used to stay "running" for ever);
- a run that fails after it was recorded is "failed" with the reason, and ``treeplay status`` says so;
- starting the loop prints no Ray error about actor constructor arguments in the object store;
- a warm start under a plain stderr (CI, ``| tee``) prints where it is every few seconds.

Real parts throughout: the documented example plug-in, SQLite stores, a tiny model, local Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from treeplay.agents.registry import make_environment
from treeplay.orchestrator.cli import app
from treeplay.orchestrator.config import config_from_dict, load_config
from treeplay.store import queries
from treeplay.store.database import open_store

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = ROOT / "tests" / "helpers" / "plugin_example"


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The documented example plug-in, and one whose test split is broken, importable by dotted path."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "broken_env.py").write_text(textwrap.dedent('''
        from countdown_env import CountdownEnv


        class BrokenTestSplit(CountdownEnv):
            """Fine until the loop asks for held-out tasks."""

            def tasks(self, split, n, seed):
                if split == "test":
                    raise RuntimeError("the test split is not ready\\nsecond line")
                return super().tasks(split, n, seed)


        class NoDemonstrations(CountdownEnv):
            """Nothing to warm-start a fresh model on."""

            demonstrations = None
    '''))
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _write_config(tmp_path: Path, env: dict, **extra) -> tuple[Path, str]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = {"name": "newcomer", "output_dir": str(tmp_path / "runs"), "store": {"url": url}, "env": env, **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, url


def test_regression_plugin_env_without_kwargs_gets_no_constructor_arguments(plugins):
    for cfg in (load_config(None, ["env.name=countdown_env:CountdownEnv"]),
                config_from_dict({"env": {"name": "countdown_env:CountdownEnv"}})):
        assert cfg.env.kwargs == {}
        assert make_environment(cfg.env.name, **cfg.env.kwargs).tasks("train", 1, seed=0)
    # The built-in keeps the demo's arguments when named without any, and explicit ones win.
    assert load_config(None, []).env.kwargs == {"ops": 1, "digits": 2}
    assert load_config(None, ["env.name=toolqa"]).env.kwargs == {}
    assert config_from_dict({"env": {"name": "arithmetic", "kwargs": {"ops": 2}}}).env.kwargs == {"ops": 2}


def test_regression_rejected_env_kwargs_are_one_error_line_and_leave_no_run(plugins, tmp_path):
    path, url = _write_config(tmp_path, {"name": "countdown_env:CountdownEnv", "kwargs": {"ops": 1}})
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    [line] = [s for s in result.output.splitlines() if s.strip()]
    assert line.startswith("error: cannot make environment 'countdown_env:CountdownEnv' with {'ops': 1}")
    assert queries.list_runs(open_store(url, create=False)) == []


def test_regression_run_failing_after_start_is_marked_failed_with_the_reason(plugins, tmp_path, tiny_model_dir):
    path, url = _write_config(tmp_path, {"name": "broken_env:BrokenTestSplit"},
                              model={"path": str(tiny_model_dir)}, warm_start={"enabled": False})
    result = CliRunner().invoke(app, ["run", str(path)])
    assert isinstance(result.exception, RuntimeError), result.output
    store = open_store(url, create=False)
    [run] = queries.list_runs(store)
    assert (run.status, run.reason) == ("failed", "RuntimeError: the test split is not ready")
    assert run.finished is not None

    listing = CliRunner().invoke(app, ["status", "--db", url, "--json"])
    assert listing.exit_code == 0, listing.output
    assert json.loads(listing.output)[0]["reason"] == "RuntimeError: the test split is not ready"
    shown = CliRunner().invoke(app, ["status", "newcomer", "--db", url])
    assert shown.exit_code == 0, shown.output
    assert "failed: RuntimeError: the test split is not ready" in " ".join(shown.output.split())


def test_regression_failing_start_checks_come_before_the_run_row(plugins, tmp_path):
    # A model path that is not a model, and a warm start the environment cannot feed.
    bad_model, url = _write_config(tmp_path, {"name": "countdown_env:CountdownEnv"},
                                   model={"path": str(tmp_path / "nowhere")})
    out = CliRunner().invoke(app, ["run", str(bad_model)])
    assert out.exit_code == 2 and "error: model.path" in out.output and "Traceback" not in out.output
    no_demos, _ = _write_config(tmp_path, {"name": "broken_env:NoDemonstrations"})
    out = CliRunner().invoke(app, ["run", str(no_demos)])
    assert out.exit_code == 2 and "error: warm_start needs demonstrations" in out.output
    assert queries.list_runs(open_store(url, create=False)) == []


@pytest.mark.slow
def test_regression_loop_start_prints_no_ray_restart_warning(tmp_path, tiny_model_dir):
    # Ray logs that error from C++ once per process, straight to stderr: a fresh process sees it.
    script = textwrap.dedent(f'''
        from pathlib import Path

        from treeplay.orchestrator.config import load_config
        from treeplay.orchestrator.loop import Loop
        from treeplay.store import queries
        from treeplay.store.database import open_store

        cfg = load_config(None, ["model.path={tiny_model_dir}", "output_dir={tmp_path}",
                                 "store.url=sqlite:///{tmp_path}/store.db", "rollout.num_workers=1"])
        store = open_store(cfg.store.url)
        run_id = queries.start_run(store, "quiet", cfg.model_dump(mode="json"))
        loop = Loop(cfg, store, run_id, Path("{tiny_model_dir}"), 0)
        try:
            print("versions", [info["version"] for info in loop.worker_info])
        finally:
            loop.shutdown()
    ''')
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "versions [0]" in out.stdout
    assert "constructor arguments in the object store" not in out.stderr + out.stdout


def test_regression_warm_start_prints_progress_lines_without_a_terminal(tmp_path, monkeypatch, capsys):
    from treeplay.orchestrator import run_start

    monkeypatch.setattr(run_start, "PLAIN_PROGRESS_EVERY_S", 0.0)  # every step, instead of every 5 s
    cfg = load_config(None, ["warm_start.steps=3", "warm_start.examples=64", "model.tiny.hidden_size=32",
                             "model.tiny.num_layers=1", f"output_dir={tmp_path}"])
    path, info = run_start.warm_start_model(cfg, tmp_path / "run")
    assert (path / "config.json").is_file() and info["seconds"] > 0
    lines = [s for s in capsys.readouterr().err.splitlines() if s.startswith("warm start: step")]
    assert [s.split(",")[0] for s in lines] == ["warm start: step 1/3", "warm start: step 2/3", "warm start: step 3/3"]


SHIPPED_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=[p.stem for p in SHIPPED_CONFIGS])
def test_regression_every_shipped_config_can_start(path, tmp_path):
    """configs/react.yaml could not start: its warm start asked toolqa for demonstrations it did
    not have. Every shipped run config passes the start checks, and a warm-started one gets
    examples of every kind it asks for, rendered with its own settings (a prompt its
    max_prompt_chars refuses gives none)."""
    from treeplay.engines.tiny import build_tiny_model
    from treeplay.orchestrator.run_start import check_startable

    cfg = load_config(path)
    if cfg.model.path:  # a checkpoint on its own machine (configs/gpu.yaml): a model stands in for it
        data = cfg.model_dump(mode="json")
        data["model"]["path"] = str(build_tiny_model(tmp_path / "model", 32, 1, 2))
        cfg = config_from_dict(data)
    check_startable(cfg)
    if cfg.warm_start.enabled and cfg.warm_start.steps > 0 and not cfg.model.path:
        from treeplay.orchestrator.run_start import warm_start_examples

        env = make_environment(cfg.env.name, **cfg.env.kwargs)
        for kind in cfg.warm_start.demonstrations:
            examples = warm_start_examples(cfg, env, env.tasks("train", 3, seed=0), [kind])
            assert examples and all(ex[0] and ex[1] for ex in examples), kind


def test_a_demonstration_kind_the_environment_lacks_is_one_line_before_the_run_row(tmp_path):
    path, url = _write_config(tmp_path, {"name": "arithmetic"}, warm_start={"demonstrations": {"actions": 1, "rubrics": 1}})
    out = CliRunner().invoke(app, ["run", str(path)])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert ("error: warm_start.demonstrations: environment 'arithmetic' has no 'rubrics' demonstrations "
            "(it has: actions)") in " ".join(out.output.split())
    assert queries.list_runs(open_store(url, create=False)) == []
