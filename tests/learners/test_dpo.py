"""DPO learner: prefix-shared log-probs, equality with TRL's DPOTrainer, real training steps, guard rails."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.helpers.reference_logprobs import encode_response, unshared_logprobs
from treeplay.learners.config import DPOConfig
from treeplay.learners.dpo import DPOLearner
from treeplay.learners.logprobs import (
    Group,
    encode_prompt,
    pack,
    packed_logprobs,
    per_sequence,
    sequence_sums,
)
from treeplay.store.records import PairRecord, PreferenceData


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from treeplay.engines.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("dpo") / "model", hidden_size=64, num_layers=2, seed=1)


def arithmetic_pairs(n: int, seed: int = 0, final: bool = True) -> list[PairRecord]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-11, -3, 1, 7, 10])
        pairs.append(
            PairRecord(prompt=f"{a}+{b}=", chosen=f"{a + b}", rejected=f"{wrong}", info={"final": final})
        )
    return pairs


def test_prefix_shared_logprobs_equal_unshared(small_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(small_model_dir)
    tok = AutoTokenizer.from_pretrained(small_model_dir)
    groups = [
        # chosen/rejected with a shared step prefix, EOS on one
        Group(
            encode_prompt(tok, "Q: 12+5\n"),
            [encode_response(tok, "Step 1\n17", True), encode_response(tok, "Step 1\n18")],
        ),
        # three responses, one repeated, one a prefix of another
        Group(
            encode_prompt(tok, "Hi"),
            [encode_response(tok, "abc"), encode_response(tok, "ab"), encode_response(tok, "abc")],
        ),
        # no shared response prefix, a longer prompt (so the rows need padding)
        Group(
            encode_prompt(tok, "a much longer prompt than the others"),
            [encode_response(tok, "x"), encode_response(tok, "yz")],
        ),
        # sharing disabled
        Group(
            encode_prompt(tok, "P"),
            [encode_response(tok, "same"), encode_response(tok, "sample")],
            share_responses=False,
        ),
    ]
    batch = pack(groups, tok.pad_token_id)
    out = packed_logprobs(model, batch)
    per = per_sequence(batch, out.values)
    sums = sequence_sums(batch, out.values)
    i = 0
    for g in groups:
        for r in g.responses:
            ref = unshared_logprobs(model, g.prompt, r)
            assert per[i].shape == ref.shape
            torch.testing.assert_close(per[i], ref, atol=1e-5, rtol=1e-5)
            assert sums[i].item() == pytest.approx(ref.sum().item(), abs=1e-4)
            i += 1
    # The packed rows hold fewer tokens than the plain sequences would.
    plain = sum(len(g.prompt) + len(r) for g in groups for r in g.responses)
    assert int(batch.segments.ge(0).sum()) < plain


def test_dpo_loss_equals_trl_first_step(small_model_dir, tmp_path):
    """Same model, pairs and beta: our first-batch loss equals TRL DPOTrainer's to 1e-4.

    TRL (non-conversational data) tokenizes prompt and prompt+response and appends EOS; with the
    char tokenizer prompt+response tokenizes as prompt tokens + response tokens, and we append
    EOS too by marking the pairs final, so both see the same token sequences. One batch holds all
    pairs, so TRL's shuffling does not matter. TRL is configured fairly: fp32, no gradient
    checkpointing, no dropout, reference = a copy of the same starting model.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    pairs = arithmetic_pairs(8, seed=3)
    for p in pairs[:3]:
        p.rejected += " (wrong)"  # different lengths, so padding is exercised
    beta = 0.3
    ours = DPOLearner(small_model_dir, DPOConfig(beta=beta, batch_size=8, nll_weight=0.0, dtype="float32"))
    our_loss = ours.evaluate(pairs)["pair_loss"]

    tok = AutoTokenizer.from_pretrained(small_model_dir)
    model = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
    args = TRLConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        per_device_train_batch_size=8,
        bf16=False,
        gradient_checkpointing=False,
        learning_rate=1e-4,
        max_length=None,
        report_to=[],
        use_cpu=True,
        dataset_num_proc=None,
        logging_strategy="no",
        save_strategy="no",
    )
    data = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    inputs = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, inputs).item()
    assert our_loss == pytest.approx(math.log(2), abs=0.05)  # the untrained policy equals its reference
    assert abs(our_loss - trl_loss) < 1e-4

    # And after one identical step (policy != reference) the two still agree.
    ours.policy.model.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ours.policy.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        trainer.model.load_state_dict(ours.policy.model.state_dict())
        trl_loss = trainer.compute_loss(trainer.model, inputs).item()
    our_loss = ours.evaluate(pairs)["pair_loss"]
    assert abs(our_loss - math.log(2)) > 1e-3
    assert abs(our_loss - trl_loss) < 1e-4


def test_training_steps_lower_loss_move_every_param_and_grow_margin(small_model_dir):
    pairs = arithmetic_pairs(64)
    learner = DPOLearner(small_model_dir, lr=3e-3, batch_size=16, epochs=2, num_threads=1)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    start = learner.evaluate(pairs)
    m1 = learner.train(PreferenceData(pairs=pairs))
    m2 = learner.train(PreferenceData(pairs=pairs))
    end = learner.evaluate(pairs)
    assert end["loss"] < start["loss"]
    assert end["reward_margin"] > start["reward_margin"] + 0.01
    assert m2["loss"] < m1["loss"]
    assert m1["updates"] == 8 and m2["updates"] == 16 and m2["skipped_updates"] == 0
    assert m1["pairs_per_s"] > 0 and learner.healthy
    after = learner.state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    # Optimizer state survives across train() calls.
    state = learner.policy.optimizer.state[learner.policy.params[0]]
    assert int(state["step"]) == 16


