"""TPO orders a list better after training; SLHF's follower learns to beat the leader; both keep guard rails."""

from __future__ import annotations

import math
import random

import pytest
import torch

from treeplay.engines.tiny import CHARS
from treeplay.learners.slhf import SLHFLearner, load_follower_template
from treeplay.learners.tpo import TPOLearner, kendall_tau, ndcg, token_steps
from treeplay.store.records import PreferenceData, RankedItem, RankedListRecord


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from treeplay.engines.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tpo") / "model", hidden_size=64, num_layers=2, seed=2)


def ranked_lists(n: int, seed: int = 0) -> list[RankedListRecord]:
    rng = random.Random(seed)
    lists = []
    for _ in range(n):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        # A tree: every item shares the first step; the answers part ways in the second.
        items = [RankedItem(f"{a}+{b}\n={a + b}\n", 100.0)]
        items += [RankedItem(f"{a}+{b}\n={a + b + d}\n", s) for d, s in [(1, 60.0), (5, 30.0), (20, -50.0)]]
        rng.shuffle(items)
        lists.append(RankedListRecord(prompt=f"Q {a} {b}:\n", items=items, info={"final": True}))
    return lists


def test_rank_metrics_by_hand():
    assert kendall_tau([3, 2, 1], [30, 20, 10]) == 1.0
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert kendall_tau([0, 0, 0], [30, 20, 10]) == 0.0
    assert ndcg([3, 2, 1], [1.0, 0.5, 0.0]) == pytest.approx(1.0)
    gains = [1.0, math.sqrt(2) - 1, 0.0]  # labels rescaled to [1, .5, 0]
    worst = gains[2] / 1 + gains[1] / math.log2(3) + gains[0] / 2
    best = gains[0] / 1 + gains[1] / math.log2(3)
    assert ndcg([1, 2, 3], [1.0, 0.5, 0.0]) == pytest.approx(worst / best)


def test_token_steps_follow_lines(small_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_model_dir)
    # "ab\n" step 0, "cd\n" step 1, "e" step 2; two extra tokens (EOS) join the last step.
    assert token_steps(tok, "ab\ncd\ne", "\n", 9) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("weighting,anchor", [("dissimilar", "others"), ("similar", "best")])
def test_tpo_orders_lists_better_after_training(small_model_dir, weighting, anchor):
    lists = ranked_lists(16)
    learner = TPOLearner(
        small_model_dir, lr=3e-3, epochs=3, step_weighting=weighting, step_anchor=anchor, num_threads=1
    )
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    start = learner.evaluate(lists)
    m = learner.train(PreferenceData(ranked_lists=lists))
    end = learner.evaluate(lists)
    assert start["kendall_tau"] == 0.0  # policy == reference: every implicit reward is 0
    assert end["kendall_tau"] > 0.3 and end["pair_accuracy"] > 0.6
    assert end["loss"] < start["loss"]
    assert m["updates"] == 12 and m["skipped_updates"] == 0 and learner.healthy
    after = learner.state_dict()
    assert not [k for k in before if torch.equal(before[k], after[k])]


def test_tpo_plain_lipo_and_errors(small_model_dir):
    learner = TPOLearner(small_model_dir, lr=3e-3, epochs=2, adaptive_steps=False, nll_weight=0.0)
    start = learner.evaluate(ranked_lists(8))
    learner.train(ranked_lists(8))
    assert learner.evaluate(ranked_lists(8))["rank_loss"] < start["rank_loss"]
    with pytest.raises(ValueError, match="at least one ranked list"):
        learner.train(PreferenceData())
    tie = RankedListRecord(prompt="x", items=[RankedItem("a", 1.0), RankedItem("b", 1.0)])
    with pytest.raises(ValueError):
        learner.train([tie])


def matching_oracle(prompt: str, a: str, b: str) -> float:
    """Matching pennies on the first character: the follower (b) wins when it matches a's half of the
    vocabulary. The leader cannot beat a follower that reads its answer; a follower can learn to."""
    if not a or not b or a[0] not in CHARS or b[0] not in CHARS:
        return 0.5
    half = len(CHARS) // 2
    return 0.0 if (CHARS.index(a[0]) < half) == (CHARS.index(b[0]) < half) else 1.0


