"""Experiment trackers (orchestrator/tracking.py): each finished iteration's recorded metrics mirrored
to TensorBoard (read back here from the event files), W&B and MLflow.

- ``Trackers.log_iteration`` writes one scalar per number at step = iteration index; a resumed run
  appends to the same folder without repeating or shifting a step;
- a configured tracker whose package is missing stops ``treeplay run`` / ``resume`` with one line
  naming the package, before the store is written;
- a tracker that fails switches only itself off, with one warning line;
- W&B and MLflow (stand-in modules: neither is a dependency) log into the same run after a resume;
- the real loop (heavy) mirrors exactly what its store's iteration rows hold.
"""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from treeplay.orchestrator import tracking
from treeplay.orchestrator.config import load_config
from treeplay.orchestrator.tracking import TrackerMissing, Trackers, flat_numbers
from treeplay.store import queries
from treeplay.store.database import open_store


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _same(a: float, b: float) -> bool:
    # TensorBoard keeps scalars as float32; NaN (the store's null) stays NaN.
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-6)


ROW = {
    "rollout/pairs": 12.0,
    "learn/loss": float("nan"),
    "eval/accuracy_greedy": 0.375,
    "policy_version": 1.0,
    "learn/no_update_reason": "no pairs",  # text: not a scalar
    "rollout/data_versions": {"0": 40, "1": 8, "kept": 16},  # flattened
}


def test_flat_numbers_flattens_dicts_and_leaves_text_out():
    assert flat_numbers({"a": 1, "b": {"c": 2.5, "d": {"e": True}}, "t": "x", "n": None}) == {
        "a": 1.0, "b/c": 2.5, "b/d/e": 1.0,
    }


def test_log_iteration_writes_scalars_at_the_iteration_index_and_a_resume_appends(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config(None, [f"tracking.tensorboard={tmp_path / 'tb'}", "name=tracked"])
    trackers = Trackers.from_config(cfg, run_id=1, fresh=True)
    trackers.log_iteration(0, ROW)
    trackers.log_iteration(1, {**ROW, "rollout/pairs": 30.0})
    trackers.close()
    # resumed: the same folder, the next index, the config not logged again
    trackers = Trackers.from_config(cfg, run_id=1, fresh=False)
    trackers.log_iteration(2, {**ROW, "rollout/pairs": 7.0})
    trackers.close()

    folder = tmp_path / "tb" / "tracked"
    scalars = _scalars(folder)
    assert set(scalars) == {"rollout/pairs", "learn/loss", "eval/accuracy_greedy", "policy_version",
                            "rollout/data_versions/0", "rollout/data_versions/1", "rollout/data_versions/kept"}
    assert scalars["rollout/pairs"] == [(0, 12.0), (1, 30.0), (2, 7.0)]
    assert [s for s, _ in scalars["rollout/data_versions/kept"]] == [0, 1, 2]
    assert all(math.isnan(v) for _, v in scalars["learn/loss"])
    assert scalars["eval/accuracy_greedy"][0][1] == pytest.approx(0.375)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("config")]
    assert len(texts) == 1 and len(acc.Tensors(texts[0])) == 1  # once, at the start of the run


class _Broken:
    name = "broken"

    def __init__(self) -> None:
        self.closed = False

    def log(self, index, numbers):
        raise OSError("disk full\nmore detail")

    def close(self):
        self.closed = True


class _Kept:
    name = "kept"

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, index, numbers):
        self.logged.append((index, numbers))

    def close(self):
        pass


def test_a_tracker_that_fails_switches_only_itself_off(capsys):
    broken, kept = _Broken(), _Kept()
    trackers = Trackers([broken, kept])
    trackers.log_iteration(0, ROW)
    trackers.log_iteration(1, ROW)
    assert trackers.trackers == [kept] and broken.closed
    assert [i for i, _ in kept.logged] == [0, 1]
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "tracking.broken" in warnings[0] and "disk full" in warnings[0]
    assert "more detail" not in err