@pytest.mark.parametrize("loss_type", ["ipo", "mcts_dpo", "simpo"])
def test_other_losses_train(small_model_dir, loss_type):
    pairs = arithmetic_pairs(32, final=False)
    for i, p in enumerate(pairs):
        p.chosen, p.rejected = "Step: " + p.chosen, "Step: " + p.rejected  # a shared step prefix
        p.chosen_visits, p.rejected_visits = 4 + i % 3, 1
    beta = {"ipo": 0.5, "mcts_dpo": 0.1, "simpo": 2.0}[loss_type]
    learner = DPOLearner(
        small_model_dir, loss_type=loss_type, beta=beta, lr=3e-3, batch_size=16, epochs=3, nll_weight=0.0
    )
    start = learner.evaluate(pairs)
    m = learner.train(pairs)
    end = learner.evaluate(pairs)
    assert m["skipped_updates"] == 0
    assert end["pair_loss"] < start["pair_loss"]
    if loss_type == "mcts_dpo":
        assert m["alpha"] == pytest.approx((1 / 5 + 1 / 6 + 1 / 7) / 3, abs=0.02)


def test_reference_refresh(small_model_dir):
    pairs = arithmetic_pairs(16)
    learner = DPOLearner(small_model_dir, lr=3e-3, batch_size=8, reference="refresh")
    learner.train(pairs)
    trained = learner.state_dict()
    learner.train(pairs)  # the reference becomes the policy as it was at this call's start
    ref = learner.policy.reference.state_dict()
    assert all(torch.equal(trained[k], ref[k].cpu()) for k in trained)
    fixed = DPOLearner(small_model_dir, lr=3e-3, batch_size=8)
    start = {k: v.clone() for k, v in fixed.policy.reference.state_dict().items()}
    fixed.train(pairs)
    fixed.train(pairs)
    assert all(torch.equal(start[k], v) for k, v in fixed.policy.reference.state_dict().items())


def test_nan_pair_is_skipped_and_weights_kept(small_model_dir):
    pairs = arithmetic_pairs(8)
    for p in pairs:
        p.weight = float("nan")  # forces every loss non-finite
    learner = DPOLearner(small_model_dir, lr=1e-2, batch_size=4)
    before = learner.state_dict()
    m = learner.train(pairs)
    assert m["skipped_updates"] >= 2 and m["updates"] == 0
    assert "non-finite" in m["last_skip_reason"]
    assert learner.healthy
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_exploding_lr_rolls_back_to_last_good_weights(small_model_dir):
    pairs = arithmetic_pairs(32)
    learner = DPOLearner(small_model_dir, lr=1e30, batch_size=4, max_grad_norm=1.0)
    m = learner.train(pairs)
    assert m["skipped_updates"] >= 1 and "non-finite" in m["last_skip_reason"]
    assert learner.healthy
    weights = learner.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(v.abs().max() < 1e3 for v in weights.values())
    assert math.isfinite(learner.evaluate(pairs)["loss"])


def test_gradient_norm_guard(small_model_dir):
    learner = DPOLearner(small_model_dir, lr=1e-3, batch_size=8, skip_grad_norm=1e-6)
    before = learner.state_dict()
    m = learner.train(arithmetic_pairs(16))
    assert m["updates"] == 0 and m["skipped_updates"] == 2
    assert "skip_grad_norm" in m["last_skip_reason"]
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())


def test_empty_data_is_a_clear_error(small_model_dir):
    learner = DPOLearner(small_model_dir)
    with pytest.raises(ValueError, match="at least one preference pair"):
        learner.train(PreferenceData())


def test_eos_only_for_final_pairs(small_model_dir):
    learner = DPOLearner(small_model_dir)
    eos = learner.policy.tokenizer.eos_token_id
    final, step = learner.prepare(arithmetic_pairs(1, final=True) + arithmetic_pairs(1, final=False))
    assert final.chosen[-1] == eos and final.rejected[-1] == eos
    assert eos not in step.chosen and eos not in step.rejected


def test_regression_mcts_dpo_learner_loss_is_the_tested_function(small_model_dir, monkeypatch):
    """DPOLearner computed its own MCTS-DPO (its own alpha and loss) beside the hand-checked
    ``losses.mcts_dpo_loss``; the learner's pair loss is now that function's, on the learner's sums."""
    from treeplay.learners import losses

    calls = []
    real = losses.mcts_dpo_loss

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, float(out.loss)))
        return out

    monkeypatch.setattr(losses, "mcts_dpo_loss", recording)
    pairs = arithmetic_pairs(6, final=False)
    for i, p in enumerate(pairs):
        p.chosen_visits, p.rejected_visits = 3 + i, 1 + i % 2
    learner = DPOLearner(small_model_dir, loss_type="mcts_dpo", beta=0.3, batch_size=6, nll_weight=0.0, num_threads=1)
    metrics = learner.evaluate(pairs)
    assert len(calls) == 1
    args, kwargs, value = calls[0]
    assert metrics["pair_loss"] == pytest.approx(value, rel=1e-6)
    chosen_visits, rejected_visits, beta = args[4], args[5], args[6]
    assert chosen_visits.tolist() == [3 + i for i in range(6)] and rejected_visits.tolist() == [1 + i % 2 for i in range(6)]
    assert beta == 0.3
    expected_alpha = losses.visit_alpha(chosen_visits, rejected_visits).mean().item()
    assert metrics["alpha"] == pytest.approx(expected_alpha, rel=1e-6)
