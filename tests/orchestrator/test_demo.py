"""A CI-sized demo: the real loop (Ray, store, MCTS, learner, redeploy) must raise held-out accuracy.

The full demo (`make demo`) runs 20 iterations of 1024 tasks; this runs the first 10 from the same
warm-started model (the `warm_model_dir` fixture is the demo's own warm start), about two minutes.
Accuracy on 500 held-out tasks moves by a few points from one iteration to the next, so the
assertions are on the mean of the last three iterations, for greedy decoding and for T=1 samples
(docs/tiny-models.md: the measure that mere "sharpening" of the policy does not raise). The run is seeded;
in `treeplay demo` of 2026-12-01 iterations 8-10 gave greedy .602/.542/.568 and T=1 .506/.470/.494 (from .476/.346).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from treeplay.orchestrator.config import load_config
from treeplay.orchestrator.loop import launch_run
from treeplay.store import queries
from treeplay.store.database import open_store

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def test_small_demo_learns_from_its_own_trees(tmp_path, warm_model_dir):
    import ray

    cfg = load_config(Path(__file__).parents[2] / "configs" / "demo.yaml", [
        f"model.path={warm_model_dir}", f"output_dir={tmp_path}", f"store.url=sqlite:///{tmp_path}/demo.db",
        "iterations=10",
    ])
    try:
        report = launch_run(cfg)
    finally:
        ray.shutdown()
    series = queries.metric_series(open_store(cfg.store.url), report.run_id)
    greedy = [v for _, v in series["eval/accuracy_greedy"]]
    sampled = [v for _, v in series["eval/accuracy_sample"]]
    print(json.dumps({"greedy": greedy, "sampled": sampled}))
    assert len(greedy) == len(sampled) == 11  # the warm start, then ten iterations
    pairs = [v for _, v in series["rollout/pairs"]]
    assert min(pairs) > 100, "every iteration should find hundreds of step pairs"
    assert sum(sampled[-3:]) / 3 >= sampled[0] + 0.03, f"T=1 accuracy did not rise: {sampled}"
    assert sum(greedy[-3:]) / 3 >= greedy[0] + 0.03, f"greedy accuracy did not rise: {greedy}"
    assert report.plot and Path(report.plot).is_file()
