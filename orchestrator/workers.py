"""Ray actors: RolloutWorker (holds a policy engine) and LearnerActor (holds a learner), and the
Fleet that starts, feeds and stops them for one run.

Ray is imported here and in ``placement.py`` only; the loop drives the run through ``Fleet``
(actor start and placement, chunks streamed with ``ray.wait``, weights, evaluation, kill). The
actors are thin shells around plain Python objects (engines, ``orchestrator.rollouts``, learners
and their guard rails in ``learners.guards``) that are tested without Ray.

Nothing assumes a shared filesystem between actors: a model directory travels as a ``ModelFiles``
blob through the object store (put once, read by every node), and new weights travel as a
``WeightsPayload`` (numpy arrays, zero-copy on each node). Rollout workers restart automatically
when they die (``max_restarts``). Their constructor takes no model: Ray would have to keep such an
argument in the object store for every possible restart, and warns about exactly that. The loop
sends the model with ``load_model`` after construction instead; a restarted worker comes back
empty (``info()["version"] is None``), so the loop checks versions and sends the model and the
current payload again before it gives the worker work (``Fleet.ensure_version``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from treeplay.learners.guards import (
    canonical_order,
    shuffled_control,
    train_guarded,
    usable_data,
    within_staleness,
)
from treeplay.orchestrator.schedule import derive_seed
from treeplay.orchestrator.weights import WeightsPayload, from_payload, to_payload


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


def lane_priority(cfg: Any, thread: bool = False) -> int:
    """In a pipelined run, lower this process's CPU priority (or only the calling thread's) by
    ``ray.lane_nice``: the learner, the evaluator and the store writer then use what the rollout
    workers, the critical path, leave of shared cores. Returns the niceness applied (0: none)."""
    nice = cfg.ray.lane_nice if cfg.rollout.max_staleness > 0 else 0
    if nice <= 0 or not hasattr(os, "setpriority"):
        return 0
    import threading

    who = threading.get_native_id() if thread else 0  # Linux: a thread id names that thread alone
    try:
        os.setpriority(os.PRIO_PROCESS, who, os.getpriority(os.PRIO_PROCESS, who) + nice)
    except OSError:  # not allowed here: run at the priority we have
        return 0
    return nice


class PolicyHost:
    """Holds one policy engine and runs rollouts and evaluations with it (the body of the
    ``RolloutWorker`` and ``Evaluator`` actors).

    Made with the run config and its index only; ``load_model`` gives it the model (again after
    every restart, see the module docstring).
    """

    def __init__(self, cfg: dict[str, Any], index: int) -> None:
        from treeplay.agents.registry import environment_factory
        from treeplay.orchestrator.config import RunConfig

        self.cfg = RunConfig.model_validate(cfg)
        self.index = index
        _set_threads(self.cfg.engine.num_threads)
        self.engine: Any = None
        self.env_factory = environment_factory(self.cfg.env.name, **self.cfg.env.kwargs)

    @ray.method(max_task_retries=-1)  # a worker that dies while loading is restarted and asked again
    def load_model(self, model: str | ModelFiles, version: int) -> dict[str, Any]:
        """Build the engine from ``model`` (a path or a blob) as weights ``version``; returns ``info()``."""
        from treeplay.engines import make_engine

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
    def niceness(self) -> int:
        """This process's Unix niceness (Ray starts its workers at 15; ``ray.lane_nice`` adds to it)."""
        return os.getpriority(os.PRIO_PROCESS, 0)

    @ray.method(max_task_retries=-1)
    def fingerprint(self) -> str | None:
        """A hash of the served weights (engines that expose ``state_dict``), to compare workers."""
        from treeplay.learners.checkpoints import fingerprint

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

    def rollout(self, tasks: list, iteration: int, version: int,
                seed: int) -> tuple[list, dict[str, float], tuple[float, float]]:
        """Run the configured rollout mode on ``tasks``; refuses to run on the wrong weights. Returns
        the results, their stats and when (wall clock) the chunk started and finished here.

        The whole chunk runs on one version: weights are loaded by ``apply_weights``, a separate
        call, and an actor runs one call at a time, so new weights can only arrive between chunks.
        """
        from treeplay.orchestrator.rollouts import run_rollouts

        engine = self._engine()
        if engine.version != version:
            raise RuntimeError(f"worker {self.index} serves version {engine.version}, loop expects {version}")
        started, t0 = time.time(), time.perf_counter()
        results, stats = run_rollouts(self.cfg, tasks, engine, self.env_factory, iteration=iteration, seed=seed)
        stats["rollout_s"] = time.perf_counter() - t0
        return results, stats, (started, time.time())

    def evaluate(self, tasks: list, temperature: float) -> list[float]:
        from treeplay.orchestrator.rollouts import evaluate

        return evaluate(self.cfg, tasks, self._engine(), self.env_factory, temperature=temperature)


