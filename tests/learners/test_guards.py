"""The learner's guard rails and data rules (``learners.guards``): the deploy rule, the
restore of a rejected iteration, the shuffled-pairs control, usable data and the staleness bound."""

from __future__ import annotations

import pytest

from treeplay.learners.guards import train_guarded, update_is_deployable


def test_shuffled_control_swaps_about_half_the_pairs_consistently():
    from treeplay.learners.guards import shuffled_control
    from treeplay.store.records import PairRecord, PreferenceData

    pairs = [PairRecord(prompt=f"p{i}", chosen=f"good{i}", rejected=f"bad{i}", chosen_node=1, rejected_node=2,
                        chosen_visits=5, rejected_visits=1) for i in range(200)]
    out = shuffled_control(PreferenceData(pairs=pairs), seed=3).pairs
    swapped = [q for q in out if q.chosen.startswith("bad")]
    assert 70 < len(swapped) < 130
    for q in swapped:
        # The texts and the nodes they came from trade places; the visit counts do not (alpha).
        assert q.rejected.startswith("good") and (q.chosen_node, q.rejected_node) == (2, 1)
        assert (q.chosen_visits, q.rejected_visits) == (5, 1)
    assert [q.chosen for q in shuffled_control(PreferenceData(pairs=pairs), seed=3).pairs] == [q.chosen for q in out]


def test_regression_shuffle_control_keeps_alpha():
    """The control swapped the visit counts with the texts: MCTS-DPO's alpha became 1/(N_l/N_w + 1),
    clipped to 0.5, which cancels the preference gradient of every swapped pair."""
    import torch

    from treeplay.learners.guards import shuffled_control
    from treeplay.learners.losses import dpo_loss, visit_alpha
    from treeplay.store.records import PairRecord, PreferenceData

    spans = {"chosen": [[0, 3]], "rejected": [[0, 2]]}
    pairs = [PairRecord(prompt=f"p{i}\n", chosen="yes\nobs\n", rejected="no\n", chosen_visits=9, rejected_visits=2,
                        label_smoothing=0.18, weight=0.7, margin=0.4, shared_prefix_chars=0,
                        info={"action_spans": spans, "final": True}) for i in range(64)]
    out = shuffled_control(PreferenceData(pairs=pairs), seed=5).pairs
    swapped = [q for q in out if q.chosen == "no\n"]
    assert 16 < len(swapped) < 48
    alpha = float(visit_alpha(torch.tensor(9), torch.tensor(2)))
    for q in out:
        assert float(visit_alpha(torch.tensor(q.chosen_visits), torch.tensor(q.rejected_visits))) == alpha < 0.5
        assert (q.label_smoothing, q.weight, q.margin, q.info["final"]) == (0.18, 0.7, 0.4, True)
        # Action spans describe a text's characters, so they go where the text goes.
        side = {"yes\nobs\n": "chosen", "no\n": "rejected"}
        assert q.info["action_spans"] == {"chosen": spans[side[q.chosen]], "rejected": spans[side[q.rejected]]}
    assert pairs[0].info["action_spans"] is spans and spans["chosen"] == [[0, 3]]  # the input is left alone

    # The swapped pair's loss pushes the other way as hard as the real pair's does.
    logp_c, logp_r = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0])
    grads = []
    for c, r in ((logp_c, logp_r), (logp_r, logp_c)):
        loss = dpo_loss(c, r, torch.zeros(1), torch.zeros(1), 0.5, torch.tensor([alpha])).loss
        grads.append(torch.autograd.grad(loss, logp_c)[0].item())
    assert grads[0] < 0 < grads[1] and abs(grads[1]) > 0.1 * abs(grads[0])


def test_shuffle_control_permutes_list_texts_but_keeps_scores_in_rank_order():
    from treeplay.learners.guards import shuffled_control
    from treeplay.store.records import PreferenceData, RankedItem, RankedListRecord

    texts = [f"answer {k}\n" for k in range(4)]
    lists = [RankedListRecord(prompt=f"q{i}\n", items=[RankedItem(text=t, score=1.0 - 0.25 * k, node=k)
                                                         for k, t in enumerate(texts)],
                              info={"action_spans": [[[0, k + 1]] for k in range(4)], "correct": [True, False, False, False]})
              for i in range(30)]
    out = shuffled_control(PreferenceData(ranked_lists=lists), seed=1).ranked_lists
    moved = 0
    for r in out:
        assert [it.score for it in r.items] == [1.0, 0.75, 0.5, 0.25]
        k = [texts.index(it.text) for it in r.items]
        assert [it.node for it in r.items] == k
        assert r.info["action_spans"] == [[[0, j + 1]] for j in k]
        assert r.info["correct"] == [True, False, False, False]  # the verifier's labels stay with the ranks
        moved += k != [0, 1, 2, 3]
    assert moved > 20


