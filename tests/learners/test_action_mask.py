"""The action mask: learners train only on what the policy wrote, never on environment text.

Trees and sample-mode episodes on ``toolqa`` carry observations (tool output, "Invalid action"
messages) between the policy's actions. A pair's response keeps them as context, and its action
spans mark the policy's characters; the learners' scored tokens, and the engines' masked totals,
are exactly the actions. Changing an observation's text changes the context of the trained tokens,
never which tokens are trained.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from treeplay.agents.base import Trajectory, transcript
from treeplay.agents.episode import run_episodes
from treeplay.agents.registry import make_environment
from treeplay.agents.scripted import ScriptedPolicy
from treeplay.learners.config import DPOConfig, TPOConfig
from treeplay.learners.dpo import DPOLearner
from treeplay.learners.logprobs import Group, pack, packed_logprobs, sequence_sums
from treeplay.learners.tpo import TPOLearner
from treeplay.orchestrator.rollouts import _correct_vs_wrong
from treeplay.search.mcts import search_many
from treeplay.search.preferences import ranked_lists, step_pairs
from treeplay.search.state import MCTSConfig
from treeplay.search.tree import PreferenceTree
from treeplay.store.records import ACTION_SPANS, PairRecord, RankedItem, RankedListRecord

WRONG = "search[Nowhere]"


def _env():
    return make_environment("toolqa")


def _task():
    return _env().tasks("train", 1, seed=0)[0]


def _policy(task) -> ScriptedPolicy:
    """Writes the next gold action, or a wrong search, at random."""
    gold = task.reference.splitlines()

    def respond(prompt: str, rng: random.Random) -> str:
        lines = prompt[len(task.prompt) :].splitlines()
        k = sum(1 for g in gold if g in lines)
        return (gold[min(k, len(gold) - 1)] if rng.random() < 0.6 else WRONG) + "\n"

    return ScriptedPolicy(respond)


@pytest.fixture(scope="module")
def tree() -> PreferenceTree:
    task = _task()
    cfg = MCTSConfig(iterations=12, root_width=3, width=2, max_depth=8, seed=0)
    out = search_many([task], _env, _policy(task), cfg)[0]
    assert out.solved()
    return out


@pytest.fixture(scope="module")
def learner(tiny_model_dir) -> DPOLearner:
    return DPOLearner(tiny_model_dir, DPOConfig(num_threads=1, max_length=512))


def _actions_of(tree: PreferenceTree, end: int, start: int) -> str:
    path = tree.path(end)
    return "".join(tree[n]["step"] + "\n" for n in path[path.index(start) + 1 :])


def _trained_text(text: str, spans) -> str:
    return "".join(text[a:b] for a, b in spans)


def _with_observations(tree: PreferenceTree, new: str) -> PreferenceTree:
    other = copy.deepcopy(tree)
    for n in other.nodes():
        if other[n]["observation"]:
            other[n]["observation"] = new
    return other


def _trained_targets(learner: DPOLearner, pairs: list[PairRecord]) -> list[list[int]]:
    """Per response (chosen, rejected of every pair): the token ids the learner scores."""
    out = []
    for ex in learner.prepare(pairs):
        for ids, mask in ((ex.chosen, ex.chosen_mask), (ex.rejected, ex.rejected_mask)):
            batch = pack([Group(list(ex.prompt), [list(ids)], masks=[list(mask)])], 0)
            out.append(batch.target_ids.tolist())
    return out


def test_regression_tree_pairs_train_only_actions(tree, learner):
    pairs = step_pairs(tree)
    assert pairs
    seen_observation = False
    for p in pairs:
        for side, node in (("chosen", p.info["chosen_end"]), ("rejected", p.info["rejected_end"])):
            text, spans = getattr(p, side), p.action_spans(side)
            assert spans is not None
            actions = _actions_of(tree, node, p.info["parent_node"])
            assert _trained_text(text, spans) == actions
            seen_observation |= text != actions
            # The learner's scored tokens are exactly the actions' tokens.
            ex = learner.prepare([p])[0]
            ids, mask = (ex.chosen, ex.chosen_mask) if side == "chosen" else (ex.rejected, ex.rejected_mask)
            scored = [t for t, m in zip(ids, mask, strict=True) if m]
            assert learner.policy.tokenizer.decode(scored) == actions
    assert seen_observation, "the tree should hold observations between actions"


def test_regression_observation_text_changes_no_trained_target(tree, learner):
    before = step_pairs(tree)
    after = step_pairs(_with_observations(tree, "Invalid action: unknown entity"))
    assert [p.chosen for p in before] != [p.chosen for p in after]
    assert _trained_targets(learner, before) == _trained_targets(learner, after)
    # Only the context moved: the same scored tokens, now with other log-probs.
    ex_b, ex_a = learner.prepare(before[:1])[0], learner.prepare(after[:1])[0]
    with torch.no_grad():
        lp = [
            packed_logprobs(
                learner.policy.model,
                pack([Group(list(ex.prompt), [list(ex.chosen)], masks=[list(ex.chosen_mask)])], 0),
            ).values
            for ex in (ex_b, ex_a)
        ]
    assert lp[0].shape == lp[1].shape


def test_regression_ranked_list_items_train_only_actions(tree):
    lists = ranked_lists(tree)
    assert lists
    for rec in lists:
        assert len(rec.info[ACTION_SPANS]) == len(rec.items)
        for i, item in enumerate(rec.items):
            actions = _actions_of(tree, rec.info["end_nodes"][i], rec.info["parent_node"])
            assert _trained_text(item.text, rec.action_spans(i)) == actions


def _sample_trajectories(task, k: int = 8) -> list[Trajectory]:
    return run_episodes(_env, _policy(task), [task] * k, max_steps=8, seed=3)


def test_regression_sample_pairs_keep_observations_as_context(learner):
    task = _task()
    trajs = _sample_trajectories(task)
    pairs = _correct_vs_wrong(task, trajs, max_pairs=4)
    assert pairs
    by_text = {"".join(s.action + "\n" for s in t.steps): t for t in trajs}
    for p in pairs:
        for side in ("chosen", "rejected"):
            text, spans = getattr(p, side), p.action_spans(side)
            actions = _trained_text(text, spans)
            traj = by_text[actions]
            # The context is what the policy saw at inference: the prompt and the observations.
            assert p.prompt + text == transcript(task.prompt, traj.steps)
    assert any(p.chosen != _trained_text(p.chosen, p.action_spans("chosen")) for p in pairs)
    # Other observation text: same trained tokens.
    for t in trajs:
        for s in t.steps:
            if s.observation:
                s.observation = "Invalid action: unknown entity"
    changed = _correct_vs_wrong(task, trajs, max_pairs=4)
    assert _trained_targets(learner, pairs) == _trained_targets(learner, changed)


def test_regression_engine_score_masks_observations(tree, learner, tiny_model_dir):
    """HFEngine.score with action spans sums the same tokens, to the same value, as the learner."""
    from treeplay.engines.hf import HFEngine

    with_obs = [p for p in step_pairs(tree) if p.chosen != _trained_text(p.chosen, p.action_spans("chosen"))]
    # The tiny model's context is 512 characters: keep the prompt's tail so nothing is truncated.
    p = dataclasses.replace(with_obs[0], prompt=with_obs[0].prompt[-200:])
    assert len(p.prompt) + len(p.chosen) < 500
    engine = HFEngine(tiny_model_dir, num_threads=1)
    try:
        full, masked = (
            engine.score([p.prompt], [p.chosen])[0],
            engine.score([p.prompt], [p.chosen], action_spans=[p.action_spans("chosen")])[0],
        )
    finally:
        engine.close()
    assert masked.action_mask is not None and not all(masked.action_mask)
    assert masked.total == pytest.approx(
        sum(lp for lp, m in zip(masked.token_logprobs, masked.action_mask, strict=True) if m)
    )
    assert masked.total > full.total  # observation tokens no longer counted
    ex = learner.prepare([p])[0]
    batch = pack([Group(list(ex.prompt), [list(ex.chosen)], masks=[list(ex.chosen_mask)])], 0)
    with torch.no_grad():
        ours = sequence_sums(batch, packed_logprobs(learner.policy.model, batch).values)[0]
    assert masked.total == pytest.approx(float(ours), abs=2e-3)


def test_regression_dpo_trains_on_masked_pairs(tree, tiny_model_dir):
    lrn = DPOLearner(tiny_model_dir, DPOConfig(num_threads=1, max_length=512, loss_type="mcts_dpo"))
    metrics = lrn.train(step_pairs(tree))
    assert metrics["updates"] >= 1 and metrics["pairs"] >= 1


def test_regression_tpo_nll_only_on_verified_correct(tiny_model_dir):
    lrn = TPOLearner(tiny_model_dir, TPOConfig(num_threads=1))
    items = [RankedItem("1+1=3\n", 0.2), RankedItem("1+1=2\n", 0.1), RankedItem("1+1=4\n", -0.5)]
    none_correct = RankedListRecord("Q\n", items, info={"correct": [False, False, False]})
    second_correct = RankedListRecord("Q\n", items, info={"correct": [False, True, False]})
    unknown = RankedListRecord("Q\n", items)
    ex = lrn.prepare([none_correct, second_correct, unknown])
    assert [e.nll_item for e in ex] == [None, 1, None]
    # A batch with no verified-correct item adds no NLL term.
    meter_loss = lrn.evaluate([none_correct])
    assert "nll_loss" not in meter_loss or meter_loss["nll_loss"] == 0.0
    assert lrn.evaluate([second_correct])["nll_loss"] > 0


def test_regression_prefix_shared_packing_scores_only_actions(learner):
    """Two responses that share an action AND an observation: the shared trunk keeps the
    observation as unscored context, each response's sum is the unshared one, and both equal the
    log-probs of the actions read off one plain forward pass over prompt + response."""
    from treeplay.learners.logprobs import encode_masked_response, encode_prompt

    tok, model = learner.policy.tokenizer, learner.policy.model
    prompt = "Q: where is Maror?\n"
    shared = "search[Maror]\n"
    obs = "Invalid action: unknown entity\n"
    texts = [shared + obs + "finish[1]\n", shared + obs + "lookup[Maror]\n"]
    encoded = [encode_masked_response(tok, t, [(0, len(shared)), (len(shared) + len(obs), len(t))]) for t in texts]
    p_ids = encode_prompt(tok, prompt)
    ids, masks = [e[0] for e in encoded], [e[1] for e in encoded]
    assert not all(masks[0]) and sum(masks[0]) < len(masks[0])

    together = pack([Group(list(p_ids), ids, masks=masks)], 0)
    apart = pack([Group(list(p_ids), [r], masks=[m]) for r, m in zip(ids, masks, strict=True)], 0)
    # The trunk holds the shared action and observation; only the action's tokens are targets.
    assert int(together.segments.eq(0).sum()) >= len(p_ids) + len(tok(shared + obs, add_special_tokens=False)["input_ids"])
    for r, m, got in zip(ids, masks, together.seq_tokens, strict=True):
        assert [together.target_ids[u].item() for u in got] == [t for t, keep in zip(r, m, strict=True) if keep]
    with torch.no_grad():
        sums = {
            name: sequence_sums(b, packed_logprobs(model, b).values).tolist()
            for name, b in (("together", together), ("apart", apart))
        }
        plain = []
        for r, m in zip(ids, masks, strict=True):
            full = torch.tensor([p_ids + r])
            logp = model(input_ids=full).logits[0, :-1].float().log_softmax(-1)
            per_token = logp[torch.arange(len(p_ids) - 1, full.shape[1] - 1), full[0, len(p_ids):]]
            plain.append(float(sum(v for v, keep in zip(per_token.tolist(), m, strict=True) if keep)))
    assert sums["together"] == pytest.approx(sums["apart"], abs=1e-4)
    assert sums["together"] == pytest.approx(plain, abs=1e-4)
