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
"""

from __future__ import annotations

import sys
import time
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


def place_actors(cfg: RayConfig, num_workers: int, timeout_s: float = 1800.0, evaluator: bool = False) -> Placement:
    """Reserve resources for the learner and ``num_workers`` rollout workers (Ray must be initialised),
    and with ``evaluator`` for the evaluator actor of a pipelined run, which goes with the learner
    (the two take turns: evaluate after each update). On a cluster bundle 0 then holds both.

    Raises:
        TimeoutError: the cluster could not host every actor within ``timeout_s`` (the message lists
            what was asked for and what the cluster has).
    """
    have = ray.cluster_resources()
    learner_b = _bundle(cfg.learner_num_cpus, cfg.learner_num_gpus, LEARNER_RESOURCE if LEARNER_RESOURCE in have else None)
    worker_b = _bundle(cfg.worker_num_cpus, cfg.worker_num_gpus, ROLLOUT_RESOURCE if ROLLOUT_RESOURCE in have else None)
    evaluator_b = _bundle(cfg.evaluator_num_cpus, cfg.evaluator_num_gpus, None) if evaluator else None
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
