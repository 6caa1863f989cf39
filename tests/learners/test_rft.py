"""RFT (rejection-sampling fine-tuning): NLL on verified-correct items only, masked, deduplicated."""

from __future__ import annotations

import pytest
import torch

from treeplay.agents.registry import make_environment
from treeplay.agents.scripted import ScriptedPolicy
from treeplay.learners.config import RFTConfig
from treeplay.learners.rft import RFTLearner
from treeplay.orchestrator.config import RunConfig
from treeplay.orchestrator.rollouts import run_rollouts
from treeplay.store.records import RankedItem, RankedListRecord


def _lists() -> list[RankedListRecord]:
    items = [RankedItem("12+5=17\n", 1.0), RankedItem("12+5=18\n", 0.0), RankedItem("12+5=17\n", 1.0)]
    return [
        RankedListRecord("12+5=\n", items, source="sample", info={"correct": [True, False, True]}),
        RankedListRecord("3+4=\n", [RankedItem("3+4=8\n", 0.0)], source="sample", info={"correct": [False]}),
        RankedListRecord("9+9=\n", [RankedItem("9+9=18\n", 1.0)], source="sample"),  # no verdicts: unused
    ]


def test_rft_trains_only_verified_correct_distinct_items(tiny_model_dir):
    lrn = RFTLearner(tiny_model_dir, RFTConfig(num_threads=1, lr=1e-3, batch_size=4))
    examples = lrn.prepare(_lists())
    tok = lrn.policy.tokenizer
    assert [tok.decode(list(e.response)) for e in examples] == ["12+5=17\n"]
    before = {k: v.clone() for k, v in lrn.policy.model.state_dict().items()}
    first = lrn.evaluate(_lists())["nll_loss"]
    for _ in range(5):
        metrics = lrn.train(_lists())
    assert metrics["responses"] == 1 and metrics["updates"] >= 5
    assert lrn.evaluate(_lists())["nll_loss"] < first
    changed = [k for k, v in lrn.policy.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    assert lrn.policy.reference is None


def test_rft_without_correct_items_raises_before_updating(tiny_model_dir):
    lrn = RFTLearner(tiny_model_dir, RFTConfig(num_threads=1))
    with pytest.raises(ValueError, match="verified-correct"):
        lrn.train(_lists()[1:])
    assert lrn.policy.updates == 0


def test_sample_mode_writes_a_verified_list_and_counts_tokens():
    env = make_environment("arithmetic", ops=1, digits=1)
    tasks = env.tasks("train", 3, seed=0)
    answers = {t.prompt: t.answer for t in tasks}

    def respond(prompt, rng):
        good = rng.random() < 0.5
        return f"{answers[prompt] if good else 'x'}\n"

    policy = ScriptedPolicy(respond)
    cfg = RunConfig(rollout={"mode": "sample", "samples_per_task": 6, "max_steps": 1})
    results, stats = run_rollouts(cfg, tasks, policy, lambda: make_environment("arithmetic", ops=1, digits=1))
    assert stats["generated_tokens"] > 0
    for r in results:
        (lst,) = r.ranked_lists
        texts = [it.text for it in lst.items]
        assert len(texts) == len(set(texts))
        assert lst.info["correct"] == [it.score > 0.5 for it in lst.items]
