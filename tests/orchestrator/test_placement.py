"""A run the Ray cluster can never place is refused at once, in one line, before anything is written.

- configs/gpu-single.yaml shares one GPU between its rollout worker and its LoRA learner and fits a
  one-GPU machine; configs/gpu.yaml does not, and says so;
- the check itself (``placement_problem``): totals per resource (CPUs, GPUs, role slots), the
  evaluator of a pipelined run counted, fractional GPUs added without float trouble, one actor that
  is bigger than every node that could host it;
- on a real local Ray that has one GPU, ``treeplay run`` of a config asking for five fails within
  seconds with that line, and the store holds no run (it used to wait ``ray.startup_timeout_s``, 600 s,
  for actors that could never start).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from treeplay.orchestrator.config import load_config
from treeplay.orchestrator.placement import PlacementError, check_placeable, placement_problem
from treeplay.store import queries
from treeplay.store.database import open_store

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ONE_GPU_NODE = {"CPU": 16.0, "GPU": 1.0}
GPU_YAML_ON_ONE_GPU = ("the config asks for 4 rollout workers x 1 GPU + learner 1 GPU = 5 GPUs; the Ray cluster "
                       "has 1 GPU (lower ray.worker_num_gpus / ray.learner_num_gpus / rollout.num_workers, or use "
                       "configs/gpu-single.yaml on one GPU)")


def _problem(cfg, total, nodes=None):
    return placement_problem(cfg.ray, cfg.rollout.num_workers, cfg.rollout.max_staleness > 0, total,
                             [total] if nodes is None else nodes)


def test_gpu_single_yaml_shares_one_gpu_with_a_lora_learner_and_sqlite():
    cfg = load_config(CONFIGS / "gpu-single.yaml")
    asked = cfg.rollout.num_workers * cfg.ray.worker_num_gpus + cfg.ray.learner_num_gpus
    if cfg.rollout.max_staleness > 0:
        asked += cfg.ray.evaluator_num_gpus
    assert 0 < asked <= 1.0
    assert cfg.engine.kind == "vllm" and cfg.engine.kwargs["gpu_memory_utilization"] <= 0.5
    lora = cfg.learner.dpo.lora
    assert lora is not None and cfg.engine.kwargs["max_lora_rank"] >= lora.rank  # vLLM serves the adapter
    assert cfg.store.url.startswith("sqlite:")
    assert cfg.model.path and not cfg.warm_start.enabled
    assert _problem(cfg, ONE_GPU_NODE) is None


def test_gpu_yaml_on_one_gpu_is_one_line_saying_what_it_asks_and_what_there_is():
    cfg = load_config(CONFIGS / "gpu.yaml")
    assert _problem(cfg, ONE_GPU_NODE) == GPU_YAML_ON_ONE_GPU
    assert _problem(cfg, {"CPU": 24.0, "GPU": 5.0}) is None
    # Joining a cluster, which may have an autoscaler: the line says how to wait for it instead.
    joined = load_config(CONFIGS / "gpu.yaml", ["ray.address=auto"])
    line = _problem(joined, {"CPU": 24.0, "GPU": 2.0, "rollout": 1.0, "learner": 1.0})
    assert line.startswith("the config asks for 4 rollout workers x 1 GPU + learner 1 GPU = 5 GPUs; the Ray cluster "
                           "has 2 GPUs (")
    assert "ray.wait_for_autoscaler=true" in line and "gpu-single" not in line and "\n" not in line


def test_cpus_role_slots_and_the_pipelined_evaluator_add_up():
    cpus = load_config(None, ["rollout.num_workers=3", "ray.worker_num_cpus=2", "ray.learner_num_cpus=1",
                              "ray.num_cpus=4"])
    assert _problem(cpus, {"CPU": 4.0}) == (
        "the config asks for 3 rollout workers x 2 CPUs + learner 1 CPU = 7 CPUs; the Ray cluster has 4 CPUs "
        "(lower ray.worker_num_cpus / ray.learner_num_cpus / rollout.num_workers, or raise ray.num_cpus)")
    assert _problem(cpus, {"CPU": 7.0}) is None

    # A cluster that advertises rollout slots: one per worker.
    slots = load_config(None, ["rollout.num_workers=3", "ray.address=auto"])
    line = _problem(slots, {"CPU": 64.0, "rollout": 2.0, "learner": 1.0})
    assert line.startswith("the config asks for 3 rollout workers x 1 'rollout' slot = 3 'rollout' slots; the Ray "
                           "cluster has 2 'rollout' slots (")

    # Pipelined: the evaluator lives beside the learner for the whole run; fractions add up exactly.
    piped = load_config(None, ["rollout.max_staleness=1", "rollout.num_workers=3", "ray.worker_num_gpus=0.1",
                               "ray.learner_num_gpus=0.5", "ray.evaluator_num_gpus=0.2"])
    assert _problem(piped, {"CPU": 8.0, "GPU": 1.0}) is None
    more = load_config(None, ["rollout.max_staleness=1", "ray.learner_num_gpus=0.5", "ray.evaluator_num_gpus=0.6"])
    assert _problem(more, {"CPU": 8.0, "GPU": 1.0}).startswith(
        "the config asks for learner 0.5 GPU + evaluator 0.6 GPU = 1.1 GPUs; the Ray cluster has 1 GPU (lower "
        "ray.worker_num_gpus / ray.learner_num_gpus / ray.evaluator_num_gpus / rollout.num_workers")


def test_one_actor_bigger_than_every_node_that_could_host_it():
    cfg = load_config(None, ["rollout.num_workers=1", "ray.learner_num_gpus=2", "ray.address=auto"])
    nodes = [{"CPU": 8.0, "GPU": 2.0, "rollout": 1.0}, {"CPU": 16.0, "GPU": 1.0, "learner": 1.0}, {"CPU": 2.0}]
    total = {"CPU": 26.0, "GPU": 3.0, "rollout": 1.0, "learner": 1.0}
    line = _problem(cfg, total, nodes)
    assert line.startswith("the learner asks for 2 GPUs on one node; the biggest Ray node with a 'learner' slot has "
                           "1 GPU (")
    # Without role slots any node may host it, and the two-GPU node can.
    plain = [{k: v for k, v in n.items() if k not in ("rollout", "learner")} for n in nodes]
    assert _problem(cfg, {"CPU": 26.0, "GPU": 3.0}, plain) is None


def test_waiting_for_an_autoscaler_skips_the_check():
    # Returns before it asks Ray anything (Ray is not even initialised here).
    check_placeable(load_config(CONFIGS / "gpu.yaml", ["ray.wait_for_autoscaler=true"]).ray, 4)


# ---------------------------------------------------------------------------------- real local Ray
@pytest.fixture(scope="module")
def one_gpu_ray():
    """A fresh local Ray that advertises one GPU (Ray's GPU count is logical: no GPU is needed)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_regression_one_gpu_cluster_waited_for_actors_that_never_start(one_gpu_ray, tmp_path, monkeypatch):
    from treeplay.orchestrator.cli import app

    monkeypatch.delenv("TREEPLAY_STORE_URL", raising=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the start checks look for a model directory; nothing loads it
    url = f"sqlite:///{tmp_path / 'store.db'}"
    t0 = time.monotonic()
    out = CliRunner().invoke(app, ["run", str(CONFIGS / "gpu.yaml"), f"model.path={model}", f"store.url={url}",
                                   f"output_dir={tmp_path / 'runs'}"])
    seconds = time.monotonic() - t0
    assert out.exit_code == 2, out.output
    assert [s for s in out.output.splitlines() if s.strip()] == [f"error: {GPU_YAML_ON_ONE_GPU}"]
    assert seconds < 60, f"refused after {seconds:.0f}s"
    assert queries.list_runs(open_store(url, create=False)) == []
    assert not (tmp_path / "runs").exists()


def test_fleet_placement_refuses_too_and_a_config_that_fits_passes(one_gpu_ray):
    from treeplay.orchestrator.placement import place_actors
    from treeplay.orchestrator.workers import check_cluster

    gpu = load_config(CONFIGS / "gpu.yaml")
    with pytest.raises(PlacementError, match="= 5 GPUs; the Ray cluster has 1 GPU"):
        place_actors(gpu.ray, gpu.rollout.num_workers)  # what Fleet calls, for callers that skip launch_run
    assert not one_gpu_ray.util.placement_group_table(), "nothing may be reserved for a refused run"
    # gpu-single's 0.5 + 0.5 GPU fit (with one CPU each: this Ray has two).
    check_cluster(load_config(CONFIGS / "gpu-single.yaml", ["ray.worker_num_cpus=1", "ray.learner_num_cpus=1"]))
