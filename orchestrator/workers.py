"""Ray actors: RolloutWorker (holds a policy engine) and LearnerActor (holds a learner).

This is the only module that imports Ray. The actors are thin shells around plain Python objects
(engines, ``orchestrator.rollouts``, learners) that are tested without Ray.

Nothing assumes a shared filesystem between actors: a model directory travels as a ``ModelFiles``
blob through the object store (put once, read by every node), and new weights travel as a
``WeightsPayload`` (numpy arrays, zero-copy on each node). Rollout workers restart automatically
when they die (``max_restarts``). Their constructor takes no model: Ray would have to keep such an
argument in the object store for every possible restart, and warns about exactly that. The loop
sends the model with ``load_model`` after construction instead; a restarted worker comes back
empty (``info()["version"] is None``), so the loop checks versions and sends the model and the
current payload again before it gives the worker work (see ``loop.py``).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from orchestrator.weights import WeightsPayload, from_payload, to_payload


@dataclass
class ModelFiles:
    """A Hugging Face model directory as bytes, so it can travel through the object store."""

    files: dict[str, bytes]

    @classmethod
    def pack(cls, directory: str | Path) -> ModelFiles:
        d = Path(directory)
        return cls({p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()})

    def unpack(self, directory: str | Path) -> Path:
        d = Path(directory)
        for name, data in self.files.items():
            target = d / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return d


def _materialise(model: str | ModelFiles, prefix: str) -> str:
    """A local directory for the model: the path itself, or the blob unpacked into a temp dir."""
    if isinstance(model, ModelFiles):
        return str(model.unpack(tempfile.mkdtemp(prefix=prefix)))
    return model


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


@ray.remote(max_restarts=-1, max_task_retries=0)
class RolloutWorker:
    """Holds one policy engine and runs rollouts and evaluations with it.

    Made with the run config and its index only; ``load_model`` gives it the model (again after
    every restart, see the module docstring).
    """

    def __init__(self, cfg: dict[str, Any], index: int) -> None:
        from agents.registry import environment_factory
        from orchestrator.config import RunConfig

        self.cfg = RunConfig.model_validate(cfg)
        self.index = index
        _set_threads(self.cfg.engine.num_threads)
        self.engine: Any = None
        self.env_factory = environment_factory(self.cfg.env.name, **self.cfg.env.kwargs)

    @ray.method(max_task_retries=-1)  # a worker that dies while loading is restarted and asked again
    def load_model(self, model: str | ModelFiles, version: int) -> dict[str, Any]:
        """Build the engine from ``model`` (a path or a blob) as weights ``version``; returns ``info()``."""
        from orchestrator.engines import make_engine

        model_dir = _materialise(model, f"treeplay-worker{self.index}-")
        engine = make_engine(self.cfg.engine.kind, model_dir, seed=self.cfg.seed + self.index, **self.cfg.engine.kwargs)
        engine.version = version  # the model it was built from (a checkpoint when resuming)
        self.engine = engine
        return self.info()

    def _engine(self) -> Any:
        if self.engine is None:
            raise RuntimeError(f"worker {self.index} has no model yet (the loop sends it with load_model)")
        return self.engine

    @ray.method(max_task_retries=-1)  # idempotent: a call to a restarting worker waits for it
    def info(self) -> dict[str, Any]:
        """Index, served weights version (None before ``load_model``), process id and node."""
        return {
            "index": self.index,
            "version": None if self.engine is None else self.engine.version,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
        }

    @ray.method(max_task_retries=-1)
    def fingerprint(self) -> str | None:
        """A hash of the served weights (engines that expose ``state_dict``), to compare workers."""
        from orchestrator.weights import fingerprint

        sd = getattr(self.engine, "state_dict", None)
        return fingerprint(sd()) if callable(sd) else None

    @ray.method(max_task_retries=-1)
    def apply_weights(self, payload: WeightsPayload) -> int | None:
        """Load a new weights version in place; returns the version now served, or None when this
        worker has no model to load them into (Ray restarted it since the loop last looked)."""
        if self.engine is None:
            return None
        self.engine.load_weights(payload.version, from_payload(payload))
        return self.engine.version

    def rollout(self, tasks: list, iteration: int, version: int, seed: int) -> tuple[list, dict[str, float]]:
        """Run the configured rollout mode on ``tasks``; refuses to run on the wrong weights."""
        from orchestrator.rollouts import run_rollouts

        engine = self._engine()
        if engine.version != version:
            raise RuntimeError(f"worker {self.index} serves version {engine.version}, loop expects {version}")
        t0 = time.perf_counter()
        results, stats = run_rollouts(self.cfg, tasks, engine, self.env_factory, iteration=iteration, seed=seed)
        stats["rollout_s"] = time.perf_counter() - t0
        return results, stats

    def evaluate(self, tasks: list, temperature: float) -> list[float]:
        from orchestrator.rollouts import evaluate

        return evaluate(self.cfg, tasks, self._engine(), self.env_factory, temperature=temperature)


def shuffled_control(data: Any, seed: int) -> Any:
    """The same pairs with chosen and rejected swapped by a seeded coin flip each: the data's shape,
    lengths and NLL targets' distribution stay, the verifier's signal goes."""
    import dataclasses
    import random

    from store.records import PreferenceData

    rng = random.Random(seed)
    pairs = [
        dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen, chosen_node=p.rejected_node,
                            rejected_node=p.chosen_node, chosen_visits=p.rejected_visits,
                            rejected_visits=p.chosen_visits)
        if rng.random() < 0.5 else p
        for p in data.pairs
    ]
    return PreferenceData(pairs=pairs, ranked_lists=data.ranked_lists)


def update_is_deployable(metrics: dict[str, Any], applied: float, healthy: bool) -> bool:
    """Whether an iteration's training may be redeployed.

    The learner already skips single bad updates and rolls back to its last good weights; an
    iteration in which at least half of the updates were skipped (NaN/inf loss, exploding gradient)
    did not train in any meaningful sense, so the loop keeps serving the previous weights.
    """
    skipped = float(metrics.get("skipped_updates", 0.0))
    return healthy and applied > 0 and skipped < applied


def train_guarded(learner: Any, data: Any) -> tuple[dict[str, Any], bool]:
    """One ``learner.train(data)``; if the iteration may not be deployed, its weights are put back.

    The learner rolls single bad updates back itself, but weights blown up to huge *finite* values
    can still give finite losses and pass its checks; the loop then refuses to deploy them
    (``update_is_deployable``) and the next iteration must not start from them either.

    Returns:
        The learner's metrics (plus ``restored`` = 1 when the weights were put back) and whether the
        new weights may be deployed.
    """
    before = learner.state_dict()  # CPU copies
    updates_before = float(learner.policy.updates)
    metrics = dict(learner.train(data))
    applied = float(learner.policy.updates) - updates_before
    deployable = update_is_deployable(metrics, applied, learner.healthy)
    if not deployable:
        learner.policy.model.load_state_dict(before)
        learner.policy.healthy = True
        metrics["restored"] = 1.0
    return metrics, deployable


@ray.remote(max_restarts=0)
class LearnerActor:
    """Holds the learner: reads preference data from the store, trains, checkpoints, returns weights."""

    def __init__(self, cfg: dict[str, Any], model: str | ModelFiles, run_id: int, version: int) -> None:
        from agents.registry import make_environment
        from orchestrator.config import RunConfig
        from orchestrator.learners import make_learner
        from store.database import open_store

        self.cfg = RunConfig.model_validate(cfg)
        _set_threads(self.cfg.engine.num_threads)
        self.model_dir = _materialise(model, "treeplay-learner-")
        self.env = make_environment(self.cfg.env.name, **self.cfg.env.kwargs)
        self.tasks_by_prompt: dict[str, Any] = {}
        self.learner = make_learner(self.cfg, self.model_dir, preference=self.verifier_preference)
        self.store = open_store(self.cfg.store.url)
        self.run_id = run_id
        self.version = version

    def verifier_preference(self, prompt: str, a: str, b: str) -> float:
        """SLHF's oracle p(a > b | prompt) from the environment's exact verifier: 1, 0, or 0.5 on ties
        (and when the prompt is not one of the iteration's tasks)."""
        task = self.tasks_by_prompt.get(prompt)
        if task is None:
            return 0.5
        from agents.episode import verify_completion

        va, vb = verify_completion(self.env, task, a), verify_completion(self.env, task, b)
        return 0.5 if va == vb else float(va)

    @ray.method(num_returns=2)
    def train(self, iteration: int, checkpoint_dir: str | None,
              tasks: list | None = None) -> tuple[dict[str, float], WeightsPayload | None]:
        """Train on this iteration's data (plus replay); return metrics and the new weights, or None
        when the update was rejected (NaN/inf or exploding gradients): then the old weights stay.
        ``tasks`` (this iteration's) let the SLHF oracle verify answers."""
        from store import queries

        if tasks:
            self.tasks_by_prompt.update({t.prompt: t for t in tasks})
        t0 = time.perf_counter()
        data = queries.preference_data(self.store, self.run_id, iteration, replay=self.cfg.learner.replay)
        if self.cfg.learner.control == "shuffle":
            data = shuffled_control(data, seed=self.cfg.seed * 7919 + iteration)
        if len(data) == 0:
            return {"learn_s": time.perf_counter() - t0, "pairs": 0.0, "rejected_update": 0.0}, None
        metrics, deployable = train_guarded(self.learner, data)
        metrics["learn_s"] = time.perf_counter() - t0
        metrics["pairs"] = float(len(data.pairs) + len(data.ranked_lists))
        if not deployable:
            metrics["rejected_update"] = 1.0
            return metrics, None
        metrics["rejected_update"] = 0.0
        self.version += 1
        payload = to_payload(self.version, self.learner.state_dict())
        if checkpoint_dir:
            path = Path(checkpoint_dir) / f"v{self.version:04d}"
            self.learner.save(path)
            queries.record_checkpoint(self.store, self.run_id, iteration, self.version, path.resolve().as_uri(), metrics)
        return metrics, payload

    def ping(self) -> int:
        return self.version


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` (e.g. "auto") or start a fresh local cluster (never a stale one)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
