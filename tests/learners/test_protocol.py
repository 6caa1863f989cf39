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
