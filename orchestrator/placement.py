"""Where a run's actors go: the learner on its own reserved resources, rollout workers spread over nodes.

    placement = place_actors(cfg.ray, cfg.rollout.num_workers)
    learner = LearnerActor.options(**placement.learner).remote(...)
    workers = [RolloutWorker.options(**placement.worker(i)).remote(...) for i in range(n)]

One machine (a single Ray node): every actor just asks for its configured CPUs/GPUs; nothing is
reserved, nothing changes.

A cluster (two or more nodes): one placement group with strategy SPREAD holds bundle 0 for the learner
(and a pipelined run's evaluator) and bundle 1 + i for rollout worker i. The group is gang-scheduled, so a run starts only once every
actor has a place (an autoscaling cluster sees the whole demand at once and adds nodes for it), and
the learner's resources are reserved apart from the rollouts'. SPREAD puts the rollout bundles on
different nodes while there are nodes to spare, and, being soft, lets Ray re-place the bundle of a
lost node on any node that still has room: a RolloutWorker restarted after its node died
(``max_restarts=-1``) comes back there, and the loop re-runs its chunk. STRICT_SPREAD would leave such
a worker waiting for a brand-new node. See docs/cluster.md.

Node roles come from custom resources that ray_cluster.yaml gives the node types: ``rollout`` (rollout
worker slots of a node) and ``learner`` (learner slots). When the cluster advertises one, each actor of
that role asks for one unit of it, which pins rollouts and learner to their node types and tells the
autoscaler which type to add. A cluster without them (e.g. plain ``ray start`` hosts) places by
CPUs/GPUs alone.

Before anything is placed, ``check_placeable`` compares what the run asks for with what the cluster
has, and refuses a run that could never start with one line saying both (``PlacementError``), rather
than letting its actors wait for resources that do not exist. A cluster whose autoscaler adds nodes
on demand is told apart only by the config (``ray.wait_for_autoscaler``), see ``check_placeable``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from treeplay.orchestrator.config import RayConfig

ROLLOUT_RESOURCE = "rollout"
LEARNER_RESOURCE = "learner"


@dataclass
class Placement:
    """Actor options for one run, and the placement group behind them (None on one machine)."""

    learner: dict[str, Any]
    workers: list[dict[str, Any]]
    group: PlacementGroup | None = None
    bundles: list[dict[str, float]] = field(default_factory=list)
    evaluator: dict[str, Any] | None = None  # pipelined runs only

    def worker(self, index: int) -> dict[str, Any]:
        return self.workers[index]

    def release(self) -> None:
        """Give the reserved resources back (placement groups also end with the driver's job)."""
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def _bundle(cpus: float, gpus: float, role: str | None) -> dict[str, float]:
    bundle = {"CPU": float(cpus), "GPU": float(gpus)}
    if role:
        bundle[role] = 1.0
    return {k: v for k, v in bundle.items() if v > 0}


def _options(bundle: dict[str, float]) -> dict[str, Any]:
    """``.options()`` keywords asking for exactly ``bundle``."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    opts: dict[str, Any] = {"num_cpus": bundle.get("CPU", 0.0), "num_gpus": bundle.get("GPU", 0.0)}
    if custom:
        opts["resources"] = custom
    return opts


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _asks(cfg: RayConfig, have: Mapping[str, float], evaluator: bool) -> tuple[dict[str, float], dict[str, float],
                                                                                    dict[str, float] | None]:
    """The learner's, one rollout worker's and (pipelined) the evaluator's requests on a cluster that
    has ``have``: CPUs, GPUs, and one unit of the role resource where the cluster advertises it."""
    learner_b = _bundle(cfg.learner_num_cpus, cfg.learner_num_gpus, LEARNER_RESOURCE if LEARNER_RESOURCE in have else None)
    worker_b = _bundle(cfg.worker_num_cpus, cfg.worker_num_gpus, ROLLOUT_RESOURCE if ROLLOUT_RESOURCE in have else None)
    evaluator_b = _bundle(cfg.evaluator_num_cpus, cfg.evaluator_num_gpus, None) if evaluator else None
    return learner_b, worker_b, evaluator_b


class PlacementError(ValueError):
    """The Ray cluster can never hold the actors a run asks for (a one-line message that says what
    was asked and what the cluster has)."""


_EPS = 1e-9  # fractional GPUs: 0.1 + 0.2 must fit in 0.3


def _num(x: float) -> str:
    return f"{x:g}"


def _unit(resource: str, amount: float) -> str:
    one = _EPS < amount <= 1.0 + _EPS  # "0.5 GPU", "1 GPU", "0 GPUs", "2 GPUs"
    if resource in ("CPU", "GPU"):
        return resource if one else resource + "s"
    return f"'{resource}' slot" if one else f"'{resource}' slots"


def _hint(cfg: RayConfig, resource: str, evaluator: bool, cluster_gpus: float) -> str:
    """Which settings change what is asked for ``resource`` (``cluster_gpus``: the cluster's GPUs)."""
    if resource in ("CPU", "GPU"):
        suffix = resource.lower() + "s"
        keys = [f"ray.worker_num_{suffix}", f"ray.learner_num_{suffix}"]
        if evaluator:
            keys.append(f"ray.evaluator_num_{suffix}")
        hint = "lower " + " / ".join([*keys, "rollout.num_workers"])
        if resource == "GPU" and cluster_gpus <= 1.0 + _EPS:
            hint += ", or use configs/gpu-single.yaml on one GPU"
        elif cfg.address is None and cfg.num_cpus is not None:
            hint += ", or raise ray.num_cpus"
    else:
        hint = (f"nodes offer '{resource}' slots through their node type or `ray start --resources`: "
                f"add such nodes or lower rollout.num_workers")
    if cfg.address is not None:  # a cluster that was joined may have an autoscaler; a local one never has
        hint += "; if the cluster's autoscaler adds nodes, set ray.wait_for_autoscaler=true"
    return hint


def placement_problem(cfg: RayConfig, num_workers: int, evaluator: bool, total: Mapping[str, float],
                      nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why a cluster with resources ``total`` (``ray.cluster_resources()``) on ``nodes`` (each alive
    node's resources) can never place the learner, ``num_workers`` rollout workers and, with
    ``evaluator``, a pipelined run's evaluator; None when it may.

    Every actor lives for the whole run, so their requests add up. Two checks, not a full model of
    Ray's scheduler: each resource asked for in all must not exceed the cluster's total, and each
    single actor (the learner together with the evaluator: on a cluster they share one bundle) must
    fit on one node that has its role resource. A config that passes may still wait when the
    resources are spread badly over the nodes; one that fails can never start.
    """
    learner_b, worker_b, evaluator_b = _asks(cfg, total, evaluator)
    actors = [(f"{num_workers} rollout worker{'s' if num_workers != 1 else ''} x", num_workers, worker_b),
              ("learner", 1, learner_b)]
    if evaluator_b is not None:
        actors.append(("evaluator", 1, evaluator_b))
    custom = sorted({k for _, _, b in actors for k in b} - {"GPU", "CPU"})
    gpus = float(total.get("GPU", 0.0))
    for resource in ["GPU", "CPU", *custom]:
        asked = sum(n * b.get(resource, 0.0) for _, n, b in actors)
        have = float(total.get(resource, 0.0))
        if asked <= have + _EPS:
            continue
        terms = [f"{label} {_num(b[resource])} {_unit(resource, b[resource])}"
                 for label, n, b in actors if n and b.get(resource, 0.0) > 0]
        return (f"the config asks for {' + '.join(terms)} = {_num(asked)} {_unit(resource, asked)}; the Ray "
                f"cluster has {_num(have)} {_unit(resource, have)} ({_hint(cfg, resource, evaluator, gpus)})")
    together = dict(learner_b)
    if evaluator_b:
        together = {k: learner_b.get(k, 0.0) + evaluator_b.get(k, 0.0) for k in {*learner_b, *evaluator_b}}
    singles = [("one rollout worker", worker_b, ROLLOUT_RESOURCE),
               ("the learner and the evaluator" if evaluator_b else "the learner", together, LEARNER_RESOURCE)]
    for who, ask, role in singles[0 if num_workers else 1:]:
        role = role if role in ask else None
        hosts = [n for n in nodes if not role or float(n.get(role, 0.0)) >= ask[role] - _EPS]
        for resource in ("GPU", "CPU"):
            need = ask.get(resource, 0.0)
            biggest = max((float(n.get(resource, 0.0)) for n in hosts), default=0.0)
            if need > biggest + _EPS:
                where = f"the biggest Ray node with a '{role}' slot" if role else "the biggest Ray node"
                return (f"{who} asks for {_num(need)} {_unit(resource, need)} on one node; {where} has "
                        f"{_num(biggest)} {_unit(resource, biggest)} ({_hint(cfg, resource, evaluator, gpus)})")
    return None


def check_placeable(cfg: RayConfig, num_workers: int, evaluator: bool = False) -> None:
    """Refuse at once a run that the Ray cluster (Ray must be initialised) can never place.

    Without this, actors that ask for more than exists wait, and the run gives up only after
    ``ray.startup_timeout_s`` (one machine) or the placement group's 30 minutes (a cluster).

    ``ray.wait_for_autoscaler: true`` skips the check: an autoscaling cluster (ray_cluster.yaml)
    starts with fewer nodes than a run needs and adds them once the run asks. Whether a cluster can
    add nodes is not something its nodes tell: Ray's monitor runs on every head, with or without a
    launcher config behind it, and what it reports lives in Ray's private state. So the config says
    it, and the default is to check: a run on a fixed cluster, or on the local one-machine cluster
    that ``treeplay run`` starts (which never has an autoscaler), fails fast.

    Raises:
        PlacementError: What the config asks for, what the cluster has, and what to change (one line).
    """
    if cfg.wait_for_autoscaler:
        return
    nodes = [n.get("Resources", {}) for n in alive_nodes()]
    problem = placement_problem(cfg, num_workers, evaluator, ray.cluster_resources(), nodes)
    if problem is not None:
        raise PlacementError(problem)


def place_actors(cfg: RayConfig, num_workers: int, timeout_s: float = 1800.0, evaluator: bool = False) -> Placement:
    """Reserve resources for the learner and ``num_workers`` rollout workers (Ray must be initialised),
    and with ``evaluator`` for the evaluator actor of a pipelined run, which goes with the learner
    (the two take turns: evaluate after each update). On a cluster bundle 0 then holds both.

    Raises:
        PlacementError: the cluster can never host every actor (``check_placeable``).
        TimeoutError: the cluster could not host every actor within ``timeout_s`` (the message lists
            what was asked for and what the cluster has).
    """
    check_placeable(cfg, num_workers, evaluator)
    learner_b, worker_b, evaluator_b = _asks(cfg, ray.cluster_resources(), evaluator)
    bundles = [learner_b] + [dict(worker_b) for _ in range(num_workers)]
    if len(alive_nodes()) < 2 or not all(bundles):
        # One machine (or actors that ask for nothing, which a bundle cannot hold): plain requests.
        return Placement(_options(learner_b), [_options(worker_b) for _ in range(num_workers)],
                         evaluator=None if evaluator_b is None else _options(evaluator_b))
    if evaluator_b:
        bundles[0] = {k: bundles[0].get(k, 0.0) + evaluator_b.get(k, 0.0) for k in {*bundles[0], *evaluator_b}}

    group = placement_group(bundles, strategy="SPREAD", name="")
    started, next_note = time.monotonic(), 30.0
    while True:
        ready, _ = ray.wait([group.ready()], timeout=5.0)
        if ready:
            break
        waited = time.monotonic() - started
        if waited > timeout_s:
            remove_placement_group(group)
            raise TimeoutError(
                f"the cluster cannot place the learner {learner_b} and {num_workers} rollout workers "
                f"{worker_b} (cluster resources: {dict(ray.cluster_resources())})")
        if waited > next_note:
            print(f"waiting for cluster resources: learner {learner_b}, {num_workers} x rollout {worker_b} "
                  f"({waited:.0f}s)", file=sys.stderr, flush=True)
            next_note += 30.0

    def in_bundle(i: int, ask: dict[str, float] | None = None) -> dict[str, Any]:
        return {**_options(bundles[i] if ask is None else ask), "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=i, placement_group_capture_child_tasks=False)}

    return Placement(in_bundle(0, learner_b), [in_bundle(1 + i) for i in range(num_workers)], group, bundles,
                     evaluator=None if evaluator_b is None else in_bundle(0, evaluator_b))