def test_a_tracker_that_cannot_start_is_left_out_with_a_warning(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    (tmp_path / "tb").write_text("a file where the folder should be")
    cfg = load_config(None, [f"tracking.tensorboard={tmp_path / 'tb'}"])
    trackers = Trackers.from_config(cfg, run_id=1)
    assert not trackers
    trackers.log_iteration(0, ROW)  # nothing to do, nothing raised
    trackers.close()
    assert "tracking.tensorboard could not start" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "package"), [
    ("tracking.wandb.project=treeplay-test", "wandb"),
    ("tracking.mlflow.experiment=treeplay-test", "mlflow"),
])
def test_a_configured_tracker_without_its_package_stops_the_run_before_the_store(tmp_path, override, package):
    from treeplay.orchestrator.cli import app
    from treeplay.orchestrator.loop import launch_run

    if tracking.importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    db = tmp_path / "store.db"
    cfg = load_config(None, [override, f"store.url=sqlite:///{db}", f"output_dir={tmp_path}"])
    with pytest.raises(TrackerMissing) as e:
        launch_run(cfg)
    assert f"'{package}' is not installed" in str(e.value) and f"pip install {package}" in str(e.value)
    assert not db.exists() and not (tmp_path / "demo").exists()

    result = CliRunner().invoke(app, ["demo", override, f"store.url=sqlite:///{db}", f"output_dir={tmp_path}"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: tracking.{package} is configured") and package in lines[0]
    assert not db.exists()


def test_resume_with_a_missing_tracker_package_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    from treeplay.orchestrator.loop import resume_run

    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = load_config(None, [f"tracking.tensorboard={tmp_path / 'tb'}", f"store.url={url}"])
    with open_store(url) as store:
        run_id = queries.start_run(store, "stopped", cfg.model_dump(mode="json"))
        queries.finish_run(store, run_id, "interrupted", "killed")
    with pytest.raises(TrackerMissing, match="'tensorboard' is not installed"):
        resume_run("stopped", url)
    with open_store(url) as store:
        info = queries.get_run(store, run_id)
        assert (info.status, info.reason) == ("interrupted", "killed")
        assert queries.list_iterations(store, run_id) == [] and queries.latest_checkpoint(store, run_id) is None
    assert not (tmp_path / "tb").exists()


def _fake_wandb(monkeypatch) -> types.SimpleNamespace:
    """A stand-in ``wandb`` module that records what it is given."""
    seen = types.SimpleNamespace(inits=[], logs=[], finished=0)

    class Run:
        def log(self, data, step):
            seen.logs.append((step, dict(data)))

        def finish(self):
            seen.finished += 1

    def init(**kwargs):
        seen.inits.append(kwargs)
        return Run()

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return seen


def test_wandb_logs_at_the_iteration_index_into_the_same_run_after_a_resume(monkeypatch, tmp_path):
    seen = _fake_wandb(monkeypatch)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = load_config(None, ["name=tracked", "tracking.wandb.project=p", "tracking.wandb.tags=[a]",
                             f"store.url={url}", "env.kwargs.api_key=secret"])
    for index in (0, 1):  # the second time as a resumed run
        trackers = Trackers.from_config(cfg, run_id=3, store_url=url, fresh=index == 0)
        trackers.log_iteration(index, ROW)
        trackers.close()
    first, again = seen.inits
    assert first["id"] == again["id"] and first["resume"] == "allow" and first["project"] == "p"
    assert first["name"] == "tracked" and first["tags"] == ["a"]
    assert first["config"]["env"]["kwargs"]["api_key"] != "secret"  # credentials never leave the run
    other = Trackers.from_config(cfg, run_id=4, store_url=url)  # another run: another W&B run
    other.close()
    assert seen.inits[-1]["id"] != first["id"]
    assert [s for s, _ in seen.logs] == [0, 1] and seen.finished == 3
    assert seen.logs[0][1]["rollout/data_versions/kept"] == 16.0 and "learn/no_update_reason" not in seen.logs[0][1]


def test_mlflow_logs_batches_at_the_iteration_index_into_the_same_run_after_a_resume(monkeypatch):
    """A stand-in ``mlflow`` that keeps runs and metrics in memory, as a tracking server would."""
    seen = types.SimpleNamespace(runs={}, metrics=[], dicts=[], statuses=[])

    class Client:
        def __init__(self, tracking_uri=None):
            seen.uri = tracking_uri

        def get_experiment_by_name(self, name):
            return types.SimpleNamespace(experiment_id="7") if name == "exp" else None

        def search_runs(self, experiments, filter_string, max_results):
            key = filter_string.split("'")[1]
            return [types.SimpleNamespace(info=types.SimpleNamespace(run_id=r))
                    for r, tags in seen.runs.items() if tags["treeplay.run_key"] == key]

        def create_run(self, experiment_id, run_name, tags):
            run_id = f"r{len(seen.runs)}"
            seen.runs[run_id] = tags
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id))

        def update_run(self, run_id, status):
            seen.statuses.append((run_id, status))

        def log_dict(self, run_id, data, name):
            seen.dicts.append((run_id, name))

        def log_batch(self, run_id, metrics):
            seen.metrics += [(run_id, m.key, m.value, m.step) for m in metrics]

        def set_terminated(self, run_id):
            seen.statuses.append((run_id, "FINISHED"))

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)

    module("mlflow")
    module("mlflow.tracking", MlflowClient=Client)
    module("mlflow.entities", Metric=lambda key, value, timestamp, step: types.SimpleNamespace(
        key=key, value=value, timestamp=timestamp, step=step))
    cfg = load_config(None, ["tracking.mlflow.experiment=exp", "tracking.mlflow.tracking_uri=http://mlflow:5000"])
    for index in (0, 1):  # the second time as a resumed run
        trackers = Trackers.from_config(cfg, run_id=5, fresh=index == 0)
        trackers.log_iteration(index, ROW)
        trackers.close()
    assert seen.uri == "http://mlflow:5000" and list(seen.runs) == ["r0"]
    assert seen.statuses == [("r0", "FINISHED"), ("r0", "RUNNING"), ("r0", "FINISHED")]
    pairs = [(step, value) for run, key, value, step in seen.metrics if key == "rollout/pairs"]
    assert pairs == [(0, 12.0), (1, 12.0)] and seen.dicts[0] == ("r0", "config.json")


