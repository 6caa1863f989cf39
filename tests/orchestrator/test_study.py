"""`treeplay study`: a two-cell, one-seed, two-iteration study end to end on the tiny model.

The real command in a subprocess (Ray, store, learners): the store holds one finished run per
(cell, seed), runs/<study>/ holds results.json, table.md and curves.png, the last stdout line is the
JSON summary; a second invocation keeps the finished runs instead of running them again. Study files
that cannot work fail with one line before anything runs. Panel peers spelled 'study-warm:...' are
resolved to distinct warm-started models the study builds once per seed and peer.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from treeplay.orchestrator.config import ConfigError
from treeplay.orchestrator.run_start import check_startable
from treeplay.orchestrator.study import interval, load_study, shared_start
from treeplay.store import queries
from treeplay.store.database import open_store

ROOT = Path(__file__).parents[2]


def _study(tmp_path: Path, **extra) -> Path:
    spec = {
        "name": "mini",
        "base": str(ROOT / "configs" / "demo.yaml"),
        "seeds": [0],
        "overrides": [
            "iterations=2", "rollout.tasks_per_iteration=32", "rollout.chunk_size=32", "eval.tasks=20",
            "warm_start.steps=30", "warm_start.examples=500", f"output_dir={tmp_path / 'runs'}",
            f"store.url=sqlite:///{tmp_path / 'study.db'}",
        ],
        "reference": "rft",
        "cells": [
            {"name": "rft", "method": "RFT", "task": "arith",
             "overrides": ["rollout.mode=sample", "rollout.samples_per_task=4", "learner.algorithm=rft"]},
            {"name": "mcts-dpo", "method": "MCTS-DPO", "task": "arith"},
        ],
        **extra,
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _treeplay(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TREEPLAY_STORE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "treeplay.orchestrator.cli", *args], capture_output=True, text=True, env=env, timeout=900
    )


@pytest.mark.heavy
@pytest.mark.slow
def test_study_runs_every_cell_writes_results_and_resumes(tmp_path):
    study = _study(tmp_path)
    out = _treeplay("study", str(study))
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["study"] == "mini" and [c["name"] for c in line["cells"]] == ["rft", "mcts-dpo"]
    for cell in line["cells"]:
        assert cell["seeds"] == 1 and cell["gain"] is not None and cell["tokens"] > 0
        assert cell["ci_low"] is None  # one seed: no interval
    assert line["cells"][1]["vs_reference"]["cell"] == "rft"

    store = open_store(f"sqlite:///{tmp_path / 'study.db'}")
    runs = {r.name: r for r in queries.list_runs(store)}
    assert set(runs) == {"mini-rft-s0", "mini-mcts-dpo-s0"}
    assert all(r.status == "done" for r in runs.values())
    for r in runs.values():
        assert len(queries.finished_iterations(store, r.id)) == 2
    # Both runs started from the same warm-started model (one warm start for the seed).
    assert len(list((tmp_path / "runs" / "mini" / "warm").iterdir())) == 1

    root = tmp_path / "runs" / "mini"
    results = json.loads((root / "results.json").read_text())
    cells = {c["name"]: c for c in results["cells"]}
    rft = cells["rft"]["runs"][0]
    assert rft["greedy_before"] == cells["mcts-dpo"]["runs"][0]["greedy_before"]  # same start, same tasks
    assert len(rft["greedy_curve"]) == 3 and rft["tokens_per_iteration"] > 0
    assert "| RFT | arith | 1 |" in (root / "table.md").read_text()
    assert (root / "curves.png").stat().st_size > 10_000

    again = _treeplay("study", str(study))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done earlier, kept") == 2
    assert len(queries.list_runs(store)) == 2
    assert json.loads(again.stdout.strip().splitlines()[-1])["cells"] == line["cells"]


def test_bad_study_files_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="reference 'nope' is not a cell"):
        load_study(_study(tmp_path, reference="nope"))
    with pytest.raises(ConfigError, match="cell 'mcts-dpo': .*learner.dpo.nope"):
        load_study(_study(tmp_path, reference=None,
                          cells=[{"name": "mcts-dpo", "method": "m", "overrides": ["learner.dpo.nope=1"]}]))
    with pytest.raises(ConfigError, match="cell names must be distinct"):
        load_study(_study(tmp_path, reference=None, cells=[{"name": "a", "method": "m"}, {"name": "a", "method": "m"}]))
    with pytest.raises(ConfigError, match="base config"):
        load_study(_study(tmp_path, base="missing.yaml"))
    out = _treeplay("study", str(tmp_path / "absent.yaml"))
    assert out.returncode == 2 and out.stderr.strip().startswith("error: cannot read study file")


def test_regression_study_on_an_old_store_fails_in_one_line(tmp_path):
    """A study whose store is behind the code's schema used to end in a Python traceback from the
    first run's open_store; now it is one line (exit 2) naming the upgrade, before anything runs."""
    from treeplay.store.database import upgrade

    url = f"sqlite:///{tmp_path / 'study.db'}"
    upgrade(url, "0003_run_reason")
    out = _treeplay("study", str(_study(tmp_path)))
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: store at") and "treeplay db upgrade" in lines[0]
    assert not (tmp_path / "runs").exists()  # no warm start, no run directory


