"""The ``Learner`` protocol: every learner ``make_learner`` builds satisfies it, and it names what
the loop uses (``guards.train_guarded`` runs on a learner seen through the protocol alone)."""

from __future__ import annotations

import pytest

from treeplay.learners import make_learner
from treeplay.learners.base import Learner
from treeplay.orchestrator.config import load_config

LEARNERS = {"dpo": "DPOLearner", "tpo": "TPOLearner", "slhf": "SLHFLearner", "rft": "RFTLearner"}


@pytest.mark.parametrize("algorithm", sorted(LEARNERS))
def test_every_learner_is_a_learner(algorithm, tiny_model_dir):
    cfg = load_config(None, [f"learner.algorithm={algorithm}", f"learner.{algorithm}.num_threads=1"])
    learner = make_learner(cfg, tiny_model_dir, preference=lambda prompt, a, b: 0.5)
    assert type(learner).__name__ == LEARNERS[algorithm]
    assert isinstance(learner, Learner)
    assert learner.healthy and learner.updates == 0 and learner.train_calls == 0
    # The policy inside is not a learner: it has weights and a training state, but no train().
    assert not isinstance(learner.policy, Learner)


def test_an_object_missing_part_of_the_protocol_is_not_a_learner():
    class TrainsOnly:
        def train(self, data):
            return {}

    assert not isinstance(TrainsOnly(), Learner)


@pytest.mark.parametrize("algorithm", sorted(LEARNERS))
def test_each_learner_declares_the_data_it_trains_on(algorithm, tiny_model_dir):
    """The learner actor asks the learner, not the config, what to hand it (``guards.usable_data``)
    and whether to tell it the iteration's tasks (only SLHF's oracle needs them)."""
    cfg = load_config(None, [f"learner.algorithm={algorithm}", f"learner.{algorithm}.num_threads=1"])
    learner = make_learner(cfg, tiny_model_dir)
    expected = {"dpo": "pairs", "tpo": "ranked_lists", "rft": "ranked_lists", "slhf": "prompts"}
    assert learner.trains_on == expected[algorithm]
    assert learner.needs_tasks == (algorithm == "slhf")


def test_slhf_gets_the_verifier_of_the_runs_environment_from_make_learner(tiny_model_dir):
    """The learner actor used to build SLHF's oracle itself (and every other learner's too); now
    make_learner builds it from the config, and know_tasks is how it learns where prompts belong."""
    from treeplay.agents.registry import make_environment
    from treeplay.learners.slhf import VerifierOracle

    cfg = load_config(None, ["learner.algorithm=slhf", "learner.slhf.num_threads=1"])
    learner = make_learner(cfg, tiny_model_dir)
    oracle = learner.preference
    assert isinstance(oracle, VerifierOracle)
    task = make_environment(cfg.env.name, **cfg.env.kwargs).tasks("train", 1, seed=0)[0]
    oracle.reset_counts()
    assert oracle(task.prompt, "1\n", "2\n") == 0.5
    assert oracle.counts()["oracle_unscored"] == 1.0  # an unknown task: no signal
    learner.know_tasks([task])
    oracle.reset_counts()
    oracle(task.prompt, "1\n", "2\n")
    assert oracle.counts()["oracle_unscored"] == 0.0
