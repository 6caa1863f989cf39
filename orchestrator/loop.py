"""The self-improvement loop: one run = a warm start and N iterations, each read top to bottom.

    run_loop -> run_iteration: tasks -> rollouts on RolloutWorkers (streamed back chunk by chunk)
    -> store (one transaction per chunk, each task whole or not at all) -> learn_and_record: learner
    on this iteration's data (+ replay) -> new weights into the object store ONCE -> every worker
    applies them in place and reports its version (mixed versions refused) -> held-out evaluation
    -> metrics -> finish the iteration.

With ``rollout.max_staleness`` > 0 ``learn_and_record`` runs on the ``Lane``'s thread while the next
iteration's rollouts run, and each worker picks up new weights before its next chunk.

No Ray here: the actors, their placement and the ``ray.wait`` streaming are ``orchestrator.workers.Fleet``.
What comes before the iterations (the starting model and its warm start, the checks made before a
run is recorded, resume's reference model) is ``orchestrator/run_start.py``; ``launch_run`` and
``resume_run``, at the end of this file, call it and then ``run_loop``.
The store is the record: ``resume`` reads the run's config, the finished iterations and the last
checkpoint from it, keeps the unfinished iteration's finished tasks, and carries on. A checkpoint holds
the learner's whole training state (optimizer, warm-up position, RNG states, which reference it
trains against), and rollouts and evaluations are seeded per chunk and per call, so a resumed run
reproduces the uninterrupted one. A rollout worker that dies is restarted by Ray; its chunk is re-run
after the current weights are re-applied, and the store refuses to write a task twice, so nothing is
lost or duplicated.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from treeplay.agents.base import Task
from treeplay.agents.registry import make_environment
from treeplay.orchestrator.config import RunConfig, experimental_notes, resume_config
from treeplay.orchestrator.inspector import DATA_VERSIONS
from treeplay.orchestrator.reporting import live_line, rollout_summary, worker_idle_s
from treeplay.orchestrator.run_start import (
    check_startable,
    console,
    free_name,
    resume_reference,
    warm_start_model,
)
from treeplay.orchestrator.schedule import chunk_seed, iteration_tasks
from treeplay.orchestrator.tracking import Trackers, check_installed
from treeplay.store import queries
from treeplay.store.database import Store, open_store
from treeplay.store.records import uri_to_path


@dataclass
class IterationReport:
    index: int
    version: int
    metrics: dict[str, float]
    timings: dict[str, float]


@dataclass
class RunReport:
    run_id: int
    name: str
    accuracy_before: float
    accuracy_after: float
    sample_accuracy_before: float
    sample_accuracy_after: float
    seconds: float
    iterations: list[IterationReport] = field(default_factory=list)
    plot: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "run_id": self.run_id,
            "accuracy_before": round(self.accuracy_before, 4),
            "accuracy_after": round(self.accuracy_after, 4),
            "sample_accuracy_before": round(self.sample_accuracy_before, 4),
            "sample_accuracy_after": round(self.sample_accuracy_after, 4),
            "iterations": len(self.iterations),
            "seconds": round(self.seconds, 1),
            "plot": self.plot,
        }


# -------------------------------------------------------------------------------------------- loop
class Loop:
    """One run's iterations as steps: rollout (chunks written as they come back), learn, redeploy,
    evaluate.

    The actors are the ``Fleet``'s (orchestrator/workers.py); this class decides what they run
    and writes what comes back to the store. Writes happen on a thread of their own, in the order
    the chunks came back, so neither the workers nor the driver wait for the database; ``flush``
    waits for an iteration's writes (the learner reads only after it).
    """

    def __init__(self, cfg: RunConfig, store: Store, run_id: int, model: Path, version: int,
                 reference: Path | None = None, reference_uri: str | None = None) -> None:
        """``model``: the starting model or a checkpoint; ``reference``: the model a resumed learner's
        fixed reference is (None: the learner copies ``model``); ``reference_uri``: where the
        reference came from, recorded in checkpoints (default: ``model``'s URI)."""
        from treeplay.orchestrator.workers import Fleet, lane_priority

        self.cfg, self.store, self.run_id = cfg, store, run_id
        # Absolute on the driver: the learner resolves paths on its own node and working directory.
        self.run_dir = (Path(cfg.output_dir) / cfg.name).resolve()
        self.fleet = Fleet(cfg, model, version, run_id, reference, reference_uri)
        # Pipelined: the writer thread yields the driver's core to rollouts (``ray.lane_nice``).
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="treeplay-store", initializer=lane_priority,
                                          initargs=(cfg, True))
        self._writes: dict[int, list[Future]] = defaultdict(list)
        self.store_s: dict[int, float] = defaultdict(float)  # seconds the writer spent per iteration
        self.data_versions: dict[int, Counter] = defaultdict(Counter)  # iteration -> {version: tasks}
        self.learning = ""  # what the learner is busy with (a pipelined run's progress line says it)

    @property
    def version(self) -> int:
        """The newest weights version (served by the workers, or picked up before their next chunk)."""
        return self.fleet.version

    @property
    def workers(self) -> list[Any]:
        return self.fleet.workers

    @property
    def worker_info(self) -> list[dict[str, Any]]:
        return self.fleet.worker_info

    @property
    def weights_ref(self) -> Any:
        return self.fleet.weights_ref

    # -- rollouts and store -----------------------------------------------------------------------
    def rollout(self, index: int, tasks: Sequence[Task], progress: Progress | None = None, flush: bool = True,
                check: Callable[[], None] | None = None) -> dict[str, float]:
        """Run ``tasks`` over the workers; each chunk's results go to the store as it comes back.

        ``flush``: return only once every result is written (else ``flush(index)`` waits for it).
        ``check`` is called after each chunk (the pipeline stops here if the learner's side failed).
        """
        done = queries.completed_task_ids(self.store, self.run_id, index)
        size = self.cfg.rollout.chunk_size
        # Chunks are fixed over the full task list, each with its own seed, so a resumed iteration
        # re-runs exactly the chunks it lacks. A chunk the crash left half-written is re-run whole:
        # a task's samples depend on the batch it was generated in, so only the same batch with the
        # same seed gives the remaining tasks the results the uninterrupted run got.
        chunks = [(c, list(tasks[i : i + size])) for c, i in enumerate(range(0, len(tasks), size))]
        pending = [(c, ts, chunk_seed(self.cfg.seed, index, c)) for c, ts in chunks if any(t.id not in done for t in ts)]
        if done:
            self.data_versions[index]["kept"] += len(done)  # written before a resume
        bar = progress.add_task(f"iter {index} rollouts", total=len(tasks), completed=len(done)) if progress else None
        tally = {"chunk_reruns": 0.0, "weights_reapplied": 0.0}
        stats, versions = [], []
        spans: dict[int, list[tuple[float, float]]] = defaultdict(list)  # worker -> (started, finished) per chunk
        t_roll = time.perf_counter()
        for chunk in self.fleet.stream(pending, index, tally, say=lambda m: console.print(f"[yellow]{m}[/]")):
            # Chunks are disjoint and a failed chunk wrote nothing, so `done` (read once, for resume)
            # plus what this loop wrote is the whole truth; the store rejects a double write anyway.
            fresh = [r for r in chunk.results if r.task_id not in done]
            done.update(r.task_id for r in fresh)
            self._writes[index].append(self._writer.submit(self._write, index, fresh))
            self.data_versions[index][chunk.version] += len(fresh)
            stats.append(chunk.stats)
            versions.append(chunk.version)
            spans[chunk.worker].append((chunk.started, chunk.finished))
            if progress is not None:
                line = live_line(index, stats, time.perf_counter() - t_roll, self.fleet.worker_versions(), self.learning)
                progress.update(bar, advance=len(fresh), description=line)
            if check is not None:
                check()
        out = rollout_summary(stats)
        # No chunk ran (a resume found every task written): no figures at all, so an iteration
        # recorded again keeps the rollout figures its first recording logged (not zeros over them).
        if versions:  # the weights versions this iteration's chunks ran on
            out["chunk_reruns"] = tally["chunk_reruns"]  # chunks whose worker died under them, run again
            out["weights_reapplied"] = tally["weights_reapplied"]  # restarted workers brought back to the served version
            out["version_min"], out["version_max"] = float(min(versions)), float(max(versions))
            out["worker_idle_s"] = worker_idle_s(spans)
        if flush:
            self.flush(index)
        return out

    def _write(self, index: int, results: list) -> None:
        t0 = time.perf_counter()
        queries.write_task_results(self.store, self.run_id, index, results)
        self.store_s[index] += time.perf_counter() - t0

    def flush(self, index: int) -> float:
        """Wait until every chunk of iteration ``index`` handed to the writer is in the store; a
        failed write raises here. Returns the seconds waited."""
        t0 = time.perf_counter()
        for f in self._writes.pop(index, []):
            f.result()
        return time.perf_counter() - t0

    # -- learning and redeploy ------------------------------------------------------------------
    def learn(self, index: int) -> tuple[dict[str, Any], bool]:
        """Train on the store's data (once this iteration's writes are in); on success the new
        weights become the ones to serve. Without an update the metrics say why
        (``no_update_reason``)."""
        self.flush(index)
        return self.fleet.train(index, str(self.run_dir / "checkpoints"))

    def redeploy(self) -> float:
        """Deploy the new weights: to every worker now (synchronous; mixed versions are refused), or
        to the evaluator now and to each worker before its next chunk (pipelined)."""
        return self.fleet.redeploy()

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, tasks: Sequence[Task], temperature: float) -> float:
        if not tasks:
            return 0.0
        flat = self.fleet.evaluate(list(tasks), temperature)
        return sum(flat) / len(flat)

    def shutdown(self) -> None:
        self._writer.shutdown(wait=True)  # what came back is written before the actors go
        self.fleet.shutdown()


