"""Experiment trackers: TensorBoard, Weights & Biases and MLflow mirror each finished iteration.

    trackers = Trackers.from_config(cfg, run_id, store_url)   # after check_installed(cfg)
    trackers.log_iteration(index, row)   # the metrics the store recorded for iteration ``index``
    trackers.close()

The SQL store is the record; a tracker is a copy of what it holds, made once per finished iteration
with the iteration index as the step, so a resumed run goes on at the next index in the same
TensorBoard folder, W&B run and MLflow run, without repeating or shifting a step.

- Numbers are logged as they are (NaN included: the store keeps it as null); a nested dict of
  numbers (``rollout/data_versions`` = {"0": 40, "1": 8, "kept": 16}) becomes one scalar per entry,
  named ``rollout/data_versions/0`` and so on; text (``learn/no_update_reason``) is left out.
- A configured tracker whose package is missing stops the run before anything is written
  (``check_installed``, one line naming the package to install).
- A tracker that fails once the run is going (a full disk, a server that went away) is switched off
  with one warning line; the run and the other trackers go on.

The W&B and MLflow packages are imported only when they are configured.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from treeplay.orchestrator.config import RunConfig
from treeplay.store.database import first_line
from treeplay.store.redact import redact, redact_url


class TrackerMissing(ValueError):
    """A configured tracker whose package is not installed (the message says what to install)."""


# config key -> (module that must import, what to install)
_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard  (or: pip install 'treeplay[tracking]')"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}


def _warn(message: str) -> None:
    from treeplay.orchestrator.run_start import console

    console.print(f"[yellow]warning: {message}[/]", highlight=False)


def configured(cfg: RunConfig) -> list[str]:
    """The trackers ``cfg`` turns on, by config key."""
    t = cfg.tracking
    return [name for name, on in (("tensorboard", t.tensorboard), ("wandb", t.wandb), ("mlflow", t.mlflow)) if on]


def check_installed(cfg: RunConfig) -> None:
    """Refuse a run whose configured tracker cannot be imported (call before the run is recorded).

    Raises:
        TrackerMissing: One line naming the config key and the package to install.
    """
    for name in configured(cfg):
        module, install = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerMissing(f"tracking.{name} is configured but the package '{module}' is not installed: "
                                 f"{install}")


def flat_numbers(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of ``metrics``, nested dicts flattened with "/" (``a/b``); text and None left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)):  # bool included, as 0/1
            out[name] = float(value)
    return out


def _run_key(store_url: str, run_id: int, name: str) -> str:
    """A name for this run that stays the same when it is resumed and differs between stores."""
    text = f"{redact_url(store_url)}|{run_id}|{name}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, folder: Path, config: dict[str, Any] | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        if config is not None:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), global_step=0)  # a code block
            self.writer.flush()

    def log(self, index: int, numbers: dict[str, float]) -> None:
        wall = time.time()
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, global_step=index, walltime=wall)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, cfg: RunConfig, key: str, config: dict[str, Any]) -> None:
        import wandb

        w = cfg.tracking.wandb
        assert w is not None
        self.run = wandb.init(project=w.project, entity=w.entity, name=cfg.name, tags=list(w.tags), mode=w.mode,
                              id=w.run_id or f"treeplay-{key}", resume="allow", config=config)

    def log(self, index: int, numbers: dict[str, float]) -> None:
        self.run.log(numbers, step=index)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    name = "mlflow"

    def __init__(self, cfg: RunConfig, key: str, config: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        m = cfg.tracking.mlflow
        assert m is not None
        self.client = MlflowClient(tracking_uri=m.tracking_uri)
        found = self.client.get_experiment_by_name(m.experiment)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(m.experiment)
        # A resumed run logs into the MLflow run it started (found by its tag).
        same = self.client.search_runs([experiment], filter_string=f"tags.`treeplay.run_key` = '{key}'",
                                       max_results=1)
        if same:
            self.run_id = same[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment, run_name=cfg.name, tags={"treeplay.run_key": key})
            self.run_id = run.info.run_id
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, index: int, numbers: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, index) for key, value in numbers.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """The run's trackers. Each one that fails is switched off with one warning line; the run goes on."""

    def __init__(self, trackers: list[Any] | None = None) -> None:
        self.trackers = list(trackers or [])

    @classmethod
    def from_config(cls, cfg: RunConfig, run_id: int, store_url: str | None = None,
                    fresh: bool = True) -> Trackers:
        """Open the trackers ``cfg.tracking`` names. ``store_url`` tells runs of different stores apart
        in W&B and MLflow; ``fresh``: a run that is starting (not resumed), whose config TensorBoard
        records once as text (W&B and MLflow keep it with their run either way)."""
        check_installed(cfg)
        config = redact(cfg.model_dump(mode="json"))  # no credentials in a dashboard
        key = _run_key(store_url or cfg.store.url, run_id, cfg.name)
        t = cfg.tracking
        makers: list[tuple[str, Any]] = []
        if t.tensorboard:
            folder = Path(t.tensorboard) / cfg.name
            makers.append(("tensorboard", lambda: _TensorBoard(folder, config if fresh else None)))
        if t.wandb is not None:
            makers.append(("wandb", lambda: _Wandb(cfg, key, config)))
        if t.mlflow is not None:
            makers.append(("mlflow", lambda: _MLflow(cfg, key, config)))
        opened = []
        for name, make in makers:
            try:
                opened.append(make())
            except Exception as e:  # noqa: BLE001 - a dashboard must not stop the run
                _warn(f"tracking.{name} could not start ({_one_line(e)}); the run goes on without it")
        return cls(opened)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_iteration(self, index: int, metrics: Mapping[str, Any]) -> None:
        """Log the numbers of iteration ``index``'s recorded metrics at step ``index``."""
        if not self.trackers:
            return
        numbers = flat_numbers(metrics)
        for tracker in list(self.trackers):
            try:
                tracker.log(index, numbers)
            except Exception as e:  # noqa: BLE001 - a dashboard must not stop the run
                self._drop(tracker, f"failed at iteration {index} ({_one_line(e)})")

    def close(self) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001
                _warn(f"tracking.{tracker.name} did not close cleanly ({_one_line(e)})")
        self.trackers = []

    def _drop(self, tracker: Any, why: str) -> None:
        self.trackers.remove(tracker)
        _warn(f"tracking.{tracker.name} {why}; it is switched off, the store keeps the record")
        try:
            tracker.close()
        except Exception:  # noqa: BLE001 - it already failed once; one warning is enough
            pass


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"