@pytest.mark.slow
@pytest.mark.heavy
def test_the_loop_mirrors_its_iteration_rows_to_tensorboard(tmp_path):
    """A small real run (Ray, store, untrained tiny model, two iterations): TensorBoard's scalars are
    the numbers of the store's iteration rows, at steps 0 and 1."""
    pytest.importorskip("tensorboard")
    import ray

    from treeplay.orchestrator.loop import launch_run

    cfg = load_config(None, [
        f"output_dir={tmp_path}", f"store.url=sqlite:///{tmp_path}/store.db", f"tracking.tensorboard={tmp_path}/tb",
        "name=tracked", "iterations=2", "warm_start.enabled=false", "rollout.tasks_per_iteration=8",
        "rollout.chunk_size=4", "eval.tasks=4", "ray.num_cpus=2",
    ])
    try:
        report = launch_run(cfg)
    finally:
        ray.shutdown()
    with open_store(cfg.store.url) as store:
        rows = {it.index: it.metrics for it in queries.list_iterations(store, report.run_id)}
    assert sorted(rows) == [0, 1]
    scalars = _scalars(tmp_path / "tb" / "tracked")
    expected: dict[str, list[tuple[int, float]]] = {}
    for index, metrics in sorted(rows.items()):
        for key, value in metrics.items():
            if isinstance(value, dict):
                for sub, n in value.items():
                    expected.setdefault(f"{key}/{sub}", []).append((index, float(n)))
            elif value is None:  # a NaN the store keeps as null
                expected.setdefault(key, []).append((index, math.nan))
            elif not isinstance(value, str):
                expected.setdefault(key, []).append((index, float(value)))
    assert set(scalars) == set(expected)
    for key, points in expected.items():
        got = scalars[key]
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert all(_same(a, b) for (_, a), (_, b) in zip(got, points, strict=True)), (key, got, points)