class Lane:
    """Runs the second half of each iteration (learn, redeploy, evaluate, record) in iteration order:
    inline when ``background`` is False (a synchronous run), otherwise on one thread of its own,
    so that the driver goes on with the next iteration's rollouts meanwhile.
    """

    def __init__(self, background: bool) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="treeplay-learner") if background else None
        self.futures: dict[int, Future] = {}

    def submit(self, index: int, work: Callable[[], None]) -> None:
        if self.executor is None:
            work()
        else:
            self.futures[index] = self.executor.submit(work)

    def wait_for(self, index: int) -> float:
        """Block until the second halves of iterations up to ``index`` are done (re-raising the
        first error); returns the seconds waited."""
        t0 = time.perf_counter()
        for i in sorted(self.futures):
            if i <= index:
                self.futures.pop(i).result()
        return time.perf_counter() - t0

    def check(self) -> None:
        """Raise now if a second half already failed (rather than after the current rollouts)."""
        for f in list(self.futures.values()):
            if f.done() and f.exception() is not None:
                raise f.exception()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)


def _print_iteration(rep: IterationReport) -> None:
    m = rep.metrics
    staleness = f", data staleness <= {int(m['learn/staleness_max'])}" if m.get("learn/staleness_max") else ""
    console.print(
        f"[bold]iteration {rep.index}[/] v{rep.version}: greedy acc {m.get('eval/accuracy_before', 0):.3f} -> "
        f"[bold green]{m.get('eval/accuracy_greedy', 0):.3f}[/], sample acc {m.get('eval/accuracy_sample', 0):.3f}, "
        f"pairs {int(m.get('rollout/pairs', 0))}, loss {m.get('learn/loss', float('nan')):.3f}{staleness}, "
        f"{rep.timings.get('wall_s', sum(rep.timings.values())):.1f}s"
    )