def test_slhf_follower_raises_its_win_rate(small_model_dir, tmp_path):
    # A toy follower template that puts the leader's one-character answer right before the
    # follower's, so a 2-layer model can learn the dependence within seconds.
    template = tmp_path / "follower.txt"
    template.write_text("{prompt}>{response}")
    prompts = [f"Q{i}:" for i in range(32)]
    learner = SLHFLearner(
        small_model_dir,
        matching_oracle,
        lr=6e-3,
        batch_size=32,
        max_new_tokens=1,
        beta=0.0,
        temperature=1.0,
        follower_prompt=str(template),
        num_threads=1,
    )
    before = sum(learner.win_rate(prompts) for _ in range(4)) / 4
    m = learner.train(prompts, steps=160)
    after = sum(learner.win_rate(prompts) for _ in range(4)) / 4
    assert 0.35 < before < 0.65
    print("win rate", before, after)
    assert after > 0.7, (before, after)
    assert m["updates"] == 160 and m["skipped_updates"] == 0 and learner.healthy
    chains = learner.refine(prompts[:3], n_rounds=2)
    assert [len(c) for c in chains] == [3, 3, 3]


def test_slhf_default_template_kl_and_empty_data(small_model_dir):
    template = load_follower_template()
    assert "{prompt}" in template and "{response}" in template and "Improve the previous answer" in template
    learner = SLHFLearner(
        small_model_dir,
        lambda p, a, b: float(len(a) > len(b)),
        max_new_tokens=6,
        batch_size=4,
        kl="k3",
        beta=0.1,
    )
    m = learner.train(["Hi:", "Yo:"], steps=2)
    assert m["updates"] == 2 and m["kl_leader"] >= 0 and m["length_follower"] > 0
    with pytest.raises(ValueError, match="at least one prompt"):
        learner.train([])
    with pytest.raises(ValueError):
        SLHFLearner(small_model_dir, matching_oracle, follower_weight=1.0)


class _EchoEnv:
    """Say the numbers 1, 2, 3; after each step the environment answers 'ok N' (an observation)."""

    name = "echo"

    def reset(self, task):
        self.t = 0
        return task.prompt

    def step(self, action):
        from treeplay.agents.base import StepResult

        self.t += 1
        right = action.strip() == str(self.t)
        self.ok = getattr(self, "ok", True) and right if self.t > 1 else right
        done = self.t == 3
        return StepResult(f"ok {self.t}", reward=float(done and self.ok), done=done)


def test_regression_slhf_oracle_scores_partial_solutions():
    """The oracle looked prompts up among the task prompts only, so every step-level prompt (a
    task prompt plus the steps so far) got 0.5: no signal from most of MCTS's data."""
    from treeplay.agents.base import Step, Task, transcript
    from treeplay.agents.envs.arithmetic import ArithmeticEnv
    from treeplay.learners.slhf import VerifierOracle

    env = ArithmeticEnv(ops=2, digits=2)
    task = env.tasks("train", 1, seed=3)[0]
    first, second = task.reference.splitlines()
    oracle = VerifierOracle(env)
    oracle.add_tasks([task])
    # From the task prompt: whole answers.
    assert oracle(task.prompt, task.reference, f"{first}\n1+1=3\n") == 1.0
    # From a partial solution (the first step taken): the answer is the rest of the episode.
    partial = transcript(task.prompt, [Step(0, first)])
    assert partial != task.prompt
    assert oracle(partial, second + "\n", "1+1=3\n") == 1.0
    assert oracle(partial, "1+1=3\n", second + "\n") == 0.0
    assert oracle(partial, second + "\n", second + "\n") == 0.5
    assert oracle.counts() == {"oracle_calls": 4.0, "oracle_unscored": 0.0}

    # Observations between the steps are replayed and must match the text.
    echo = _EchoEnv()
    oracle = VerifierOracle(echo)
    t = Task(id="e", prompt="count:\n")
    oracle.add_tasks([t])
    mid = transcript(t.prompt, [Step(0, "1", "ok 1"), Step(1, "2", "ok 2")])
    assert mid == "count:\n1\nok 1\n2\nok 2\n"
    assert oracle(mid, "3\n", "4\n") == 1.0
    assert oracle("count:\n1\nok 9\n", "2\n3\n", "x\n") == 0.5  # not what the environment says: unplaced
    assert oracle("another task:\n", "1\n", "x\n") == 0.5
    assert oracle.counts() == {"oracle_calls": 3.0, "oracle_unscored": 2 / 3}