@ray.remote(max_restarts=-1, max_task_retries=0)
class RolloutWorker(PolicyHost):
    """A rollout worker: runs chunks of rollouts (and, in a synchronous run, its share of the
    held-out evaluation)."""


@ray.remote(max_restarts=-1, max_task_retries=0)
class Evaluator(PolicyHost):
    """Held-out evaluation of each new weights version in a pipelined run, apart from the rollout
    workers so that evaluating never holds up rollouts (its own process title, ``ray::Evaluator``),
    at the lower CPU priority of ``ray.lane_nice``."""

    def __init__(self, cfg: dict[str, Any], index: int) -> None:
        super().__init__(cfg, index)
        lane_priority(self.cfg)


@ray.remote(max_restarts=0)
class LearnerActor:
    """Holds the learner: reads preference data from the store, trains, checkpoints, returns weights.

    ``model`` is the run's starting model or, when resuming, a checkpoint with its ``trainer/``
    state, which the learner continues from. ``reference`` (resuming with a fixed reference) is the
    model that reference came from; ``reference_uri`` names it in the checkpoints.
    """

    def __init__(self, cfg: dict[str, Any], model: str | ModelFiles, run_id: int, version: int,
                 reference: str | ModelFiles | None = None, reference_uri: str | None = None) -> None:
        from treeplay.learners import make_learner
        from treeplay.orchestrator.config import RunConfig
        from treeplay.store.database import open_store

        self.cfg = RunConfig.model_validate(cfg)
        _set_threads(self.cfg.engine.num_threads)
        lane_priority(self.cfg)  # pipelined: the rollouts come first on shared cores
        self.model_dir = _materialise(model, "treeplay-learner-")
        self.learner = make_learner(self.cfg, self.model_dir)
        self._env: Any = None  # built on first use: only a learner that needs_tasks asks for tasks
        self.learner.use_reference(
            _materialise(reference, "treeplay-reference-") if reference is not None else None, reference_uri)
        self.learner.restore_checkpoint(self.model_dir)
        self.store = open_store(self.cfg.store.url)
        self.run_id = run_id
        self.version = version

    @ray.method(num_returns=2)
    def train(self, iteration: int, checkpoint_dir: str | None) -> tuple[dict[str, Any], WeightsPayload | None]:
        """Train on this iteration's data (plus replay); return metrics and the new weights, or None
        when there is no update: no data the learner can use, or an update the guard rails rejected
        (NaN/inf, exploding gradients). Then ``no_update_reason`` says which, and the old weights
        (and the learner's whole training state) stay. A learner that ``needs_tasks`` (SLHF's oracle
        verifies answers against them) is told the tasks of the iteration and its replay window,
        drawn here from the config as the driver drew them."""
        from treeplay.agents.registry import make_environment
        from treeplay.orchestrator.schedule import window_tasks
        from treeplay.store import queries

        if self.learner.needs_tasks:
            if self._env is None:
                self._env = make_environment(self.cfg.env.name, **self.cfg.env.kwargs)
            self.learner.know_tasks(window_tasks(self.cfg, self._env, iteration, self.cfg.learner.replay))
        t0 = time.perf_counter()
        data = queries.preference_data(self.store, self.run_id, iteration, replay=self.cfg.learner.replay)
        # The staleness bound (rollout.max_staleness): this iteration's data may be at most that many
        # versions behind the weights being trained; older rows are refused and counted.
        data, staleness = within_staleness(data, iteration, self.version, self.cfg.rollout.max_staleness)
        staleness["learner_version"] = float(self.version)
        data, reason = usable_data(self.learner.trains_on, canonical_order(data), self.cfg.learner.algorithm.upper())
        if reason is not None:
            if staleness["stale_refused"]:
                reason += f"; {int(staleness['stale_refused'])} rows refused as older than the staleness bound"
            return {"learn_s": time.perf_counter() - t0, "pairs": 0.0, "rejected_update": 0.0,
                    "no_update_reason": reason, **staleness}, None
        if self.cfg.learner.control == "shuffle":
            data = shuffled_control(data, seed=derive_seed(self.cfg.seed, iteration, stream="shuffle"))
        metrics, deployable = train_guarded(self.learner, data, self.cfg.learner.max_update_ratio)
        metrics.update(staleness)
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

    def niceness(self) -> int:
        """This process's Unix niceness (what ``ray.lane_nice`` made of it)."""
        return os.getpriority(os.PRIO_PROCESS, 0)


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