def _peer_study(tmp_path: Path, peers: str, **extra) -> Path:
    """A one-seed panel study on a tiny warm start (2 steps), two cells naming the same peers."""
    panel = ["rollout.mode=panel", f"rollout.panel_peers={peers}"]
    return _study(tmp_path, reference=None, overrides=[
        "warm_start.steps=2", "warm_start.examples=64", "warm_start.batch_size=8",
        f"output_dir={tmp_path / 'runs'}", f"store.url=sqlite:///{tmp_path / 'study.db'}",
    ], cells=[{"name": "distinct", "method": "m", "overrides": panel},
              {"name": "shuffled", "method": "m", "overrides": [*panel, "learner.control=shuffle"]}], **extra)


def _models(cfg) -> list[str]:
    """The policy's starting model, then each peer's (None: the policy itself)."""
    return [cfg.model.path, *(p.model_path for p in cfg.rollout.panel_peers)]


def test_study_warm_peers_are_distinct_models_built_once(tmp_path):
    peers = "[{name: self}, {name: a, model_path: 'study-warm:seed+100'}, {name: b, model_path: 'study-warm:seed+0,steps=3'}]"
    study, runs = load_study(_peer_study(tmp_path, peers))
    root = tmp_path / "runs" / "mini"
    first = shared_start(runs[("distinct", 0)], root, {})
    policy, self_peer, a, b = _models(first)
    assert self_peer is None and first.warm_start.enabled is False
    models = [Path(p) for p in (policy, a, b)]
    assert len(set(models)) == 3 and all((m / "config.json").is_file() and m.is_absolute() for m in models)
    assert all(m.parent.parent == root / "warm" for m in models)
    weights = [(m / "model.safetensors").read_bytes() for m in models]
    assert len(set(weights)) == 3  # other init seed, other warm-start length: other weights
    stamps = [(m / "model.safetensors").stat().st_mtime_ns for m in models]

    # The other cell of the seed, and a later invocation (a fresh cache): the same models, none rebuilt.
    for cell, built in (("shuffled", {}), ("distinct", {})):
        again = shared_start(runs[(cell, 0)], root, built)
        assert _models(again) == [policy, None, a, b]
    assert [(m / "model.safetensors").stat().st_mtime_ns for m in models] == stamps
    assert len(list((root / "warm").iterdir())) == 3