@pytest.mark.parametrize("follower_kl", ["prompt", "follower_prompt"])
def test_regression_slhf_scores_samples_at_their_sampling_temperature(small_model_dir, follower_kl):
    """The REINFORCE term and the KL use the log-probs of the distribution the tokens were drawn
    from: logits / temperature for the policy and the reference alike (the SLHF authors' trainer).
    Scoring samples drawn at 0.5 with temperature-1 log-probs was a different estimator. The
    follower's KL is against the reference given the bare prompt (the authors' default) or the
    full follower prompt. Checked against a plain forward pass per sequence, by hand."""
    from treeplay.learners.epochs import StatsMeter
    from treeplay.learners.logprobs import encode_prompt

    temp, beta = 0.5, 0.1
    learner = SLHFLearner(small_model_dir, preference=lambda p, a, b: 0.8 if len(a) > len(b) else 0.3,
                          temperature=temp, beta=beta, kl="k1", max_new_tokens=6, follower_kl=follower_kl,
                          num_threads=1)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from its reference, so the KL is not zero
        for p in learner.policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["12+3=", "7+8="]
    rollout = learner.rollout(prompts)
    got = learner._losses(rollout, StatsMeter(), train_leader=True).item()

    tok, model, ref_model = learner.policy.tokenizer, learner.policy.model, learner.policy.reference

    def token_logps(m, prompt_ids, response):
        ids = torch.tensor([prompt_ids + response])
        logits = m(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double() / temp
        return logits.log_softmax(-1).gather(1, ids[0, len(prompt_ids):, None]).squeeze(1).tolist()

    def term(prompt_ids, ref_prompt_ids, response, reward):
        lp = token_logps(model, prompt_ids, response)
        rf = token_logps(ref_model, ref_prompt_ids, response)
        return sum((beta * (a - b) - (reward - 0.5)) * a for a, b in zip(lp, rf, strict=True))

    with torch.no_grad():
        lead = [term(encode_prompt(tok, x), encode_prompt(tok, x), y, p)
                for x, y, p in zip(prompts, rollout["leader"], rollout["preference"], strict=True)]
        fol = []
        for x, fx, y2, p in zip(prompts, rollout["follower_prompts"], rollout["follower"], rollout["preference"],
                                strict=True):
            ref_ctx = encode_prompt(tok, x if follower_kl == "prompt" else fx)
            fol.append(term(encode_prompt(tok, fx), ref_ctx, y2, 1 - p))
    expected = sum(lead) / 2 + learner.config.follower_weight * sum(fol) / 2
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_regression_tpo_nll_is_the_mean_over_lists_with_a_verified_item(small_model_dir):
    """TPO's NLL term averages over the lists that have a verified-correct item (the others add
    none), not over all lists of the batch."""
    from treeplay.learners.epochs import StatsMeter

    lists = ranked_lists(4)
    for k, rec in enumerate(lists):
        best = max(range(len(rec.items)), key=lambda i: rec.items[i].score)
        rec.info["correct"] = [i == best and k < 1 for i in range(len(rec.items))]  # one list of four
    learner = TPOLearner(small_model_dir, num_threads=1, nll_weight=1.0)
    batch = learner.prepare(lists)
    with torch.no_grad():
        with_nll = learner.micro_loss(batch, StatsMeter()).loss.item()
        learner.config.nll_weight = 0.0
        without = learner.micro_loss(batch, StatsMeter()).loss.item()
        meter = StatsMeter()
        learner.config.nll_weight = 1.0
        learner.micro_loss(batch, meter)
    nll_of_the_one_list = meter.means()["nll_loss"]
    assert nll_of_the_one_list > 0
    assert with_nll - without == pytest.approx(nll_of_the_one_list, rel=1e-5)  # not a quarter of it