@contextmanager
def _stop_recorded(store: Store, run_id: int) -> Iterator[None]:
    """A run that stops on an exception is marked "failed" with the reason ("interrupted" on Ctrl+C)
    instead of staying "running" for ever; ``treeplay status`` shows both."""
    try:
        yield
    except BaseException as e:
        interrupted = not isinstance(e, Exception)
        message = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
        reason = f"{type(e).__name__}: {message}" if message else type(e).__name__
        try:
            if queries.get_run(store, run_id).status == queries.RUNNING:  # not after it finished "done"
                queries.finish_run(store, run_id, "interrupted" if interrupted else "failed", reason)
        except Exception:  # noqa: BLE001 - the store may be what failed; the original error matters more
            pass
        raise


def _records_stop(run: Callable[..., RunReport]) -> Callable[..., RunReport]:
    """``run_loop``: a run being resumed after it "failed" or was "interrupted" is "running" again,
    and how it stops this time is recorded (``_stop_recorded``)."""

    @functools.wraps(run)
    def wrapper(cfg: RunConfig, run_id: int, store: Store, *args: Any, **kwargs: Any) -> RunReport:
        if queries.get_run(store, run_id).status != queries.RUNNING:
            queries.reopen_run(store, run_id)
        with _stop_recorded(store, run_id):
            return run(cfg, run_id, store, *args, **kwargs)

    return wrapper