def test_bad_study_warm_peers_fail_in_one_line(tmp_path):
    for bad, why in (("study-warm:seed-1", "expected 'study-warm:seed\\+N'"),
                     ("study-warm:100", "expected"),
                     ("study-warm:seed+0", "the policy's own warm start"),
                     ("study-warm:seed+0,steps=2", "the policy's own warm start")):
        with pytest.raises(ConfigError) as e:
            load_study(_peer_study(tmp_path, f"[{{name: self}}, {{name: a, model_path: '{bad}'}}]"))
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("cell 'distinct': rollout.panel_peers: peer 'a'")
        assert f"'{bad}'" in msg
        assert re.search(why, msg), msg
    real = _peer_study(tmp_path, "[{name: self}, {name: a, model_path: 'study-warm:seed+1'}]")
    with pytest.raises(ConfigError, match="cell 'distinct': .*not a tiny model the study builds"):
        load_study(real, [f"model.path={tmp_path}"])
    # Outside a study nothing builds such a peer: a plain run is refused before it is recorded.
    _, runs = load_study(real)
    with pytest.raises(ValueError, match="peer 'a' has model_path 'study-warm:seed\\+1', which only `treeplay study`"):
        check_startable(runs[("distinct", 0)])


def test_every_shipped_study_resolves():
    for path in sorted((ROOT / "configs" / "studies").glob("*.yaml")):
        study, runs = load_study(path)
        assert len(runs) == len(study.cells) * len(study.seeds)


def test_interval_is_a_t_interval():
    iv = interval([0.1, 0.2, 0.3])
    # mean 0.2, sd 0.1, t(2) = 4.303: half-width 0.1 * 4.303 / sqrt(3)
    assert iv["mean"] == pytest.approx(0.2)
    assert iv["ci_high"] - iv["mean"] == pytest.approx(0.1 * 4.303 / math.sqrt(3))
    assert interval([0.5])["ci_low"] is None and interval([])["mean"] is None


def _stored_as_the_study_starts_it(cfg) -> dict:
    """The config a study's run is stored with: its own, starting from the shared warm start."""
    data = cfg.model_dump(mode="json")
    data["model"]["path"] = "/somewhere/warm/model-v0"
    data["warm_start"]["enabled"] = False
    return data


def test_regression_a_finished_run_with_another_config_is_refused_not_kept(tmp_path):
    """A validation pass of a study file (eval.split=validation) followed by the test pass used to
    keep the validation runs as 'done earlier' and report them as the test's. Now a run already in
    the store under the same name with another config stops the study in one line, before anything
    runs; the same config is kept as before, and --name runs the study under another name."""
    from treeplay.orchestrator.study import check_existing_runs, config_drift

    study = _study(tmp_path)
    _, validation = load_study(study, ["eval.split=validation"])
    store = open_store(f"sqlite:///{tmp_path / 'study.db'}")
    for cfg in validation.values():
        run_id = queries.start_run(store, cfg.name, _stored_as_the_study_starts_it(cfg))
        queries.finish_run(store, run_id)
    check_existing_runs(validation)  # the same runs again: kept, no error
    older = _stored_as_the_study_starts_it(validation[("rft", 0)])
    del older["model"]["tiny"]["pretokenizer"]  # a key added after the run started: its default
    assert config_drift(older, validation[("rft", 0)]) == []
    _, test = load_study(study)
    assert config_drift(_stored_as_the_study_starts_it(validation[("rft", 0)]), test[("rft", 0)]) == ["eval.split"]
    with pytest.raises(ConfigError, match=r"run 'mini-rft-s0' is already in the store with another config \(eval.split\)"):
        check_existing_runs(test)
    out = _treeplay("study", str(study))
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: run 'mini-rft-s0' is already in the store with another config (eval.split); run the study "
        "under another name (--name) or delete that run first"]
    assert not (tmp_path / "runs").exists()
    spec, renamed = load_study(study, name="mini-test")
    assert spec.name == "mini-test" and {c.name for c in renamed.values()} == {"mini-test-rft-s0", "mini-test-mcts-dpo-s0"}
    check_existing_runs(renamed)