def start_ray(cfg: Any) -> None:
    """Join the run's cluster (``ray.address``) or start a local one for it; nothing if Ray is up.

    A local cluster gets at least the CPUs the run's actors ask for (Ray's CPUs are logical: the OS
    shares the cores); otherwise the learner would wait forever for a free CPU. Its GPUs are the ones
    Ray finds on this machine.
    """
    import math

    wanted = cfg.rollout.num_workers * cfg.ray.worker_num_cpus + cfg.ray.learner_num_cpus
    if cfg.rollout.max_staleness > 0:
        wanted += cfg.ray.evaluator_num_cpus
    init_ray(cfg.ray.address, cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(wanted)))


def check_cluster(cfg: Any) -> None:
    """Start or join Ray for the run (``start_ray``) and refuse at once a run whose actors the cluster
    can never place (``placement.check_placeable``), before anything of the run is written.

    Raises:
        PlacementError: a ValueError whose one-line message says what the config asks for and what
            the cluster has.
    """
    from treeplay.orchestrator.placement import check_placeable

    start_ray(cfg)
    check_placeable(cfg.ray, cfg.rollout.num_workers, evaluator=cfg.rollout.max_staleness > 0)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- fleet
@dataclass
class ChunkDone:
    """A chunk of rollouts that came back: which chunk, its results and stats, which worker ran it
    and on which weights version (one version for the whole chunk)."""

    chunk: int
    results: list
    stats: dict[str, float]
    worker: int
    version: int
    sent: float = 0.0  # wall-clock times (time.time()): when the driver sent the chunk,
    started: float = 0.0  # when the worker began it,
    finished: float = 0.0  # and when it was done


EVALUATOR = "evaluator"  # the evaluator's key among the actors whose served version the fleet tracks