@dataclass
class RunState:
    """What the iterations of one run pass on to each other (in iteration order, on the lane)."""

    acc: float  # held-out greedy accuracy of the newest evaluated version
    acc_sample: float
    resume_checkpoint: Any = None  # the newest checkpoint when the run (re)started
    reports: list[IterationReport] = field(default_factory=list)
    last_record: float = field(default_factory=time.perf_counter)  # when the previous iteration was recorded
    trackers: Trackers = field(default_factory=Trackers)  # dashboards mirroring each recorded iteration


@_records_stop
def run_loop(cfg: RunConfig, run_id: int, store: Store, model: Path, start_version: int = 0,
             t_start: float | None = None, reference: Path | None = None,
             reference_uri: str | None = None) -> RunReport:
    """Run (or continue) the iterations of a run whose model is ready (``run_iteration`` for one).

    With ``rollout.max_staleness`` k > 0 the iterations overlap: iteration i's rollouts start as
    soon as iteration i-1's are in and iteration i-1-k has learned and deployed its weights, while
    the learner, the redeploy and the evaluation of earlier iterations run on the lane's thread.
    So the workers' weights are never more than k versions behind the learner's.
    """
    t_start = t_start or time.perf_counter()
    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    held_out = env.tasks(cfg.eval.split, cfg.eval.tasks, seed=cfg.seed)
    loop = Loop(cfg, store, run_id, model, start_version, reference, reference_uri)
    lane = Lane(background=cfg.rollout.max_staleness > 0)
    finished = set(queries.finished_iterations(store, run_id))
    trackers = Trackers.from_config(cfg, run_id, store.url, fresh=not finished)  # dashboards (docs/tracking.md)
    try:
        acc = loop.evaluate(held_out, 0.0)
        acc_sample = loop.evaluate(held_out, cfg.eval.sample_temperature)
        acc_before_run = _first_accuracy(store, run_id, "eval/accuracy_greedy", acc)
        sample_before_run = _first_accuracy(store, run_id, "eval/accuracy_sample", acc_sample)
        if not finished and not queries.metric_series(store, run_id):
            # Iteration -1 holds the warm-started policy's figures (the first point of the curve).
            queries.log_metrics(store, run_id, -1, {"eval/accuracy_greedy": acc, "eval/accuracy_sample": acc_sample})
        console.print(f"held-out greedy accuracy at v{loop.version}: [bold]{acc:.3f}[/] (T={cfg.eval.sample_temperature} samples: {acc_sample:.3f})")
        run = RunState(acc, acc_sample, queries.latest_checkpoint(store, run_id), trackers=trackers)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            for index in range(cfg.iterations):
                if index in finished:
                    continue
                # The staleness bound: these rollouts may start once iteration index-1-k has learned
                # and deployed (k = 0: the previous iteration is wholly done).
                waited = lane.wait_for(index - 1 - cfg.rollout.max_staleness)
                run_iteration(cfg, loop, lane, env, held_out, index, run, progress, waited)
            lane.wait_for(cfg.iterations)
    finally:
        lane.close()
        loop.shutdown()
        trackers.close()
    queries.finish_run(store, run_id, "done")
    plot = plot_learning_curve(store, run_id, Path(cfg.output_dir) / cfg.name / "learning_curve.png", cfg.name)
    return RunReport(run_id, cfg.name, acc_before_run, run.acc, sample_before_run, run.acc_sample,
                     time.perf_counter() - t_start, run.reports, plot)


def run_iteration(cfg: RunConfig, loop: Loop, lane: Lane, env: Any, held_out: Sequence[Task], index: int,
                  run: RunState, progress: Progress | None = None, waited: float = 0.0) -> None:
    """One iteration, top to bottom: rollout, store, learn, redeploy, evaluate, record.

    Rollout and store happen here; the rest (``learn_and_record``) goes to the lane, which runs it
    at once in a synchronous run, or on its own thread in a pipelined one while the driver starts
    the next iteration's rollouts. ``waited``: seconds the rollouts waited for the staleness bound.
    """
    timings = {"wait_s": waited}
    queries.start_iteration(loop.store, loop.run_id, index, loop.version)
    tasks = iteration_tasks(cfg, env, index)
    ckpt = run.resume_checkpoint
    if ckpt is not None and ckpt.iteration == index:
        # Resumed after this iteration's update was saved (rollouts were all written before learning
        # began): only evaluation and bookkeeping are left.
        loop.data_versions[index]["kept"] = len(queries.completed_task_ids(loop.store, loop.run_id, index))
        lane.submit(index, functools.partial(learn_and_record, cfg, loop, env, held_out, index, tasks, {}, timings,
                                             run, ckpt))
        return

    # Rollout and store: chunks stream back from the workers and are written as they come (in the
    # background; the learner waits for the last write).
    t = time.perf_counter()
    roll = loop.rollout(index, tasks, progress, flush=False, check=lane.check)
    timings["rollout_s"] = time.perf_counter() - t

    # Learn, redeploy, evaluate, record.
    lane.submit(index, functools.partial(learn_and_record, cfg, loop, env, held_out, index, tasks, roll, timings, run))