def test_regression_tpo_control_does_not_keep_nll_on_verified_text(tiny_model_dir):
    """The control reverses the preference signal and nothing else: TPO's NLL trains on the text in
    the best verified slot, which after the shuffle is any of the list's texts (as DPO's NLL trains on
    whatever text sits in the chosen slot). When the correct flags moved with their texts, the
    control still trained NLL on the verified-correct answer in every list."""
    from treeplay.learners.guards import shuffled_control
    from treeplay.learners.tpo import TPOLearner
    from treeplay.store.records import PreferenceData, RankedItem, RankedListRecord

    texts = ["=12\n", "=13\n", "=14\n"]
    lists = [RankedListRecord(prompt=f"{i}+5\n", items=[RankedItem(text=t, score=1.0 - 0.5 * k)
                                                      for k, t in enumerate(texts)],
                              info={"correct": [True, False, False]}) for i in range(40)]
    learner = TPOLearner(tiny_model_dir, num_threads=1)
    real = learner.prepare(shuffled_control(PreferenceData(ranked_lists=lists), seed=3).ranked_lists)
    nll_texts = {learner.policy.tokenizer.decode(ex.responses[ex.nll_item], skip_special_tokens=True)
                 for ex in real}
    assert len(nll_texts) == 3  # the NLL follows the slot, so every text gets it in some list


def test_usable_data_names_what_each_learner_lacks():
    from treeplay.learners.guards import usable_data
    from treeplay.store.records import PairRecord, PreferenceData, RankedItem, RankedListRecord

    lists = [RankedListRecord(prompt="q\n", items=[RankedItem("a\n", 1.0), RankedItem("b\n", 1.0)])]
    pairs = [PairRecord(prompt="q\n", chosen="a\n", rejected="b\n")]
    _, why = usable_data("pairs", PreferenceData(ranked_lists=lists), "DPO")
    assert why == "no preference pairs (1 ranked lists, which DPO does not use)"
    _, why = usable_data("ranked_lists", PreferenceData(pairs=pairs), "TPO")
    assert why == "no ranked lists (1 pairs, which TPO does not use)"
    assert usable_data("prompts", PreferenceData())[1].startswith("no preference data")
    data, why = usable_data("pairs", PreferenceData(pairs=pairs, ranked_lists=lists))
    assert why is None and data.pairs == pairs and not data.ranked_lists
    assert usable_data("prompts", PreferenceData(ranked_lists=lists)) == (PreferenceData(ranked_lists=lists), None)
    with pytest.raises(ValueError, match="not 'lists'"):
        usable_data("lists", PreferenceData(pairs=pairs))


def test_a_learner_with_nothing_to_train_on_makes_no_update(tiny_model_dir):
    """TPO drops lists whose items all tie; with only such lists it trains on nothing: no update,
    the learner untouched, the reason in the metrics."""
    from treeplay.learners.checkpoints import fingerprint
    from treeplay.learners.config import TPOConfig
    from treeplay.learners.tpo import TPOLearner
    from treeplay.store.records import PreferenceData, RankedItem, RankedListRecord

    learner = TPOLearner(tiny_model_dir, TPOConfig(num_threads=1))
    before = fingerprint(learner.state_dict())
    tied = [RankedListRecord(prompt=f"{a}+1\n", items=[RankedItem(f"{a}+1={a + 1}\n", 1.0),
                                                          RankedItem(f"{a}+1={a + 1}\n", 1.0)]) for a in range(5)]
    metrics, deployable = train_guarded(learner, PreferenceData(ranked_lists=tied))
    assert not deployable and metrics["no_update_reason"].startswith("nothing to train on: TPOLearner")
    assert learner.train_calls == 0 and fingerprint(learner.state_dict()) == before


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

    from treeplay.learners.checkpoints import fingerprint
    from treeplay.learners.config import DPOConfig
    from treeplay.learners.dpo import DPOLearner
    from treeplay.store.records import PairRecord, PreferenceData

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