class Fleet:
    """The Ray side of one run: places and starts the actors, streams rollout chunks to the workers,
    trains, deploys weights, evaluates, and stops them all.

    The loop (``orchestrator/loop.py``) decides what to run and writes what comes back; it never
    touches Ray itself. ``pipelined`` (``rollout.max_staleness > 0``) changes two things: new weights
    are not pushed to every worker at once but picked up by each worker before its next chunk
    (``ensure_version``), and held-out evaluation runs on an ``Evaluator`` actor of its own. The loop
    may then call ``train``/``redeploy``/``evaluate`` from one thread while ``stream`` runs in another.
    """

    def __init__(self, cfg: Any, model: Path, version: int, run_id: int,
                 reference: Path | None = None, reference_uri: str | None = None) -> None:
        """``model``: the starting model or a checkpoint; ``reference``: the model a resumed learner's
        fixed reference is (None: the learner copies ``model``); ``reference_uri``: where the
        reference came from, recorded in checkpoints (default: ``model``'s URI)."""
        from treeplay.learners.checkpoints import TRAINER_DIR
        from treeplay.orchestrator.placement import place_actors

        self.cfg = cfg
        self.pipelined = cfg.rollout.max_staleness > 0
        start_ray(cfg)
        # The model travels through the object store once (no shared paths between nodes). Held for
        # the run's lifetime: a rollout worker that Ray restarts is sent it again (ensure_version).
        # Workers get the weights only; the learner also gets a checkpoint's training state.
        self.model_ref = model_ref = ray.put(ModelFiles.pack(model, skip=(TRAINER_DIR,)))
        learner_model = ray.put(ModelFiles.pack(model)) if (model / TRAINER_DIR).is_dir() else model_ref
        reference_ref = ray.put(ModelFiles.pack(reference, skip=(TRAINER_DIR,))) if reference is not None else None
        reference_uri = reference_uri or Path(model).resolve().as_uri()
        cfg_dict = cfg.model_dump(mode="json")
        # On a cluster: learner and rollout workers in their own bundles, spread over nodes
        # (orchestrator/placement.py); on one machine: plain CPU/GPU requests.
        self.placement = place_actors(cfg.ray, cfg.rollout.num_workers, evaluator=self.pipelined)
        self.workers = [
            # No model in the constructor: Ray re-runs it on restart, so it would have to keep the
            # blob pinned as a constructor argument (and logs an error saying so); load_model instead.
            RolloutWorker.options(**self.placement.worker(i)).remote(cfg_dict, i)
            for i in range(cfg.rollout.num_workers)
        ]
        self.evaluator = (Evaluator.options(**self.placement.evaluator).remote(cfg_dict, cfg.rollout.num_workers)
                          if self.pipelined else None)
        self.learner = LearnerActor.options(**self.placement.learner).remote(
            cfg_dict, learner_model, run_id, version, reference_ref, reference_uri)
        # The weights to serve: (version, payload ref; None = the initial model). One tuple, replaced
        # whole, so a thread that reads it never sees one version's number with another's payload.
        self._served: tuple[int, Any] = (version, None)
        self.model_version = version  # the version model_ref holds, sent again to restarted workers
        hosts = [*self.workers, *([self.evaluator] if self.evaluator is not None else [])]
        refs = [h.load_model.remote(model_ref, version) for h in hosts] + [self.learner.ping.remote()]
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=cfg.ray.startup_timeout_s)
        if waiting:
            raise RuntimeError(
                f"{len(waiting)} of {len(refs)} actors did not start within {cfg.ray.startup_timeout_s:.0f}s; the "
                f"cluster has {ray.available_resources()} free and the run asks for {cfg.rollout.num_workers} "
                f"workers x {{CPU: {cfg.ray.worker_num_cpus}, GPU: {cfg.ray.worker_num_gpus}}} + a learner "
                f"{{CPU: {cfg.ray.learner_num_cpus}, GPU: {cfg.ray.learner_num_gpus}}}")
        self.worker_info = ray.get(refs)[: len(self.workers)]
        # The version each actor serves, as the driver last made it (a restart shows as a mismatch).
        self.known: dict[Any, int | None] = {i: version for i in range(len(self.workers))}
        self.known[EVALUATOR] = version

    @property
    def version(self) -> int:
        """The newest weights version (what workers serve, or pick up before their next chunk)."""
        return self._served[0]

    @property
    def weights_ref(self) -> Any:
        """The newest weights payload in the object store (None while the initial model is served)."""
        return self._served[1]

    def worker_versions(self) -> list[int | None]:
        """The version each rollout worker serves, as the driver last saw it."""
        return [self.known[i] for i in range(len(self.workers))]

    # -- weights ----------------------------------------------------------------------------------
    def ensure_versions(self, keys: Iterable[Any]) -> None:
        """``ensure_version`` for several actors, asked in one round: all report their version at
        once, and only one that is behind, or was restarted since the driver last looked, goes
        through ``ensure_version`` (its own calls)."""
        keys = list(keys)
        version = self._served[0]
        actors = [self.evaluator if k == EVALUATOR else self.workers[k] for k in keys]
        reports = ray.get([a.info.remote() for a in actors])
        for key, report in zip(keys, reports, strict=True):
            if not (report["version"] == version == self.known[key]):
                self.ensure_version(key)

    def ensure_version(self, key: Any) -> tuple[int, bool]:
        """Bring rollout worker ``key`` (or the evaluator, ``EVALUATOR``) to the newest weights before
        its next call, and check what it reports.

        Returns:
            The version it serves now, and whether Ray had restarted it since the driver last looked
            (it came back without a model: it gets the starting one, then the newest weights).

        Raises:
            RuntimeError: The actor reports another version than the one it was just given.
        """
        actor = self.evaluator if key == EVALUATOR else self.workers[key]
        version, ref = self._served
        restarted = False
        # A few rounds: the actor may die again while it loads (``apply_weights`` then answers None
        # from the restarted process, which has no model yet), and must then start from the model.
        for _ in range(3):
            served = ray.get(actor.info.remote())["version"]
            restarted = restarted or served != self.known[key]
            if served is None:
                ray.get(actor.load_model.remote(self.model_ref, self.model_version))
                served = self.model_version
            if ref is not None and served != version:
                served = ray.get(actor.apply_weights.remote(ref))
            if served == version:
                self.known[key] = served
                return version, restarted
            if served is not None:
                raise RuntimeError(f"{'the evaluator' if key == EVALUATOR else f'worker {key}'} reports weights "
                                   f"version {served} after being given version {version}")
            restarted = True  # died while loading: round again
        raise RuntimeError(f"{'the evaluator' if key == EVALUATOR else f'worker {key}'} died 3 times in a row "
                           f"while loading weights version {version}")

    # -- rollouts ---------------------------------------------------------------------------------
    def stream(self, chunks: list[tuple[int, list, int]], iteration: int, tally: dict[str, float],
               say: Callable[[str], None] | None = None) -> Iterator[ChunkDone]:
        """Run ``chunks`` ((chunk index, tasks, seed) each) over the workers and yield each as it
        comes back (``ray.wait``), in whatever order they finish.

        A worker with nothing to do is first brought to the newest weights (``ensure_version``); each
        chunk runs on one version, which ``ChunkDone.version`` names. Up to ``rollout.chunks_per_worker``
        chunks wait in a worker's queue, so it starts the next one the moment one ends, without a round
        trip through the driver; a worker whose weights are behind gets no queued chunk, and takes the
        new version once its queue is empty, so a version never changes inside a chunk.
        A chunk whose worker died under it is run again, on the worker Ray restarted (after it got
        the model and the newest weights back): ``tally`` counts ``chunk_reruns`` and
        ``weights_reapplied``, and ``say`` is told. Nothing of a dead worker's chunk is ever yielded.
        """
        pending = list(chunks)
        in_flight: dict[Any, tuple[int, list, int, int, int, float]] = {}
        queued = [0] * len(self.workers)  # chunks sent to each worker and not yet back
        died: set[int] = set()  # workers that lost a chunk: nothing is queued on them until ensure_version
        depth = self.cfg.rollout.chunks_per_worker

        def send(w: int, version: int) -> None:
            c, ts, seed = pending.pop(0)
            queued[w] += 1
            ref = self.workers[w].rollout.remote(ts, iteration, version, seed)
            in_flight[ref] = (c, ts, seed, w, version, time.time())

        def dispatch() -> None:
            # First every idle worker, brought to the newest weights (a round trip to it, which is
            # free while it has nothing to do).
            for w in range(len(self.workers)):
                if pending and queued[w] == 0:
                    died.discard(w)
                    version, restarted = self.ensure_version(w)
                    tally["weights_reapplied"] = tally.get("weights_reapplied", 0.0) + restarted
                    send(w, version)
            # Then a chunk queued behind the running one, without asking the worker anything: only
            # while it serves the newest weights (a version change waits until it is idle, so it
            # happens between chunks) and while there is work left for every worker, so the last
            # chunks are not queued behind a busy worker while another stands idle.
            for w in range(len(self.workers)):
                while (pending and 0 < queued[w] < depth and w not in died and self.known[w] == self.version
                       and len(pending) >= len(self.workers)):
                    send(w, self.known[w])

        dispatch()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            c, ts, seed, w, version, sent = in_flight.pop(ready[0])
            queued[w] -= 1
            try:
                results, stats, (started, finished) = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                # The worker died (Ray restarts it): re-run its chunk; nothing of it was written. A
                # chunk queued behind it fails the same way and is re-run too.
                tally["chunk_reruns"] = tally.get("chunk_reruns", 0.0) + 1
                (say or _stderr)(f"worker {w} died ({type(e).__name__}); re-running chunk {c}")
                pending.insert(0, (c, ts, seed))
                died.add(w)
                dispatch()
                continue
            dispatch()
            yield ChunkDone(c, results, stats, w, version, sent, started, finished)

    # -- learning and weights -------------------------------------------------------------------
    def train(self, index: int, checkpoint_dir: str) -> tuple[dict[str, Any], bool]:
        """The learner trains on iteration ``index``'s data; on success its weights become the newest
        (``weights_ref``, version + 1). Without an update the metrics say why."""
        metrics_ref, weights_ref = self.learner.train.remote(index, checkpoint_dir)
        metrics = ray.get(metrics_ref)
        if metrics.get("no_update_reason"):
            return metrics, False
        # The payload stays in the object store: one copy for every worker.
        self._served = (self._served[0] + 1, weights_ref)
        return metrics, True

    def redeploy(self) -> float:
        """Deploy the newest weights. Synchronous: every worker loads them in place now, and mixed
        versions are refused. Pipelined: the evaluator loads them now; each rollout worker does
        before its next chunk (``stream``), so no chunk is cut in two."""
        t0 = time.perf_counter()
        if self.pipelined:
            self.ensure_version(EVALUATOR)
            return time.perf_counter() - t0
        version, ref = self._served
        versions = ray.get([w.apply_weights.remote(ref) for w in self.workers])
        for i, v in enumerate(versions):
            if v is None:  # restarted by Ray since we last looked: no model yet to load weights into
                versions[i], _ = self.ensure_version(i)
            self.known[i] = versions[i]
        if len(set(versions)) != 1 or versions[0] != version:
            raise RuntimeError(f"workers report mixed weight versions {versions}, expected {version}")
        return time.perf_counter() - t0

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, tasks: list, temperature: float) -> list[float]:
        """One outcome per held-out task on the newest weights: on the evaluator (pipelined), or split
        across the rollout workers."""
        if self.evaluator is not None:
            self.ensure_version(EVALUATOR)
            return ray.get(self.evaluator.evaluate.remote(list(tasks), temperature))
        n = len(self.workers)
        parts = [list(tasks[i::n]) for i in range(n)]
        self.ensure_versions(range(n))
        scores = ray.get([w.evaluate.remote(p, temperature) for w, p in zip(self.workers, parts, strict=True) if p])
        return [s for part in scores for s in part]

    def shutdown(self) -> None:
        for a in [*self.workers, self.learner, *([self.evaluator] if self.evaluator is not None else [])]:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self.placement.release()  # else a later Fleet in this driver cannot place its actors