def learn_and_record(cfg: RunConfig, loop: Loop, env: Any, held_out: Sequence[Task], index: int,
                     tasks: Sequence[Task], roll: dict[str, float], timings: dict[str, float], run: RunState,
                     resumed: Any = None) -> None:
    """The second half of iteration ``index``: learn on its data, deploy the new weights, evaluate
    them, record the iteration. ``resumed``: the checkpoint this iteration's update was saved in
    before the run stopped (then only evaluation and bookkeeping are left)."""
    store, run_id = loop.store, loop.run_id
    before = run.acc
    if resumed is not None:
        # The learner's metrics were saved with the checkpoint; the accuracy "before" is the
        # previous version's, not that of the checkpoint being served now.
        learn, updated = {**(resumed.metrics or {}), "resumed_after_learn": 1.0}, False
        before = _accuracy_before(store, run_id, index, before)
    else:
        # Learn on this iteration's data (plus the replay window), once all of it is in the store.
        timings["store_wait_s"] = loop.flush(index)
        timings["store_s"] = loop.store_s.pop(index, 0.0)
        versions = [v for v in loop.data_versions.get(index, {}) if v != "kept"]
        if versions:
            loop.learning = (f"learner: iter {index} at v{loop.version} on data from v{min(versions)}"
                             + (f"-v{max(versions)}" if max(versions) != min(versions) else "")
                             + f" (staleness <= {loop.version - min(versions)})")
        t = time.perf_counter()
        learn, updated = loop.learn(index)
        timings["learn_s"] = time.perf_counter() - t

    # Redeploy the new weights (if any).
    loop.learning = f"learner: evaluating v{loop.version}" if loop.fleet.pipelined else ""
    timings["redeploy_s"] = loop.redeploy() if updated else 0.0
    if not updated and resumed is None:
        console.print(f"[yellow]iteration {index}: no update deployed ({_why_not(learn)}); keeping v{loop.version}[/]")

    # Evaluate the newest policy on the held-out tasks.
    t = time.perf_counter()
    acc = loop.evaluate(held_out, 0.0)
    acc_sample = loop.evaluate(held_out, cfg.eval.sample_temperature)
    timings["eval_s"] = time.perf_counter() - t
    loop.learning = ""

    # Record: metrics, then the iteration row (which also says, in words, why nothing was deployed,
    # and which weights versions its data came from).
    now = time.perf_counter()
    timings["wall_s"] = now - run.last_record  # wall-clock since the previous iteration was recorded
    run.last_record = now
    metrics = {f"rollout/{k}": float(v) for k, v in roll.items()}
    metrics.update({f"learn/{k}": float(v) for k, v in learn.items() if isinstance(v, (int, float))})
    metrics.update({"eval/accuracy_before": before, "eval/accuracy_greedy": acc,
                    "eval/accuracy_sample": acc_sample, "policy_version": float(loop.version)})
    metrics.update({f"time/{k}": v for k, v in timings.items()})
    queries.log_metrics(store, run_id, index, metrics)
    row: dict[str, Any] = dict(metrics)
    if not updated and resumed is None:
        row["learn/no_update_reason"] = _why_not(learn)
    if index in loop.data_versions:  # {version: tasks rolled out on it, "kept": tasks from before a resume}
        counts = loop.data_versions.pop(index)
        row[DATA_VERSIONS] = {str(v): counts[v] for v in sorted(counts, key=lambda v: (isinstance(v, str), v))}
    queries.finish_iteration(store, run_id, index, metrics=row, timings=timings)
    run.trackers.log_iteration(index, row)  # a mirror of what was just recorded (orchestrator/tracking.py)
    run.acc, run.acc_sample = acc, acc_sample
    rep = IterationReport(index, loop.version, metrics, timings)
    run.reports.append(rep)
    _print_iteration(rep)


def _why_not(learn: dict[str, Any]) -> str:
    return str(learn.get("no_update_reason") or learn.get("last_skip_reason")
               or "update rejected by the learner's guard rails")