def test_regression_weights_blown_up_by_an_update_whose_losses_stay_finite_are_not_deployed(tiny_model_dir):
    """lr=1e30 in one update (one micro-batch): no update is skipped and the final check's loss is
    finite (the normalisation layers overflow into flat, finite logits), yet the weights moved by
    ~1e31 times their norm. Such an update once reached the workers, whose rollouts then gave NaN
    priors; now the update ratio refuses it and the learner goes back to where it was."""
    from treeplay.learners.checkpoints import fingerprint
    from treeplay.learners.config import DPOConfig
    from treeplay.learners.dpo import DPOLearner
    from treeplay.store.records import PairRecord, PreferenceData

    learner = DPOLearner(tiny_model_dir, DPOConfig(lr=1e30, batch_size=20, num_threads=1, loss_type="sigmoid"))
    before = fingerprint(learner.state_dict())
    pairs = [PairRecord(prompt=f"{a}+{a}\n", chosen=f"{a}+{a}={2 * a}\n", rejected=f"{a}+{a}={2 * a + 1}\n")
             for a in range(10, 30)]
    metrics, deployable = train_guarded(learner, PreferenceData(pairs=pairs))
    assert metrics["skipped_updates"] == 0.0 and metrics["update_ratio"] > 1e20
    assert not deployable and metrics["restored"] == 1.0
    assert "times their norm" in metrics["no_update_reason"]
    assert fingerprint(learner.state_dict()) == before


def test_update_ratio_is_the_relative_distance_the_weights_moved():
    import math

    import torch

    from treeplay.learners.guards import update_ratio

    before = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    assert update_ratio(before, {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}) == 0.0
    assert update_ratio(before, {"a": torch.tensor([3.0, 5.0]), "b": torch.tensor([4.0])}) == pytest.approx(1.0)
    huge = {"a": torch.tensor([3e38, 3e38]), "b": torch.tensor([-3e38])}  # squares overflow float32
    assert math.isfinite(update_ratio(before, huge)) and update_ratio(before, huge) > 1e37
    assert update_ratio(before, {"a": torch.tensor([math.nan, 0.0]), "b": torch.tensor([4.0])}) == math.inf
    assert update_is_deployable({"update_ratio": 0.5}, applied=3, healthy=True)
    assert not update_is_deployable({"update_ratio": 50.0}, applied=3, healthy=True)
    assert update_is_deployable({"update_ratio": 50.0}, applied=3, healthy=True, max_update_ratio=100.0)


class ThroughTheProtocol:
    """A learner seen through the ``Learner`` protocol alone: any other attribute (``policy``) fails."""

    def __init__(self, learner):
        self._learner = learner

    def __getattr__(self, name):
        from treeplay.learners.base import Learner

        protocol = set(vars(Learner)) | set(getattr(Learner, "__annotations__", {}))
        if name.startswith("_") or name not in protocol:
            raise AttributeError(f"{name!r} is not part of the Learner protocol")
        return getattr(self._learner, name)


def test_train_guarded_needs_nothing_but_the_learner_protocol(tiny_model_dir):
    """A rejected iteration is undone (weights, health, counters) through the protocol's methods.

    Without rollback, lr=1e30 leaves weights that give a non-finite loss: the learner is unhealthy
    after ``train``, and only ``load_weights`` of the weights from before makes it healthy again."""
    from treeplay.learners.base import Learner
    from treeplay.learners.checkpoints import fingerprint
    from treeplay.learners.config import DPOConfig
    from treeplay.learners.dpo import DPOLearner
    from treeplay.store.records import PairRecord, PreferenceData

    learner = DPOLearner(tiny_model_dir, DPOConfig(lr=1e30, rollback=False, batch_size=4, num_threads=1,
                                                   loss_type="sigmoid"))
    view = ThroughTheProtocol(learner)
    assert isinstance(view, Learner)
    with pytest.raises(AttributeError, match="not part of the Learner protocol"):
        view.policy  # noqa: B018
    before = fingerprint(learner.state_dict())
    pairs = [PairRecord(prompt=f"{a}+{a}\n", chosen=f"{a}+{a}={2 * a}\n", rejected=f"{a}+{a}={2 * a + 1}\n")
             for a in range(10, 22)]
    metrics, deployable = train_guarded(view, PreferenceData(pairs=pairs))
    assert not deployable and metrics["restored"] == 1.0
    assert fingerprint(learner.state_dict()) == before and learner.healthy
    assert (learner.updates, learner.train_calls) == (0, 0)  # the training state went back too


