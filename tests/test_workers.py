"""Plain helpers of the Ray actors: the deploy rule and the shuffled-pairs control."""

from __future__ import annotations

from orchestrator.workers import train_guarded, update_is_deployable


def test_shuffled_control_swaps_about_half_the_pairs_consistently():
    from orchestrator.workers import shuffled_control
    from store.records import PairRecord, PreferenceData

    pairs = [PairRecord(prompt=f"p{i}", chosen=f"good{i}", rejected=f"bad{i}", chosen_node=1, rejected_node=2,
                        chosen_visits=5, rejected_visits=1) for i in range(200)]
    out = shuffled_control(PreferenceData(pairs=pairs), seed=3).pairs
    swapped = [q for q in out if q.chosen.startswith("bad")]
    assert 70 < len(swapped) < 130
    for q in swapped:
        assert q.rejected.startswith("good") and (q.chosen_node, q.rejected_node) == (2, 1)
        assert (q.chosen_visits, q.rejected_visits) == (1, 5)
    assert [q.chosen for q in shuffled_control(PreferenceData(pairs=pairs), seed=3).pairs] == [q.chosen for q in out]


def test_an_iteration_mostly_skipped_by_the_guard_rails_is_not_deployed():
    assert update_is_deployable({"skipped_updates": 0.0}, applied=10, healthy=True)
    assert update_is_deployable({"skipped_updates": 4.0}, applied=10, healthy=True)
    assert not update_is_deployable({"skipped_updates": 10.0}, applied=10, healthy=True)
    assert not update_is_deployable({"skipped_updates": 0.0}, applied=0, healthy=True)
    assert not update_is_deployable({"skipped_updates": 0.0}, applied=10, healthy=False)


def test_a_nan_learning_rate_update_is_rejected_and_weights_stay(warm_model_dir):
    """lr=1e30 blows the weights up on every applied step; the learner rolls back and the loop's
    rule refuses to deploy, so the served weights are the ones from before the iteration."""
    import torch

    from orchestrator.learners.dpo import DPOConfig, DPOLearner
    from orchestrator.weights import fingerprint
    from store.records import PairRecord, PreferenceData

    learner = DPOLearner(warm_model_dir, DPOConfig(lr=1e30, batch_size=4, num_threads=1, loss_type="sigmoid"))
    before = fingerprint(learner.state_dict())
    pairs = [PairRecord(prompt=f"{a}+{a}\n", chosen=f"{a}+{a}={2 * a}\n", rejected=f"{a}+{a}={2 * a + 1}\n")
             for a in range(10, 30)]
    metrics, deployable = train_guarded(learner, PreferenceData(pairs=pairs))
    assert metrics["skipped_updates"] >= 1 and metrics["restored"] == 1.0
    assert not deployable
    assert fingerprint(learner.state_dict()) == before
    assert all(torch.isfinite(t).all() for t in learner.state_dict().values())
    # A sane learning rate afterwards trains normally from the restored weights.
    learner.policy.config.lr = 1e-4
    for group in learner.policy.optimizer.param_groups:
        group["lr"] = 1e-4
    learner.policy.optimizer.state.clear()
    metrics, deployable = train_guarded(learner, PreferenceData(pairs=pairs))
    assert deployable and fingerprint(learner.state_dict()) != before