def _accuracy_before(store: Store, run_id: int, index: int, default: float) -> float:
    """The held-out greedy accuracy recorded last before iteration ``index`` (the warm start's at -1)."""
    points = [v for i, v in queries.metric_series(store, run_id).get("eval/accuracy_greedy", []) if i < index]
    return points[-1] if points else default


def _first_accuracy(store: Store, run_id: int, key: str, default: float) -> float:
    """The warm-started policy's figure (iteration -1), also when this process is a resume."""
    series = queries.metric_series(store, run_id).get(key, [])
    return series[0][1] if series and series[0][0] == -1 else default


def plot_learning_curve(store: Store, run_id: int, path: Path, title: str | None = None) -> str | None:
    """Held-out accuracy (greedy and sampled) per policy version, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = queries.metric_series(store, run_id)
    greedy, sample = series.get("eval/accuracy_greedy", []), series.get("eval/accuracy_sample", [])
    if not greedy:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    # x = iterations completed: -1 (the warm start) plots at 0, iteration i at i + 1.
    ax.plot([i + 1 for i, _ in greedy], [v for _, v in greedy], marker="o", label="greedy (T=0)")
    if sample:
        ax.plot([i + 1 for i, _ in sample], [v for _, v in sample], marker="s", label="sampled (T=1)")
    ax.set_xlabel("iterations completed (0 = warm start)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{title or f'run {run_id}'}: held-out accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------ entry points
def launch_run(cfg: RunConfig) -> RunReport:
    """A new run: checks, store row, model (warm start), then the iterations.

    Nothing is written before the trackers' packages, the environment, the model path, the store and the
    output folder have been checked (``check_startable``), and Ray has been started or joined and can place the
    run's actors (``check_cluster``); a run that fails after its row exists is marked "failed".
    """
    from treeplay.orchestrator.workers import check_cluster

    t0 = time.perf_counter()
    check_installed(cfg)  # a configured tracker's package, before the store is even opened
    store = open_store(cfg.store.url)
    cfg = cfg.model_copy(update={"name": free_name(store, cfg.name)})
    check_startable(cfg)
    check_cluster(cfg)  # a config the cluster can never place fails here, not after the startup timeout
    for note in experimental_notes(cfg):
        console.print(f"[yellow]{note}[/]")
    run_dir = Path(cfg.output_dir) / cfg.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output_dir: cannot create '{run_dir}': {e.strerror or e}") from None
    run_id = queries.start_run(store, cfg.name, cfg.model_dump(mode="json"))
    with _stop_recorded(store, run_id):
        model, ws = warm_start_model(cfg, run_dir)
        if ws:
            console.print(f"warm start: {cfg.warm_start.steps} steps, loss {ws['loss']:.3f}, {ws['seconds']:.1f}s")
            queries.log_metrics(store, run_id, None, {"warm_start/loss": ws["loss"], "warm_start/seconds": ws["seconds"]})
        queries.record_checkpoint(store, run_id, -1, 0, Path(model).resolve().as_uri(), ws or None)
        return run_loop(cfg, run_id, store, Path(model), 0, t0)


def resume_run(run: str | int, store_url: str, overrides: list[str] | None = None) -> RunReport:
    """Carry on a run from the store: finished iterations are kept, the rest are run.

    The stored config holds no credentials, so the run goes on with ``store_url`` (password and
    all, or one libpq completes from PGPASSWORD / .pgpass) for every actor, and ``overrides``
    (``key=value``) give the values that were redacted when it was stored (``resume_config``).
    """
    from treeplay.orchestrator.workers import check_cluster

    t0 = time.perf_counter()
    store = open_store(store_url)
    info = queries.get_run(store, run)
    cfg = resume_config(info.config, store_url, overrides)
    check_startable(cfg, starting_model=False)
    check_installed(cfg)
    ckpt = queries.latest_checkpoint(store, info.id)
    if ckpt is None:
        raise ValueError(f"run '{info.name}' has no checkpoint to resume from")
    model = uri_to_path(ckpt.uri)
    if not (model / "config.json").is_file():
        raise ValueError(f"checkpoint v{ckpt.policy_version} of run '{info.name}' is not a model directory: {model}")
    check_cluster(cfg)  # before the run is reopened
    console.print(f"resuming run '{info.name}' at policy v{ckpt.policy_version} from {model}")
    reference, reference_uri = resume_reference(model, ckpt.policy_version)
    return run_loop(cfg, info.id, store, model, ckpt.policy_version, t0, reference, reference_uri)


def final_line(report: RunReport) -> str:
    return json.dumps(report.summary())
