"""Checkpoints hold the learner's whole training state, and a resumed run is the uninterrupted one.

- a learner rebuilt from a checkpoint (weights + ``trainer/`` state) continues exactly as the one
  that wrote it: same losses, same weights (DPO with a fixed reference and warm-up; SLHF, which
  samples with torch's RNG and updates its leader every other step);
- a checkpoint directory appears whole or not at all, and a fixed reference must be the model the
  checkpoint trained against;
- an iteration the guard rails reject leaves no trace in the training state;
- the orchestrator SIGKILLed right after an iteration's checkpoint: ``treeplay resume`` gives the
  same per-iteration losses and held-out accuracies as an uninterrupted run (real local Ray, real
  SQLite, the warm-started tiny model).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from treeplay.learners.checkpoints import (
    TRAINER_DIR,
    fingerprint,
    read_checkpoint_meta,
    write_directory_atomically,
)
from treeplay.learners.config import DPOConfig, SLHFConfig
from treeplay.learners.dpo import DPOLearner
from treeplay.learners.guards import train_guarded
from treeplay.learners.slhf import SLHFLearner
from treeplay.orchestrator.config import load_config
from treeplay.orchestrator.workers import ModelFiles
from treeplay.store import queries
from treeplay.store.database import open_store
from treeplay.store.records import PairRecord, PreferenceData


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from treeplay.engines.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("resume") / "model", hidden_size=32, num_layers=1)


def _pairs(lo: int, hi: int) -> PreferenceData:
    return PreferenceData(pairs=[PairRecord(prompt=f"{a}+{a}\n", chosen=f"{2 * a}\n", rejected=f"{2 * a + 1}\n")
                                 for a in range(lo, hi)])


def test_a_learner_rebuilt_from_its_checkpoint_continues_exactly(small_model_dir, tmp_path):
    cfg = DPOConfig(lr=1e-3, batch_size=4, num_threads=1, warmup_steps=50, reference="fixed", loss_type="sigmoid")
    first, second = _pairs(10, 30), _pairs(30, 50)
    a = DPOLearner(small_model_dir, cfg)
    train_guarded(a, first)
    ckpt = a.save_checkpoint(tmp_path / "v0001")
    meta = read_checkpoint_meta(ckpt)
    assert meta["updates"] == 5 and meta["calls"] == 1
    assert meta["reference"]["kind"] == "fixed"
    assert meta["reference"]["source"] == Path(small_model_dir).resolve().as_uri()
    go_on, _ = train_guarded(a, second)

    b = DPOLearner(ckpt, cfg)
    b.policy.load_reference(small_model_dir)
    assert b.restore_checkpoint(ckpt)
    resumed, _ = train_guarded(b, second)
    for key in ("first_loss", "loss", "pair_loss", "nll_loss", "grad_norm", "updates"):
        assert resumed[key] == go_on[key], key
    assert fingerprint(b.state_dict()) == fingerprint(a.state_dict())
    # What rollout workers are sent: the weights, not the optimizer.
    assert not [f for f in ModelFiles.pack(ckpt, skip=(TRAINER_DIR,)).files if f.startswith(TRAINER_DIR)]

    # Without the starting model as its reference, the checkpoint refuses to continue.
    c = DPOLearner(ckpt, cfg)
    with pytest.raises(ValueError, match="is not the one training used"):
        c.restore_checkpoint(ckpt)


def test_slhf_rebuilt_from_its_checkpoint_samples_and_updates_as_before(small_model_dir, tmp_path):
    def longer(prompt: str, a: str, b: str) -> float:
        return 0.5 if len(a) == len(b) else float(len(a) > len(b))

    cfg = SLHFConfig(batch_size=4, max_new_tokens=4, leader_update_frequency=2, num_threads=1, lr=1e-3)
    prompts = [f"{a}+{a}\n" for a in range(10, 18)]
    a = SLHFLearner(small_model_dir, longer, cfg)
    a.train(prompts, steps=3)
    ckpt = a.save_checkpoint(tmp_path / "v0001")
    go_on = a.train(prompts, steps=3)

    torch.manual_seed(12345)  # the RNG state a resumed process happens to have must not matter
    b = SLHFLearner(ckpt, longer, cfg)
    b.policy.load_reference(small_model_dir)
    assert b.restore_checkpoint(ckpt) and b.steps_done == 3
    resumed = b.train(prompts, steps=3)
    for key in ("loss", "leader_loss", "follower_loss", "preference", "length_leader", "length_follower"):
        assert resumed[key] == go_on[key], key
    assert fingerprint(b.state_dict()) == fingerprint(a.state_dict())


def test_a_checkpoint_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "checkpoints" / "v0003"

    def crash_half_way(d: Path) -> None:
        (d / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_directory_atomically(target, crash_half_way)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no target, no temporary left behind

    write_directory_atomically(target, lambda d: (d / "old.txt").write_text("from a crashed run"))
    with pytest.raises(FileExistsError):
        write_directory_atomically(target, lambda d: None)
    write_directory_atomically(target, lambda d: (d / "new.txt").write_text("complete"), replace=True)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["v0003"]


def test_regression_rejected_iteration_restores_training_state(small_model_dir):
    """An iteration the guard rails reject used to keep the optimizer moments and update count it
    built up: the next iteration (and a run resumed from the last checkpoint) started elsewhere."""
    learner = DPOLearner(small_model_dir, DPOConfig(lr=1e-3, batch_size=4, num_threads=1, loss_type="sigmoid"))
    train_guarded(learner, _pairs(10, 30))
    before = learner.training_state()
    learner.policy.config.lr = 1e30  # blows the weights up: the iteration is rejected
    metrics, deployable = train_guarded(learner, _pairs(30, 50))
    assert not deployable and metrics["restored"] == 1.0 and metrics["no_update_reason"]
    after = learner.training_state()
    assert after["updates"] == before["updates"] and after["calls"] == before["calls"]
    for pid, state in before["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(after["optimizer"]["state"][pid][name], value), name


# ----------------------------------------------------------------------------------------------
# The whole loop, killed and resumed


def _kill_session(proc: subprocess.Popen) -> None:
    import signal

    import psutil

    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == proc.pid:
                os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    proc.wait(timeout=30)


SERIES = ("learn/loss", "learn/first_loss", "learn/pair_loss", "learn/nll_loss", "learn/grad_norm", "learn/updates",
          "eval/accuracy_before", "eval/accuracy_greedy", "eval/accuracy_sample", "policy_version")


def _series(store, run_id: int) -> dict[str, dict[int, float]]:
    # One point per (iteration, key): an iteration recorded again after the crash replaces its values.
    return {k: dict(v) for k, v in queries.metric_series(store, run_id).items() if k in SERIES}


# A LoRA learner: only the adapter trains and is checkpointed and redeployed, and the fixed
# reference is the base with the adapter off; resume must hold the same way.
LORA = "learner.dpo.lora={rank: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], [LORA, "learner.dpo.lr=1e-3"]], ids=["full", "lora"])
def test_regression_resume_reproduces_losses(tmp_path, warm_model_dir, extra):
    """A resumed run used to restart Adam and the warm-up and to take the checkpoint it resumed
    from as its fixed reference: its losses and accuracies left the uninterrupted run's. With a
    LoRA learner the checkpoint is the adapter and its optimizer state, and the same holds."""
    treeplay = str(Path(sys.executable).parent / "treeplay")
    cfg = load_config(None, [
        f"model.path={warm_model_dir}", f"output_dir={tmp_path}", f"store.url=sqlite:///{tmp_path}/store.db",
        "rollout.tasks_per_iteration=48", "rollout.chunk_size=8", "eval.tasks=16", "iterations=3", "name=resumed",
        "learner.dpo.reference=fixed", "learner.dpo.warmup_steps=20", *extra,
    ])
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    proc = subprocess.Popen([treeplay, "run", str(cfg_path)], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    store = open_store(cfg.store.url)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        runs = queries.list_runs(store)
        ckpt = queries.latest_checkpoint(store, runs[0].id) if runs else None
        if ckpt is not None and ckpt.iteration == 0:
            break  # iteration 0's update is saved; its evaluation is (most likely) still running
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.02)
    else:
        pytest.fail("iteration 0 never wrote its checkpoint")
    _kill_session(proc)
    run_id = runs[0].id
    assert queries.get_run(store, run_id).status != "done"
    ckpt_dir = Path(ckpt.uri.removeprefix("file://"))
    assert read_checkpoint_meta(ckpt_dir)["updates"] > 0
    if extra:  # the checkpoint is the adapter, not a copy of the weights
        assert (ckpt_dir / "adapter_config.json").is_file() and not (ckpt_dir / "model.safetensors").exists()

    out = subprocess.run([treeplay, "resume", "resumed", "--db", cfg.store.url], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["iterations"] >= 2

    ref_url = f"sqlite:///{tmp_path}/ref.db"
    out = subprocess.run([treeplay, "run", str(cfg_path), f"store.url={ref_url}", "name=clean"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ref_store = open_store(ref_url)

    resumed, clean = _series(store, run_id), _series(ref_store, queries.list_runs(ref_store)[0].id)
    assert queries.finished_iterations(store, run_id) == [0, 1, 2]
    assert set(resumed) == set(SERIES) and set(clean) == set(SERIES)
    assert clean["learn/updates"][2] > clean["learn/updates"][0] > 0  # warm-up in progress across iterations
    for key in SERIES:
        assert set(resumed[key]) == set(clean[key]), key
        for i, value in clean[key].items():
            assert math.isclose(resumed[key][i], value, rel_tol=1e-6, abs_tol=1e-9), (key, i, resumed[key][i], value)