def test_the_learner_refuses_this_iterations_data_older_than_the_staleness_bound():
    """rollout.max_staleness: rows of the iteration being learned that are more than k versions
    behind the learner are refused and counted; replayed rows (older by design) and rows without a
    recorded version are kept."""
    from treeplay.learners.guards import within_staleness
    from treeplay.store.records import (
        POLICY_VERSION,
        PairRecord,
        PreferenceData,
        RankedItem,
        RankedListRecord,
    )

    def pair(iteration, version):
        info = None if version is None else {POLICY_VERSION: version, "other": 1}
        return PairRecord(prompt="q\n", chosen="a\n", rejected="b\n", iteration=iteration, info=info)

    pairs = [pair(5, 7), pair(5, 6), pair(5, 5), pair(5, 4), pair(5, None), pair(4, 2)]
    lists = [RankedListRecord(prompt="q\n", items=[RankedItem("a\n", 1.0)], iteration=5, info={POLICY_VERSION: 3})]
    data, counts = within_staleness(PreferenceData(pairs=pairs, ranked_lists=lists), 5, learner_version=7,
                                    max_staleness=1)
    assert [(p.iteration, (p.info or {}).get(POLICY_VERSION)) for p in data.pairs] == [(5, 7), (5, 6), (5, None), (4, 2)]
    assert data.ranked_lists == []
    assert counts == {"stale_refused": 3.0, "staleness_max": 1.0, "staleness_mean": 0.5,
                      "data_version_min": 6.0, "data_version_max": 7.0}
    # Synchronous (k = 0): only data made by the learner's own version.
    data, counts = within_staleness(PreferenceData(pairs=pairs), 5, learner_version=7, max_staleness=0)
    assert counts["stale_refused"] == 3.0 and counts["staleness_max"] == 0.0


# -- every learner and mode: an iteration with nothing to learn from makes no update -------------------

_MODES = ("mcts", "sample", "react", "panel", "multi_agent")


def _fixed_outcome_data(mode: str, solved: bool):
    """What a rollout in ``mode`` writes when the outcome does not depend on the policy (every task
    solved, or none): no preference pair, and ranked lists whose items all tie, if any."""
    from tests.orchestrator.fixed_outcome_env import FixedOutcomeEnv
    from treeplay.agents.scripted import ScriptedPolicy
    from treeplay.orchestrator.config import load_config
    from treeplay.orchestrator.rollouts import run_rollouts
    from treeplay.store.records import PreferenceData

    def respond(prompt: str, rng) -> str:
        return "helpfulness: 3\ncorrectness: 3\n" if prompt.startswith("Score") else rng.choice(["any", "x", "y"]) + "\n"

    cfg = load_config(None, [f"rollout.mode={mode}", "rollout.samples_per_task=4"])
    tasks = FixedOutcomeEnv(solved=solved).tasks("train", 4, 0)
    results, _ = run_rollouts(cfg, tasks, ScriptedPolicy(respond), lambda: FixedOutcomeEnv(solved=solved), seed=1)
    return PreferenceData(pairs=[p for r in results for p in r.pairs],
                          ranked_lists=[r for res in results for r in res.ranked_lists])


@pytest.fixture(scope="module")
def learners(tiny_model_dir):
    from tests.orchestrator.fixed_outcome_env import FixedOutcomeEnv
    from treeplay.learners import make_learner
    from treeplay.learners.slhf import VerifierOracle
    from treeplay.orchestrator.config import load_config

    out = {}
    for algorithm in ("dpo", "tpo", "rft", "slhf"):
        cfg = load_config(None, [f"learner.algorithm={algorithm}", f"learner.{algorithm}.num_threads=1"])
        oracle = VerifierOracle(FixedOutcomeEnv()) if algorithm == "slhf" else None
        out[algorithm] = make_learner(cfg, tiny_model_dir, preference=oracle)
    return out


@pytest.mark.parametrize("solved", [True, False], ids=["all-solved", "none-solved"])
@pytest.mark.parametrize("mode", _MODES)
def test_regression_every_learner_and_mode_without_data_makes_no_update(learners, mode, solved):
    """DPOLearner.train raised 'needs at least one preference pair' inside the learner actor when an
    iteration had no pair (the run died, left 'running'); TPO likewise on tied lists. The learner
    actor's sequence (usable_data, then train_guarded) must give no update and a reason, for every
    learner and rollout mode, and train only where there is something to learn (RFT on verified-
    correct samples, SLHF on prompts, which its oracle scores)."""
    from treeplay.learners.checkpoints import fingerprint
    from treeplay.learners.guards import canonical_order, train_guarded, usable_data

    data = _fixed_outcome_data(mode, solved)
    assert not data.pairs
    for algorithm, learner in learners.items():
        usable, reason = usable_data(learner.trains_on, canonical_order(data), algorithm.upper())
        if reason is None and algorithm == "slhf":
            assert usable.ranked_lists  # SLHF has prompts to learn from: not a no-data case
            continue
        before, calls = fingerprint(learner.state_dict()), learner.train_calls
        if reason is None:
            metrics, deployable = train_guarded(learner, usable)
            reason = metrics.get("no_update_reason")
        else:
            deployable = False
        trains = algorithm == "rft" and solved and mode in ("mcts", "sample")  # verified-correct samples
        assert deployable == trains, (algorithm, reason)
        if not trains:
            assert reason, algorithm
            assert fingerprint(learner.state_dict()) == before and learner.train_calls == calls
