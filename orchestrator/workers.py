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
    def pack(cls, directory: str | Path, skip: tuple[str, ...] = ()) -> ModelFiles:
        """Every file under ``directory`` except those under its top-level entries named in ``skip``
        (rollout workers need a checkpoint's weights, not its ``trainer/`` state)."""
        d = Path(directory)
        return cls({
            p.relative_to(d).as_posix(): p.read_bytes()
            for p in sorted(d.rglob("*"))
            if p.is_file() and p.relative_to(d).parts[0] not in skip
        })

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
    """The control run's data: the preference direction of each pair reversed by a seeded coin flip,
    the ranked lists' texts permuted among their ranks; nothing else moves.

    Only what says which text is better changes: a swapped pair's chosen slot holds the old rejected
    text (with its node and action spans, which describe that text) and vice versa, while weight,
    margin, label smoothing and the visit counts stay in their slots, so MCTS-DPO's alpha (from the
    chosen and rejected visits) and the loss's weighting are those of the real run. (Swapping the
    visits as well would make alpha 1/(N_l/N_w + 1), clipped to 0.5, which cancels the preference
    gradient: the control would measure NLL on wrong answers, not reversed preferences.) A ranked
    list keeps its scores and per-step rewards in rank order and gets its texts shuffled.
    """
    import dataclasses
    import random

    rng = random.Random(seed)
    pairs = [_swap_texts(p) if rng.random() < 0.5 else p for p in data.pairs]
    lists = [_permute_texts(r, rng) for r in data.ranked_lists]
    return dataclasses.replace(data, pairs=pairs, ranked_lists=lists)


_SPANS = "action_spans"  # the key store.records.ACTION_SPANS names: which characters the policy wrote


def _swap_texts(p: Any) -> Any:
    import dataclasses

    info = dict(p.info) if p.info else p.info
    if info and isinstance(info.get(_SPANS), dict):
        spans = info[_SPANS]
        info[_SPANS] = {**spans, "chosen": spans.get("rejected"), "rejected": spans.get("chosen")}
    return dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen, chosen_node=p.rejected_node,
                               rejected_node=p.chosen_node, info=info)


def _permute_texts(r: Any, rng: Any) -> Any:
    import dataclasses

    order = list(range(len(r.items)))
    rng.shuffle(order)
    items = [dataclasses.replace(item, text=r.items[j].text, node=r.items[j].node)
             for item, j in zip(r.items, order, strict=True)]
    info = dict(r.info) if r.info else r.info
    if info and isinstance(info.get(_SPANS), list) and len(info[_SPANS]) == len(order):
        info[_SPANS] = [info[_SPANS][j] for j in order]
    for key in ("end_nodes", "correct"):  # per-item facts about the texts travel with them
        if info and isinstance(info.get(key), list) and len(info[key]) == len(order):
            info[key] = [info[key][j] for j in order]
    return dataclasses.replace(r, items=items, info=info)


def canonical_order(data: Any) -> Any:
    """The data in an order that does not depend on which chunk the store wrote first: by iteration,
    then task id, each task's records in their written order. With several rollout workers chunks
    finish in any order, and a resumed iteration writes its remaining chunks after the others; the
    learner's shuffle must see the same list either way."""
    import dataclasses

    def key(r: Any) -> tuple[int, str]:
        return (r.iteration if r.iteration is not None else -1, r.task_id or "")

    return dataclasses.replace(data, pairs=sorted(data.pairs, key=key), ranked_lists=sorted(data.ranked_lists, key=key))


def usable_data(algorithm: str, data: Any) -> tuple[Any, str | None]:
    """The part of ``data`` the learner trains on, or a reason why there is nothing to train on.

    The DPO family trains on pairs, TPO on ranked lists, SLHF on the prompts of both. Finer checks (TPO
    drops lists whose items are tied) are the learner's: ``train_guarded`` reports them.
    """
    from store.records import PreferenceData

    if algorithm == "dpo":
        if not data.pairs:
            return data, f"no preference pairs ({len(data.ranked_lists)} ranked lists, which DPO does not use)"
        return PreferenceData(pairs=data.pairs), None
    if algorithm == "tpo":
        if not data.ranked_lists:
            return data, f"no ranked lists ({len(data.pairs)} pairs, which TPO does not use)"
        return PreferenceData(ranked_lists=data.ranked_lists), None
    if len(data) == 0:
        return data, "no preference data (no pairs or ranked lists to take prompts from)"
    return data, None


def update_is_deployable(metrics: dict[str, Any], applied: float, healthy: bool) -> bool:
    """Whether an iteration's training may be redeployed.

    The learner already skips single bad updates and rolls back to its last good weights; an
    iteration in which at least half of the updates were skipped (NaN/inf loss, exploding gradient)
    did not train in any meaningful sense, so the loop keeps serving the previous weights.
    """
    skipped = float(metrics.get("skipped_updates", 0.0))
    return healthy and applied > 0 and skipped < applied


def train_guarded(learner: Any, data: Any) -> tuple[dict[str, Any], bool]:
    """One ``learner.train(data)``; if the iteration may not be deployed, the learner is put back.

    The learner rolls single bad updates back itself, but weights blown up to huge *finite* values
    can still give finite losses and pass its checks; the loop then refuses to deploy them
    (``update_is_deployable``) and the next iteration must not start from them either. Nor from
    the optimizer moments, counters and RNG states the rejected iteration left: the whole training
    state goes back, so a rejected iteration leaves no trace (and a run resumed from the last
    checkpoint continues exactly as the uninterrupted one would).

    A learner that finds nothing to train on in ``data`` (e.g. TPO when every list's items are tied)
    says so with a ValueError before it starts the iteration; that is no update, not a failure.

    Returns:
        The learner's metrics (plus ``restored`` = 1 when the learner was put back, and
        ``no_update_reason`` when the update is not deployable) and whether the new weights may be
        deployed.
    """
    before = learner.state_dict()  # CPU copies
    state_before = learner.training_state()
    updates_before = float(learner.policy.updates)
    calls_before = learner.policy.calls
    try:
        metrics = dict(learner.train(data))
    except ValueError as e:
        if learner.policy.calls != calls_before:
            raise  # the iteration had started: a real error
        return {"no_update_reason": f"nothing to train on: {e}"}, False
    applied = float(learner.policy.updates) - updates_before
    deployable = update_is_deployable(metrics, applied, learner.healthy)
    if not deployable:
        learner.policy.model.load_state_dict(before)
        # The reference cannot have changed in a way that matters: a fixed one never does, a
        # refreshed one is rebuilt from the policy at the next call.
        learner.load_training_state(state_before, check_reference=False)
        learner.policy.healthy = True
        metrics["restored"] = 1.0
        metrics["no_update_reason"] = str(
            metrics.get("last_skip_reason") or "update rejected by the learner's guard rails")
    return metrics, deployable


@ray.remote(max_restarts=0)
class LearnerActor:
    """Holds the learner: reads preference data from the store, trains, checkpoints, returns weights.

    ``model`` is the run's starting model or, when resuming, a checkpoint with its ``trainer/``
    state, which the learner continues from. ``reference`` (resuming with a fixed reference) is the
    model that reference came from; ``reference_uri`` names it in the checkpoints.
    """

    def __init__(self, cfg: dict[str, Any], model: str | ModelFiles, run_id: int, version: int,
                 reference: str | ModelFiles | None = None, reference_uri: str | None = None) -> None:
        from agents.registry import make_environment
        from orchestrator.config import RunConfig
        from orchestrator.learners import make_learner
        from orchestrator.learners.slhf import VerifierOracle
        from store.database import open_store

        self.cfg = RunConfig.model_validate(cfg)
        _set_threads(self.cfg.engine.num_threads)
        self.model_dir = _materialise(model, "treeplay-learner-")
        self.oracle = VerifierOracle(make_environment(self.cfg.env.name, **self.cfg.env.kwargs))
        self.learner = make_learner(self.cfg, self.model_dir, preference=self.oracle)
        policy = self.learner.policy
        if reference is not None:
            policy.load_reference(_materialise(reference, "treeplay-reference-"), reference_uri)
        elif reference_uri:
            policy.reference_source = reference_uri
        self.resumed = self.learner.restore_checkpoint(self.model_dir)
        self.store = open_store(self.cfg.store.url)
        self.run_id = run_id
        self.version = version

    @ray.method(num_returns=2)
    def train(self, iteration: int, checkpoint_dir: str | None,
              tasks: list | None = None) -> tuple[dict[str, Any], WeightsPayload | None]:
        """Train on this iteration's data (plus replay); return metrics and the new weights, or None
        when there is no update: no data the learner can use, or an update the guard rails rejected
        (NaN/inf, exploding gradients). Then ``no_update_reason`` says which, and the old weights
        (and the learner's whole training state) stay. ``tasks`` (those of the iteration and its
        replay window) let the SLHF oracle verify answers."""
        from store import queries

        if tasks:
            self.oracle.add_tasks(tasks)
        t0 = time.perf_counter()
        data = queries.preference_data(self.store, self.run_id, iteration, replay=self.cfg.learner.replay)
        data, reason = usable_data(self.cfg.learner.algorithm, canonical_order(data))
        if reason is not None:
            return {"learn_s": time.perf_counter() - t0, "pairs": 0.0, "rejected_update": 0.0,
                    "no_update_reason": reason}, None
        if self.cfg.learner.control == "shuffle":
            data = shuffled_control(data, seed=self.cfg.seed * 7919 + iteration)
        self.oracle.reset_counts()
        metrics, deployable = train_guarded(self.learner, data)
        metrics.update(self.oracle.counts())
        metrics["learn_s"] = time.perf_counter() - t0
        metrics["pairs"] = float(len(data.pairs) + len(data.ranked_lists))
        if not deployable:
            metrics["rejected_update"] = 1.0 if "restored" in metrics else 0.0
            if not metrics["rejected_update"]:
                metrics["pairs"] = 0.0  # the learner found nothing it could train on
            return metrics, None
        metrics["rejected_update"] = 0.0
        self.version += 1
        payload = to_payload(self.version, self.learner.state_dict())
        if checkpoint_dir:
            # Written complete under a temporary name, then renamed; recorded only after that, so the
            # store never points at a partial checkpoint. A directory already at this path was left
            # by a crash before it was recorded (versions only grow from the last recorded one).
            path = self.learner.save_checkpoint(Path(checkpoint_dir) / f"v{self.version:04d}", replace=True)
            queries.record_checkpoint(self.store, self.run_id, iteration, self.version, path.resolve().as_uri(),
                                      _numbers(metrics))
        return metrics, payload

    def ping(self) -> int:
        return self.version

    def resumed_from_checkpoint(self) -> bool:
        """Whether the learner continued from a checkpoint's training state (not just its weights)."""
        return self.resumed


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` (e.g. "auto") or start a fresh local cluster (never a stale one)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
